"""Trainer throughput features, each checked exact against the plain path on the CPU:
packed rows = padded rows, chunked logprobs = one-chunk logprobs, token-budget micro-batches =
one big micro-batch, and the micro-batch plan's promises (every row once, same count per rank,
budget kept)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncpolicy.config import Config, load_config
from asyncpolicy.engines.training.step import (
    LossTotals,
    PolicyLogprobs,
    StepRunner,
    collate,
    compile_layers,
    head_logprobs,
    make_optimizer,
    make_scheduler,
    micro_batch_loss,
    plan_micro_batches,
)
from asyncpolicy.bench.synthetic import random_batch
from asyncpolicy.samples import Sample

VOCAB = 200
# float64 runs differ by summation order only: about 1e-14 measured, so these leave four orders of margin
# and hold on any CPU's kernels (Adam lifts a 1e-17 gradient noise to lr·1e-9 at the most)
EXACT_REL, EXACT_ABS = 1e-9, 1e-12  # metrics
WEIGHTS_ATOL = 1e-9  # tensors
# where a model computes in float32 inside a float64 model (transformers' eager attention takes its
# softmax in float32; Qwen2's RMSNorm and rotary run in float32), and inductor fuses those differently:
# float32 noise, compared only where no optimizer step can amplify it
FLOAT32_INSIDE_RTOL, FLOAT32_INSIDE_ATOL = 1e-5, 1e-6


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0.0, atol=WEIGHTS_ATOL)


def tiny_model(attn: str = "sdpa", seed: int = 0) -> Any:
    """A float64 model: the equalities below compare two summation orders, and float32's noise is
    machine-dependent (another CPU's kernels round differently) and Adam lifts it to lr-sized steps
    where a gradient is zero in exact arithmetic (k_proj's bias); float64's noise is 1e-16."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation=attn)


def batch(seed: int, groups: int = 3, n: int = 3, versions: tuple[int, ...] = (0, 1)) -> list[Sample]:
    """Groups with prompts of 1-7 tokens and responses of 0-12: lengths differ, so padding is real."""
    return random_batch(seed, groups=groups, n=n, prompt_len=(1, 7), response_len=(0, 12), tokens=range(VOCAB),
                        versions=versions, logprob=(-6.0, -4.0))


def config(*overrides: str) -> Config:
    return load_config(overrides=["trainer.threads=1", "trainer.lr=1e-2", "trainer.warmup_steps=0", *overrides])


def grads_of(model: Any) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_gives_the_padded_rows_logprobs_loss_and_gradients(mode: str, attn: str) -> None:
    cfg = config(f"algorithm.loss_agg_mode={mode}")
    model = tiny_model(attn)
    policy = PolicyLogprobs(model, 0.9)
    pb = collate(batch(0), 1, cfg.algorithm, pad_id=0)
    rows = list(range(pb.input_ids.shape[0]))
    totals = LossTotals.of(pb, slice(0, len(rows)))
    out = {}
    for packed in (False, True):
        mb = pb.micro(rows, torch.device("cpu"), packed=packed)
        model.zero_grad()
        lp, ent = policy(mb.input_ids, mb.attention_mask, mb.response_index, with_entropy=True, position_ids=mb.position_ids)
        pre = lp.detach() + 0.01  # a proximal policy a little off the current one
        loss, stats, _ = micro_batch_loss(lp, ent, mb, cfg.algorithm, totals, pre)
        loss.backward()
        assert ent is not None
        out[packed] = (lp[mb.response_mask > 0], ent[mb.response_mask > 0], loss, stats, grads_of(model))
    padded, packed_ = out[False], out[True]
    assert pb.attention_mask.sum() < pb.attention_mask.numel()  # the padded layout has padding
    assert out[True][0].numel() == pb.response_mask.sum() > 0
    for a, b in zip(padded, packed_, strict=True):
        if attn == "sdpa":
            assert same(a, b)
        else:
            assert torch.allclose(a, b, rtol=FLOAT32_INSIDE_RTOL, atol=FLOAT32_INSIDE_ATOL)
    assert padded[4].abs().max() > 0


def test_packed_positions_restart_per_sequence_and_boundaries_are_masked() -> None:
    cfg = config()
    pb = collate(batch(1), 0, cfg.algorithm, pad_id=0)
    rows = [0, 4, 7]
    mb = pb.micro(rows, torch.device("cpu"), packed=True)
    lengths = pb.attention_mask[rows].sum(dim=1).tolist()
    assert mb.position_ids is not None and mb.attention_mask is None
    assert mb.position_ids[0].tolist() == [p for L in lengths for p in range(L)]
    assert mb.input_ids.shape == (1, sum(lengths)) and mb.response_mask.shape == (1, sum(lengths) - 1)
    ends = torch.tensor(lengths).cumsum(0)[:-1] - 1  # the last position of every sequence but the last
    assert (mb.response_mask[0, ends] == 0).all()
    assert mb.response_mask.sum() == pb.response_mask[rows].sum()


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_logprobs_equal_one_chunk_and_hold_no_full_vocabulary_logits(chunk: int) -> None:
    model = tiny_model()
    pb = collate(batch(2), 0, config().algorithm, pad_id=0)
    mb = pb.micro(list(range(pb.input_ids.shape[0])), torch.device("cpu"))
    K = int(mb.response_index.numel())
    out = []
    for size in (0, chunk):
        model.zero_grad()
        saved: list[torch.Size] = []

        def pack(t: torch.Tensor, saved: list[torch.Size] = saved) -> torch.Tensor:
            saved.append(t.shape)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp, ent = PolicyLogprobs(model, 0.7, size)(mb.input_ids, mb.attention_mask, mb.response_index, with_entropy=True)
        (lp * torch.linspace(-1, 1, lp.numel()).reshape(lp.shape)).sum().backward()
        assert ent is not None
        widest = max((s.numel() for s in saved if s and s[-1] == VOCAB and len(s) == 2), default=0)
        out.append((lp, ent, grads_of(model), widest))
    (lp0, ent0, g0, wide0), (lp1, ent1, g1, wide1) = out
    assert wide0 == K * VOCAB and wide1 <= chunk * VOCAB < K * VOCAB  # only one chunk's logits are kept, for recompute
    assert same(lp0, lp1) and same(ent0, ent1)
    assert same(g0, g1) and g0.abs().max() > 0
    assert (ent0[mb.response_mask > 0] > 0).all()


@given(
    lengths=st.lists(st.integers(1, 50), min_size=1, max_size=30),
    world=st.integers(1, 4),
    budget=st.sampled_from([0, 1, 40, 100, 10_000]),
    packed=st.booleans(),
    size=st.integers(1, 5),
)
@settings(max_examples=200, deadline=None)
def test_the_plan_covers_every_row_once_with_the_same_count_on_every_rank_within_the_budget(
    lengths: list[int], world: int, budget: int, packed: bool, size: int,
) -> None:
    rows = range(len(lengths))
    plans = [
        plan_micro_batches(rows, lengths, world_size=world, rank=r, micro_batch_size=size, max_tokens=budget, packed=packed)
        for r in range(world)
    ]
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) >= 1
    assert sorted(i for p in plans for mb in p for i in mb) == list(rows)
    for p in plans:
        for mb in p:
            if budget and len(mb) > 1:  # a row over the budget goes alone; every other micro-batch fits
                cost = sum(lengths[i] for i in mb) if packed else len(mb) * max(lengths[i] for i in mb)
                assert cost <= budget
            if not budget:
                assert len(mb) <= size
    if budget:  # ranks' token loads differ by at most one row
        loads = [sum(lengths[i] for mb in p for i in mb) for p in plans]
        assert max(loads) - min(loads) <= max(lengths)


def test_budget_plan_on_one_rank_packs_first_fit() -> None:
    lengths = [30, 25, 20, 10, 5]
    plan = plan_micro_batches(range(5), lengths, world_size=1, rank=0, micro_batch_size=1, max_tokens=40, packed=True)
    assert plan == [[0, 3], [1, 4], [2]]
    padded = plan_micro_batches(range(5), lengths, world_size=1, rank=0, micro_batch_size=1, max_tokens=60, packed=False)
    assert padded == [[0, 1], [2, 3, 4]]  # 2 × 30 and 3 × 20 padded tokens


def run_steps(cfg: Config, batches: list[tuple[list[Sample], int]], kl: bool) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    model = tiny_model()
    if cfg.trainer.compile:
        compile_layers(model)
    ref = PolicyLogprobs.of(tiny_model().requires_grad_(False), cfg).eval() if kl else None
    opt = make_optimizer(model.parameters(), cfg)
    runner = StepRunner(cfg, PolicyLogprobs.of(model, cfg), ref, opt, make_scheduler(opt, cfg), torch.device("cpu"), 0)
    metrics = [runner.run(b, v) for b, v in batches]
    return metrics, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_steps_with_a_token_budget_packed_or_padded_equal_one_micro_batch(mode: str) -> None:
    """Two steps (two mini-batches each, decoupled PPO, a KL penalty): same metrics and weights
    whether each update is one micro-batch or many under a 24-token budget, padded or packed."""
    common = ("async_training.require_batches=2", "algorithm.kl_coef=0.1", f"algorithm.loss_agg_mode={mode}",
              "rollout.temperature=0.8")
    steps = [(batch(3, groups=4), 1), (batch(4, groups=4), 1)]
    runs = {
        "one": run_steps(config(*common, "trainer.micro_batch_size=1000", "trainer.logprob_chunk_tokens=0"), steps, True),
        "padded": run_steps(config(*common, "trainer.max_tokens_per_micro_batch=24", "trainer.logprob_chunk_tokens=5"), steps, True),
        "packed": run_steps(
            config(*common, "trainer.max_tokens_per_micro_batch=24", "trainer.packing=true", "trainer.logprob_chunk_tokens=5"),
            steps, True,
        ),
    }
    base_metrics, base_weights = runs["one"]
    initial = tiny_model().state_dict()
    for name in ("padded", "packed"):
        metrics, weights = runs[name]
        for a, b in zip(base_metrics, metrics, strict=True):
            assert set(a) == set(b)
            for key in a:
                if not key.startswith("perf/"):
                    assert b[key] == pytest.approx(a[key], rel=EXACT_REL, abs=EXACT_ABS), (name, key)
        for k in base_weights:
            assert same(weights[k], base_weights[k]), (name, k)
            assert not torch.equal(weights[k], initial[k]) or "bias" in k, (name, k)
    assert base_metrics[-1]["losses/kl_ref"] > 0 and base_metrics[-1]["train/grad_norm"] > 0


@pytest.mark.slow
def test_a_compiled_step_equals_the_eager_step() -> None:
    """trainer.compile (decoder layers and the head's maths through inductor, here on the CPU): two
    steps give the eager steps' metrics, and one backward gives the eager gradients.

    Weights after Adam are not compared: inductor fuses the model's float32 parts (RMSNorm, rotary)
    differently, and Adam turns that noise into lr-sized steps where a gradient is zero in exact
    arithmetic (k_proj's bias), on every CPU differently. Those steps move the loss at second order
    only, so the second step's metrics still compare."""
    common = ("async_training.require_batches=2", "algorithm.kl_coef=0.1", "trainer.max_tokens_per_micro_batch=24",
              "trainer.logprob_chunk_tokens=5", "rollout.temperature=0.8")
    steps = [(batch(3, groups=4), 1), (batch(4, groups=4), 1)]
    eager_metrics, _ = run_steps(config(*common), steps, True)
    metrics, _ = run_steps(config(*common, "trainer.compile=true"), steps, True)
    for a, b in zip(eager_metrics, metrics, strict=True):
        assert set(a) == set(b)
        for key in a:
            if not key.startswith("perf/"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    pb = collate(batch(5), 1, config().algorithm, pad_id=0)
    mb = pb.micro(list(range(pb.input_ids.shape[0])), torch.device("cpu"))
    grads = []
    for compiled in (False, True):
        model = tiny_model()
        if compiled:
            compile_layers(model)
        lp, _ = PolicyLogprobs(model, 0.8, compile_head=compiled)(mb.input_ids, mb.attention_mask, mb.response_index)
        (lp * mb.advantages).sum().backward()
        grads.append(grads_of(model))
    scale = float(grads[0].abs().max())
    assert scale > 0 and torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.slow
def test_the_compiled_head_gives_the_eager_logprobs_entropy_and_gradients() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(37, VOCAB, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (37,))
    upstream = torch.randn(37, dtype=torch.float64)
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for fn in (head_logprobs, torch.compile(head_logprobs)):
        logits.grad = None
        lp, ent = fn(logits, targets, 0.7, True)
        (lp * upstream).sum().backward()
        assert logits.grad is not None
        out.append((lp.detach(), ent, logits.grad.clone()))
    (lp0, ent0, g0), (lp1, ent1, g1) = out
    assert same(lp0, lp1) and same(ent0, ent1)
    assert same(g0, g1) and g0.abs().max() > 0 and not ent1.requires_grad


def test_the_cpu_optimizer_is_adamw_without_the_cuda_fused_kernel() -> None:
    """make_optimizer takes AdamW's fused kernel only when every parameter is on CUDA (tests/gpu checks that
    side): the CPU trainer's update stays the one its exactness tests were written against."""
    opt = make_optimizer(tiny_model().parameters(), config())
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults["fused"]
