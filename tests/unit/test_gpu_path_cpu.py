"""CPU-checkable parts of the GPU path: placement, vLLM absence, the generation engine's
streaming/abort bookkeeping over a fake AsyncLLM, and FSDP2 training over gloo (2 ranks = 1 rank)."""

from __future__ import annotations

import json
import random
import types
from typing import Any

import anyio
import pytest

from asyncpolicy.config import load_config
from asyncpolicy.engines import fsdp_worker as w
from asyncpolicy.engines import weight_sync
from asyncpolicy.engines.protocols import GenerationRequest
from asyncpolicy.engines.vllm_fsdp import place, stop_token_ids
from asyncpolicy.engines.vllm_generation import VLLMGenerationEngine, VLLMSettings, import_vllm
from asyncpolicy.errors import ConfigError
from asyncpolicy.samples import Prompt, Trajectory, make_sample


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

    from asyncpolicy.engines.vllm_fsdp import has_weights, resolve_vllm_model

    gpu_keys = ["rollout.engine=vllm", "trainer.engine=fsdp"]
    path = resolve_vllm_model(load_config(overrides=[*gpu_keys, "model.path=embedded"]))
    # a Hugging Face directory with weights: vLLM loads them (no dummy weights), EOS as the tokenizer's
    assert Path(path, "config.json").is_file() and has_weights(path)
    assert AutoConfig.from_pretrained(path).eos_token_id in stop_token_ids(path)
    with pytest.raises(ConfigError, match="'model.path'.*is not a directory"):
        resolve_vllm_model(load_config(overrides=[*gpu_keys, f"model.path={tmp_path / 'absent'}"]))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="'model.path': no tokenizer file"):
        resolve_vllm_model(load_config(overrides=[*gpu_keys, f"model.path={tmp_path}"]))


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


class _RecordingTransport(weight_sync._FlatTransport):
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


def _batch(seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(3):
        p = Prompt(index=i, epoch=0, text="", tokens=[rng.randrange(200) for _ in range(4)])
        trajs = []
        for _ in range(3):
            n = rng.randint(1, 6)
            trajs.append(Trajectory(response_tokens=[rng.randrange(200) for _ in range(n)], behaviour_logprobs=[-5.3] * n,
                                    token_versions=[0] * n, finish_reason="stop", reward=rng.random()))
        out.append(make_sample(p, trajs, 0))
    return out


def test_shard_rows_gives_every_rank_the_same_number_of_micro_batches() -> None:
    rows = w.build_rows(_batch(0), "grpo", True)
    shards = [w.shard_rows(rows, r, 2, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    assert sorted(len(r.input_ids) for s in shards for mb in s for r in mb) == sorted(len(r.input_ids) for r in rows)


@pytest.mark.slow
@pytest.mark.anyio
async def test_fsdp_two_ranks_match_one_rank(tmp_path) -> None:
    """Gradient accumulation over micro-batches AND ranks gives the same step as one rank."""
    from asyncpolicy.engines.fsdp_trainer import FSDPTrainEngine

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 200,
        "max_position_embeddings": 64, "tie_word_embeddings": True,
    }))
    losses = {}
    for world in (1, 2):
        base = w.WorkerInit(rank=0, world_size=1, gpu=None, master_port=0, model_path=str(tmp_path), lr=1e-2, micro_batch_size=2)
        eng = FSDPTrainEngine(base, [None] * world, timeout_s=120)
        await eng.start()
        try:
            losses[world] = [(await eng.train_step(_batch(0), s))["losses/loss"] for s in range(2)]
        finally:
            await eng.aclose()
    assert losses[1] == pytest.approx(losses[2], rel=1e-4, abs=1e-6)
