"""The torch trainer: a step improves the policy on its batch; accumulation is exact; the LR schedule survives a
resume; a non-finite gradient skips its update; the trainer's logprobs agree with the engine's (mismatch KL)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import anyio
import pytest
import torch

from asyncpolicy.config import Config, load_config
from asyncpolicy.engines.sets.hf_torch import build_hf_torch_engines
from asyncpolicy.engines.protocols import GenerationRequest, TrainEngine
from asyncpolicy.engines.training.step import LossTotals, PolicyLogprobs, collate, micro_batch_loss, token_logprobs
from asyncpolicy.algorithms.schedule import lr_lambda
from asyncpolicy.engines.training.torch_trainer import TorchTrainEngine
from asyncpolicy.models import tiny
from asyncpolicy.samples import Prompt, Sample, Trajectory, make_sample

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(*overrides: str) -> Config:
    return load_config(overrides=["trainer.threads=1", "rollout.n=4", "data.train_batch_size=4", *overrides])


async def rollout_batch(cfg: Config, seed: int = 0, perturb: float = 0.0) -> list[Sample]:
    """Real responses of the embedded model (its weights plus `perturb`-sized noise), at the run's
    temperature; half of each group is rewarded."""
    engines = build_hf_torch_engines(cfg)
    await engines.generation.start()
    if perturb:
        noise = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in engines.generation.model.parameters():
                p.add_(torch.randn(p.shape, generator=noise) * perturb)
    rng = random.Random(seed)
    samples = []
    for g in range(cfg.data.train_batch_size):
        prompt = Prompt(index=g, epoch=0, text="", tokens=[1] + [rng.randrange(3, 11) for _ in range(3)] + [43])
        trajectories = []
        for i in range(cfg.rollout.n):
            r = await engines.generation.generate(
                GenerationRequest(
                    request_id=f"{g}/{i}", prompt_tokens=prompt.tokens, max_tokens=6, seed=seed * 100 + g * 10 + i,
                    temperature=cfg.rollout.temperature,
                )
            )
            t = Trajectory(
                response_tokens=r.response_tokens,
                behaviour_logprobs=r.behaviour_logprobs,
                token_versions=r.token_versions,
                finish_reason=r.finish_reason,
            )
            t.reward = float(i % 2)  # half of each group is "good": a fixed, learnable preference
            trajectories.append(t)
        samples.append(make_sample(prompt, trajectories, 0))
    await engines.generation.aclose()
    return samples


async def started_trainer(cfg: Config) -> TorchTrainEngine:
    engines = build_hf_torch_engines(cfg)
    await engines.trainer.start()
    return engines.trainer


def good_minus_bad_logprob(trainer: TorchTrainEngine, cfg: Config, batch: list[Sample]) -> float:
    pb = collate(batch, 0, cfg.algorithm, pad_id=0)
    with torch.no_grad():
        lp = token_logprobs(trainer.model, pb, 1.0)
    seq = (lp * pb.response_mask).sum(-1)  # (N,) sequence logprobs
    return float(seq[pb.rewards > 0.5].mean() - seq[pb.rewards < 0.5].mean())


@pytest.mark.parametrize("correction", ["behaviour", "decoupled"])
async def test_training_steps_raise_the_rewarded_responses_and_lower_the_loss(model_cache: Path, correction: str) -> None:
    cfg = config(f"algorithm.staleness_correction={correction}", "trainer.lr=3e-3", "trainer.warmup_steps=0")
    batch = await rollout_batch(cfg)
    trainer = await started_trainer(cfg)
    assert isinstance(trainer, TrainEngine)
    before = good_minus_bad_logprob(trainer, cfg, batch)
    metrics = [await trainer.train_step(batch, version=0) for _ in range(4)]
    after = good_minus_bad_logprob(trainer, cfg, batch)
    assert after > before + 0.5
    if correction == "behaviour":  # the ratio is against the fixed rollout logprobs: the loss itself falls
        assert metrics[-1]["losses/policy_loss"] < metrics[0]["losses/policy_loss"]
        assert metrics[-1]["losses/approx_kl_k3"] > 0
    else:  # π_prox is recomputed every step: the first update of each step is at ratio 1
        assert all(m["is/weight_max"] <= cfg.algorithm.tis_cap for m in metrics)
    assert metrics[0]["train/tokens"] == sum(len(t.response_tokens) for s in batch for t in s.trajectories)
    assert all(0 <= m["losses/clipfrac"] <= 1 and m["train/grad_norm"] > 0 for m in metrics)
    await trainer.aclose()


async def test_micro_batches_accumulate_to_the_full_batch_gradient(model_cache: Path) -> None:
    cfg = config()
    batch = await rollout_batch(cfg, seed=1)
    model = tiny.load_model(tiny.resolve_model_path(cfg), "float64")  # two summation orders: compare in float64
    policy = PolicyLogprobs(model, 1.0)
    pb = collate(batch, 0, cfg.algorithm, pad_id=0)
    prox = pb.behaviour_logprobs + 0.05  # a proximal policy a little off the behaviour one
    totals = LossTotals.of(pb, slice(0, 16))
    grads = []
    for micro in (16, 3):
        model.zero_grad()
        for lo in range(0, 16, micro):
            rows = list(range(lo, min(lo + micro, 16)))
            mb = pb.micro(rows, torch.device("cpu"))
            logprobs, entropy = policy(mb.input_ids, mb.attention_mask, mb.response_index, with_entropy=True)
            pre = prox[rows, : mb.response_mask.shape[1]]
            loss, _, _ = micro_batch_loss(logprobs, entropy, mb, cfg.algorithm, totals, pre)
            loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-12, rtol=1e-9)


def test_lr_schedule_counts_updates() -> None:
    assert [lr_lambda(u, 3, 10, "constant") for u in (0, 1, 2, 3, 9)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    assert lr_lambda(3, 3, 10, "cosine") == pytest.approx(1.0)
    assert lr_lambda(10, 3, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_lambda(6, 0, 12, "cosine") == pytest.approx(0.5)


async def test_require_batches_makes_several_updates_per_step(model_cache: Path) -> None:
    cfg = config(
        "async_training.require_batches=2",
        "trainer.total_training_steps=4",
        "trainer.warmup_steps=1",
        "trainer.lr=1e-3",
    )
    batch = await rollout_batch(cfg)
    trainer = await started_trainer(cfg)
    m = await trainer.train_step(batch, version=0)
    assert m["train/updates"] == 2
    assert m["train/lr"] == pytest.approx(1e-3)  # warm-up of 1 step = 2 updates: the second is at full LR
    await trainer.aclose()


async def test_resume_continues_weights_optimizer_and_schedule(model_cache: Path, tmp_path: Path) -> None:
    cfg = config(
        "trainer.lr_schedule=cosine",
        "trainer.total_training_steps=6",
        "trainer.warmup_steps=2",
        "trainer.micro_batch_size=5",
    )
    batch = await rollout_batch(cfg)
    original = await started_trainer(cfg)
    for _ in range(3):
        await original.train_step(batch, version=0)
    await original.save_state(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "model" / "config.json").exists()
    resumed = await started_trainer(cfg)
    await resumed.load_state(str(tmp_path / "ckpt"))
    a = await original.train_step(batch, version=3)
    b = await resumed.train_step(batch, version=3)
    assert a["train/lr"] == b["train/lr"] == pytest.approx(cfg.trainer.lr * lr_lambda(3, 2, 6, "cosine"))
    assert a["losses/policy_loss"] == pytest.approx(b["losses/policy_loss"], abs=1e-6)
    for pa, pb in zip(original.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)
    await original.aclose()
    await resumed.aclose()


async def test_push_copies_trainer_weights_into_generation(model_cache: Path) -> None:
    cfg = config("trainer.lr=1e-2", "trainer.warmup_steps=0")
    batch = await rollout_batch(cfg)
    engines = build_hf_torch_engines(cfg)
    await engines.generation.start()
    await engines.trainer.start()
    await engines.trainer.train_step(batch, version=0)
    gen_before = next(iter(engines.generation.model.parameters())).clone()
    await engines.transport.push(1)
    assert engines.generation.version == 1
    for pg, pt in zip(engines.generation.model.parameters(), engines.trainer.model.parameters(), strict=True):
        assert torch.equal(pg, pt)
    assert not torch.equal(gen_before, next(iter(engines.generation.model.parameters())))
    with anyio.fail_after(5):
        r = await engines.generation.generate(GenerationRequest(request_id="v", prompt_tokens=[1, 3, 43], max_tokens=3))
    assert set(r.token_versions) == {1}
    await engines.generation.aclose()
    await engines.trainer.aclose()


async def test_a_non_finite_gradient_skips_its_update_and_is_counted(model_cache: Path) -> None:
    cfg = config("algorithm.staleness_correction=behaviour", "async_training.require_batches=2", "trainer.warmup_steps=0")
    batch = await rollout_batch(cfg)
    batch[0].trajectories[0].behaviour_logprobs[0] = float("nan")  # poisons the first mini-batch only
    trainer = await started_trainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    m = await trainer.train_step(batch, version=0)
    assert m["train/skipped_updates"] == 1 and m["train/updates"] == 2
    assert math.isnan(m["train/grad_norm"]) and m["train/lr"] == pytest.approx(cfg.trainer.lr)  # the 2nd was taken
    changed = [not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)]
    assert any(changed)  # only the healthy mini-batch moved the weights...
    batch[2].trajectories[0].behaviour_logprobs[0] = float("nan")  # ...now both are poisoned
    after_one = [p.detach().clone() for p in trainer.model.parameters()]
    m = await trainer.train_step(batch, version=0)
    assert m["train/skipped_updates"] == 2 and m["train/lr"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(after_one, trainer.model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    await trainer.aclose()


async def test_mismatch_kl_is_zero_on_the_engines_own_weights_and_positive_on_other_ones(model_cache: Path) -> None:
    """The engine's sampling logprobs and the trainer's recomputation agree (is/mismatch_kl ≈ 0, only
    float noise), and the metric sees a real difference in weights."""
    cfg = config("rollout.temperature=0.7")
    same = await rollout_batch(cfg)
    tokens = sum(len(t.response_tokens) for s in same for t in s.trajectories)
    m = await (await started_trainer(cfg)).train_step(same, version=0)
    assert m["is/mismatch_tokens"] == tokens
    assert 0.0 <= m["is/mismatch_kl"] < 1e-8  # logprobs equal up to float noise (~1e-6): its square
    perturbed = await rollout_batch(cfg, perturb=0.02)
    trainer = await started_trainer(cfg)
    m = await trainer.train_step(perturbed, version=0)
    assert m["is/mismatch_kl"] > 1e-3
    m = await trainer.train_step(perturbed, version=1)  # no token is from the trainer's version 1
    assert m["is/mismatch_tokens"] == 0 and "is/mismatch_kl" not in m
    await trainer.aclose()
