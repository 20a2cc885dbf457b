"""CPU-checkable parts of the GPU path: placement, vLLM absence, the generation engine's
streaming/abort bookkeeping over a fake AsyncLLM, and FSDP2 training over gloo: one rank's step
equals the CPU trainer's (loss, grad norm, weights, metric keys), and 2 ranks equal 1 rank."""

from __future__ import annotations

import json
import random
import types
from typing import Any

import anyio
import pytest
import torch

from asyncpolicy.config import Config, load_config
from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.transport import cuda
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.engines.protocols import GenerationRequest
from asyncpolicy.engines.training.step import StepRunner
from asyncpolicy.models.stop_ids import stop_token_ids
from asyncpolicy.engines.sets.vllm_fsdp import place
from asyncpolicy.engines.generation.vllm import VLLMGenerationEngine, VLLMSettings, import_vllm
from asyncpolicy.errors import ConfigError
from asyncpolicy.bench.synthetic import random_batch


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # vLLM's AsyncLLM is asyncio-only


def test_placement_disjoint_and_colocated() -> None:
    cfg = load_config(overrides=["rollout.n_gpus_per_node=2", "trainer.n_gpus_per_node=2"])
    assert place(cfg, 4) == ([0, 1], [2, 3])
    with pytest.raises(ConfigError, match="need 4 GPU"):
        place(cfg, 2)
    col = load_config(overrides=["rollout.colocate=true"])
    assert place(col, 1) == ([0], [0])
    with pytest.raises(ConfigError, match="ONE GPU"):
        place(load_config(overrides=["rollout.colocate=true", "trainer.n_gpus_per_node=2"]), 4)


def test_stop_token_ids_from_model_dir(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert stop_token_ids(str(tmp_path)) == [5, 7]


def test_vllm_engine_takes_the_embedded_model_from_its_saved_directory(tmp_path) -> None:
    from pathlib import Path

    from transformers import AutoConfig

    from asyncpolicy.models.cache import has_weights
    from asyncpolicy.models.tiny import resolve_model_path

    gpu_keys = ["rollout.engine=vllm", "trainer.engine=fsdp"]
    path = resolve_model_path(load_config(overrides=[*gpu_keys, "model.path=embedded"]))
    # a Hugging Face directory with weights: vLLM loads them (no dummy weights), EOS as the tokenizer's
    assert Path(path, "config.json").is_file() and has_weights(path)
    assert AutoConfig.from_pretrained(path).eos_token_id in stop_token_ids(path)
    with pytest.raises(ConfigError, match="'model.path'.*is not a directory"):
        resolve_model_path(load_config(overrides=[*gpu_keys, f"model.path={tmp_path / 'absent'}"]))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="'model.path': no tokenizer file"):
        resolve_model_path(load_config(overrides=[*gpu_keys, f"model.path={tmp_path}"]))


def test_vllm_settings_stop_at_the_models_and_the_tokenizers_eos_and_seed_replicas_apart(tmp_path) -> None:
    """The one builder of a vLLM engine's settings, for a run's engines and a rollout server's alike."""
    from asyncpolicy.engines.generation.vllm import vllm_settings
    from asyncpolicy.models.tiny import resolve_model_path

    cfg = load_config(overrides=["rollout.engine=vllm", "trainer.engine=fsdp", "seed=5", "rollout.enforce_eager=true"])
    path = resolve_model_path(cfg)  # the embedded model: it has weights
    first, third = vllm_settings(cfg, path, [0], 777), vllm_settings(cfg, path, [2, 3], None, replica=2)
    assert first.stop_token_ids == [*stop_token_ids(path), 777] and third.stop_token_ids == stop_token_ids(path)
    assert (first.seed, third.seed, third.gpus) == (5, 7, [2, 3]) and first.enforce_eager and not first.dummy_weights
    assert first.max_model_len == cfg.data.max_prompt_length + cfg.data.max_response_length + 8
    (tmp_path / "config.json").write_text('{"eos_token_id": 3}')
    bare = vllm_settings(cfg, str(tmp_path), [0], 3)
    assert bare.dummy_weights and bare.stop_token_ids == [3]


def test_missing_vllm_is_a_config_error() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install asyncpolicy\[vllm\]"):
            import_vllm()
    else:
        pytest.skip("vllm is installed here")


class _Out:
    def __init__(self, toks: list[int], finished: bool, reason: str | None) -> None:
        lp = [{t: types.SimpleNamespace(logprob=-0.5)} for t in toks]  # a copy; fine for the test
        self.outputs = [types.SimpleNamespace(token_ids=toks, logprobs=lp, finish_reason=reason)]
        self.finished = finished


class FakeLLM:
    """Streams one token per 10 ms (CUMULATIVE outputs, as vLLM: one growing list) until max_tokens;
    `abort` ends a stream with an 'abort' output holding every token so far."""

    def __init__(self) -> None:
        self.aborted: set[str] = set()
        self.emitted = 0  # tokens streamed so far, all requests
        self.prompts: list[dict] = []
        self.paused = False

    async def pause_generation(self, mode: str, clear_cache: bool) -> None:
        assert mode == "keep" and not clear_cache
        self.paused = True

    async def resume_generation(self) -> None:
        self.paused = False

    def generate(self, prompt, n_tokens, request_id):
        self.prompts.append(prompt)

        async def stream():
            toks: list[int] = []
            for i in range(n_tokens):
                await anyio.sleep(0.01)
                if request_id in self.aborted:
                    yield _Out(toks, True, "abort")
                    return
                toks.append(100 + i)
                self.emitted += 1
                yield _Out(toks, i == n_tokens - 1, "length" if i == n_tokens - 1 else None)

        return stream()

    async def abort(self, request_id):
        self.aborted.update([request_id] if isinstance(request_id, str) else request_id)


class _EngineOverFake(VLLMGenerationEngine):
    def _sampling_params(self, request: GenerationRequest, max_tokens: int) -> Any:
        return max_tokens  # the fake takes a token count, not vLLM's SamplingParams


def _engine() -> VLLMGenerationEngine:
    eng = _EngineOverFake(VLLMSettings(model_path="x", gpus=[0], dummy_weights=True, stop_token_ids=[1], max_model_len=64))
    eng._llm = FakeLLM()
    eng._abort = anyio.Event()
    eng._ready.set()
    return eng


async def tokens_streamed(eng: VLLMGenerationEngine, n: int) -> None:
    """Wait until the fake has streamed `n` more tokens: a point in the stream, not a point in time."""
    target = eng.llm.emitted + n
    with anyio.fail_after(10):
        while eng.llm.emitted < target:
            await anyio.sleep(0.001)


@pytest.mark.anyio
async def test_prefix_cache_is_salted_by_the_weights_that_compute_it() -> None:
    """No cache reset on a sync: a request under new weights must never share cached KV with older ones."""
    eng = _engine()
    await eng.generate(GenerationRequest(request_id="a", prompt_tokens=[1], max_tokens=1))
    await eng.generate(GenerationRequest(request_id="b", prompt_tokens=[1], max_tokens=1))
    eng.set_version(1)
    await eng.generate(GenerationRequest(request_id="c", prompt_tokens=[1], max_tokens=1))
    eng.incarnation += 1  # a restarted engine: same version number, new weights
    await eng.generate(GenerationRequest(request_id="d", prompt_tokens=[1], max_tokens=1))
    salts = [p["cache_salt"] for p in eng.llm.prompts]
    assert salts[0] == salts[1]  # one version's requests share prefixes (a GRPO group)
    assert len({salts[1], salts[2], salts[3]}) == 3


class _PackingTrainer:
    """The two calls a flat transport makes of the FSDP engine, counted."""

    def __init__(self) -> None:
        self.packs = 0
        self.meta = [("w", [2, 2], 0, 4)]

    async def pack(self):
        self.packs += 1
        return self.meta


class _RecordingTransport(cuda._FlatTransport):
    kind = "test"

    def __init__(self, generation, trainer, fail: bool = False) -> None:
        super().__init__(generation, trainer)
        self.engine = generation
        self.fail = fail
        self.paused_during_transfer: list[bool] = []

    async def _transfer(self, meta, targets):
        self.paused_during_transfer.append(self.engine.llm.paused)
        if self.fail:
            raise RuntimeError("link down")
        return {k: 0.0 for k, _ in targets}, {}


@pytest.mark.anyio
async def test_flat_transport_packs_in_stage_and_holds_generation_only_for_the_hand_over() -> None:
    eng, trainer = _engine(), _PackingTrainer()
    transport = _RecordingTransport(eng, trainer)
    await transport.stage(1)
    assert trainer.packs == 1 and not eng.llm.paused
    await transport.push(1)
    assert trainer.packs == 1, "push re-packed weights that were staged for its version"
    assert transport.paused_during_transfer == [True] and not eng.llm.paused
    assert eng.version == 1
    t = transport.last
    assert t is not None and t.version == 1 and t.bytes == 8
    assert t.pause_to_resume_s == pytest.approx(t.engine_pause_s + t.transfer_load_s + t.resume_s, abs=1e-6)
    await transport.push(2)  # not staged (a forced push): packs itself
    assert trainer.packs == 2 and eng.version == 2

    failing = _RecordingTransport(eng, trainer, fail=True)
    with pytest.raises(RuntimeError, match="link down"):
        await failing.push(3)
    assert not eng.llm.paused and eng.version == 2  # resumed, and still serving the old version


@pytest.mark.anyio
async def test_generate_labels_versions_and_abort_returns_partial() -> None:
    eng = _engine()
    res = await eng.generate(GenerationRequest(request_id="a", prompt_tokens=[1], max_tokens=5))
    assert res.finish_reason == "length" and len(res.response_tokens) == 5
    assert res.token_versions == [0] * 5 and res.behaviour_logprobs == [-0.5] * 5

    results = []

    async def run() -> None:
        results.append(await eng.generate(GenerationRequest(request_id="b", prompt_tokens=[1], max_tokens=500)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await tokens_streamed(eng, 3)
        await eng.abort_all()
    part = results[0]
    assert part.finish_reason == "abort" and 0 < len(part.response_tokens) < 500
    eng.set_version(3)
    cont = await eng.generate(
        GenerationRequest(
            request_id="b", prompt_tokens=[1], max_tokens=len(part.response_tokens) + 4,
            response_tokens=part.response_tokens, behaviour_logprobs=part.behaviour_logprobs, token_versions=part.token_versions,
        )
    )
    assert cont.finish_reason == "length"
    assert cont.token_versions == part.token_versions + [3] * 4


@pytest.mark.anyio
async def test_tokens_observed_after_a_version_change_carry_the_new_version() -> None:
    eng = _engine()
    results = []

    async def run() -> None:
        results.append(await eng.generate(GenerationRequest(request_id="c", prompt_tokens=[1], max_tokens=40)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await tokens_streamed(eng, 5)
        eng.set_version(1)
    res = results[0]
    assert res.finish_reason == "length" and len(res.token_versions) == 40
    first_new = res.token_versions.index(1)
    assert 0 < first_new < 40 and res.token_versions == [0] * first_new + [1] * (40 - first_new)


def _config(*overrides: str) -> Config:
    return load_config(overrides=["trainer.threads=1", "trainer.micro_batch_size=2", "trainer.lr=1e-3",
                                  "trainer.warmup_steps=0", "data.train_batch_size=3", "rollout.n=3", *overrides])


def _sharded(cfg: Config, rank: int, world: int) -> w._ShardedStep:
    return w._ShardedStep(cfg, None, None, None, None, torch.device("cpu"), 0, world, rank=rank, dist=None)


def test_ranks_get_the_same_number_of_micro_batches_and_one_rank_gets_the_cpu_trainers() -> None:
    cfg = _config()
    lengths = [random.Random(3).randint(2, 30) for _ in range(9)]
    shards = [_sharded(cfg, r, 2).micro_batches(range(9), lengths) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3 and shards[1][-1] == []  # 4 rows on rank 1: padded
    assert sorted(i for s in shards for mb in s for i in mb) == list(range(9))
    cpu = StepRunner(cfg, None, None, None, None, torch.device("cpu"), 0)  # type: ignore[arg-type]
    assert _sharded(cfg, 0, 1).micro_batches(range(9), lengths) == cpu.micro_batches(range(9), lengths)


def _fsdp_weights(directory: str, out: str) -> dict[str, torch.Tensor]:
    """The model weights of an FSDP checkpoint (torch.distributed.checkpoint format), read offline."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(directory, out)
    return torch.load(out, weights_only=False)["model"]


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
@pytest.mark.anyio
async def test_a_one_rank_fsdp_step_equals_the_cpu_trainers(tmp_path, monkeypatch, kl_coef: float) -> None:
    """Same config, same batches (two mini-batches, tokens of two versions, then a poisoned one whose
    update is skipped): equal metrics with equal keys, equal grad norms and equal weights after."""
    from asyncpolicy.engines.sets.hf_torch import build_hf_torch_engines
    from asyncpolicy.models.tiny import load_model, resolve_model_path

    monkeypatch.setenv("ASYNCPOLICY_CACHE", str(tmp_path / "cache"))
    # float64: the two trainers sum in different orders, and Adam would lift float32's machine-dependent
    # noise to lr-sized steps where a gradient is zero in exact arithmetic (k_proj's bias)
    cfg = _config(f"algorithm.kl_coef={kl_coef}", "async_training.require_batches=3", "rollout.temperature=0.8",
                  "model.dtype=float64")
    path = resolve_model_path(cfg)
    poisoned = random_batch(2, tokens=range(40), versions=(1, 2))
    poisoned[0].trajectories[0].behaviour_logprobs[0] = float("nan")  # the first update's gradient is NaN
    steps = [(random_batch(0, tokens=range(40), versions=(0, 1)), 1), (random_batch(1, tokens=range(40), versions=(1, 2)), 2), (poisoned, 2)]

    cpu = build_hf_torch_engines(cfg).trainer
    await cpu.start()
    fsdp = FSDPTrainEngine(w.WorkerInit(model_path=path, config=cfg), [None], timeout_s=120)
    await fsdp.start()
    try:
        for batch, version in steps:
            a, b = await cpu.train_step(batch, version), await fsdp.train_step(batch, version)
            assert set(a) == set(b)
            for key in a:
                if not key.startswith("perf/"):
                    assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12, nan_ok=True), key
        assert a["train/skipped_updates"] == 1 and a["train/updates"] == 9
        assert "is/mismatch_kl" in a and ("losses/kl_ref" in a) == (kl_coef > 0)
        await fsdp.save_state(str(tmp_path / "fsdp"))
        sharded = _fsdp_weights(str(tmp_path / "fsdp"), str(tmp_path / "fsdp.pt"))
    finally:
        await fsdp.aclose()
    if kl_coef > 0:
        assert a["losses/kl_ref"] > 0
    local = cpu.step.policy.state_dict()
    names = [n for n, _ in cpu.step.policy.named_parameters()]
    assert names and set(names) <= set(sharded)
    for name in names:
        assert torch.allclose(sharded[name], local[name], rtol=0, atol=1e-9), name
    initial = load_model(path).state_dict()
    assert all(not torch.equal(initial[name.removeprefix("model.")], local[name]) for name in names)  # both trained
    await cpu.aclose()


@pytest.mark.slow
@pytest.mark.anyio
async def test_fsdp_two_ranks_match_one_rank(tmp_path) -> None:
    """Gradient accumulation over micro-batches AND ranks gives the same step as one rank: with
    micro-batches of a fixed count of rows, and packed under a token budget (the ranks then
    run different row counts in the same number of micro-batches)."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 200,
        "max_position_embeddings": 64, "tie_word_embeddings": True,
    }))
    cfg = _config("trainer.lr=1e-2", "async_training.require_batches=3", "algorithm.kl_coef=0.1", "model.dtype=float64")
    packed = _config("trainer.lr=1e-2", "async_training.require_batches=3", "algorithm.kl_coef=0.1", "model.dtype=float64",
                     "trainer.max_tokens_per_micro_batch=12", "trainer.packing=true", "trainer.logprob_chunk_tokens=4")
    runs: dict[str, list[dict[str, float]]] = {}
    for name, world, c in (("one", 1, cfg), ("two", 2, cfg), ("two_packed", 2, packed)):
        eng = FSDPTrainEngine(w.WorkerInit(model_path=str(tmp_path), config=c), [None] * world, timeout_s=120)
        await eng.start()
        try:
            runs[name] = [await eng.train_step(random_batch(0, versions=(0, 1)), s) for s in range(2)]
        finally:
            await eng.aclose()
    assert runs["two"][1]["losses/kl_ref"] > 0 and runs["two"][1]["is/mismatch_tokens"] > 0
    for name in ("two", "two_packed"):
        for one, two in zip(runs["one"], runs[name], strict=True):
            assert set(one) == set(two)
            for key in one:
                if not key.startswith("perf/"):
                    assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), (name, key)
