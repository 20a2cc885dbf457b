"""`python -m asyncpolicy bench gpu`: the GPU path's figures, one function per section.

Sections (each independent; a failing one is recorded with its traceback and the rest still run):
  gen    generation tokens/s: bare vLLM AsyncLLM vs asyncpolicy's VLLMGenerationEngine, same
         engine, same prompts, fixed lengths (EOS ignored); then abort and continue a response
  ipc    colocated: a trainer rank on vLLM's GPU, CUDA IPC weight sync (pause → resume), checksums
  nccl   disjoint: vLLM on GPU 0, trainer on GPU 1: the bare broadcast, then NCCL weight syncs
  train  FSDP2 trainer tokens/s, MFU and peak memory, one rank: batches of 16, 64 and 256
         sequences of 128 + 512 tokens, per variant (packing on/off, torch.compile on/off,
         micro-batches of at most --train-max-tokens tokens); one trainer per variant
  fsdp2  the same over 2 ranks (GPUs 0 and 1), and each figure ÷ the one-rank one when both ran
  async  the Supervisor, as users run it: the same run (same steps, same engines) with
         staleness_threshold=0 (generate → train → sync) and with staleness ≥ 1 (overlapped);
         measured generation time per batch g and training time per step t, the ideal speedup
         (g + t) / max(g, t), and the achieved fraction of it

Every section takes its engines from a factory: `GPUEngines` (vLLM + FSDP2 on CUDA) for the
benchmark, `CPUPlumbing` for the CPU test that runs every section at tiny sizes so an arity or
name error anywhere fails CI. `CPUPlumbing` is the simulated generation engine with the methods
the weight transports call on vLLM (`HostGeneration`) and the real FSDP2 trainer over gloo; what
the CPU cannot do (CUDA IPC handles, NCCL) becomes a host copy of the same flat buffer, through
the same pack → handle → load-by-meta path (`HostCopyTransport`).

Model: Qwen2.5-0.5B's shape with random weights (config and a small local tokenizer, no hub);
vLLM starts with dummy weights and gets the real ones through the sync. `--make-model DIR` writes
that directory and exits (the e2e script uses it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import anyio
import anyio.lowlevel
import anyio.to_thread
import msgspec
import structlog

from asyncpolicy.bench.common import (
    WARMUP,
    BenchContext,
    ScenarioRun,
    configure_bench_logging,
    detect_machine,
    new_results_dir,
    run_supervised,
    steady_step_s,
)
from asyncpolicy.config import Config, SimulatedRolloutConfig, load_config
from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.engines.protocols import EngineSet, GenerationRequest, GenerationResult
from asyncpolicy.engines.simulated import SimulatedGenerationEngine
from asyncpolicy.engines.transport.cuda import IPCTransport
from asyncpolicy.errors import ConfigError
from asyncpolicy.bench.synthetic import random_batch
from asyncpolicy.samples import Sample

log = structlog.get_logger("asyncpolicy.bench.gpu")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

QWEN05: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21, "attention_dropout": 0.0,
}
# The bench's trainers: fp32 master weights, an LR small enough that random weights stay sane, decoupled PPO.
TRAINER_OVERRIDES = (
    "model.dtype=float32", "model.gradient_checkpointing=true", "trainer.lr=1e-6", "trainer.warmup_steps=0",
    "algorithm.staleness_correction=decoupled",
)
# The CPU test's model: the same architecture, small enough to train over gloo in well under a second.
TINY_QWEN: dict[str, Any] = {
    **QWEN05, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 200, "max_position_embeddings": 256, "max_window_layers": 2,
    "bos_token_id": 1, "eos_token_id": 0,
}


def make_model_dir(path: str, config: dict[str, Any] | None = None, tokenizer: bool = True) -> str:
    """A model directory with `config` (Qwen2.5-0.5B's by default) and no weights; with `tokenizer`,
    a small byte-level BPE tokenizer trained here (no hub), whose special-token ids replace the config's."""
    cfg = dict(config or QWEN05)
    os.makedirs(path, exist_ok=True)
    if tokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        corpus = [" ".join(str(i) for i in range(k, k + 50)) + " reverse copy add the = + - ?" for k in range(0, 2000, 50)]
        tok.train_from_iterator(
            corpus,
            trainers.BpeTrainer(
                vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            ),
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>")
        fast.save_pretrained(path)
        # EOS must mean the same token to the tokenizer, vLLM and the trainer
        cfg.update(eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": cfg["eos_token_id"], "bos_token_id": cfg["bos_token_id"]}, f)
    return path


def gpu_memory() -> list[dict[str, Any]]:
    """Per-GPU memory and utilisation from nvidia-smi; empty without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.used,memory.total,utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.strip().splitlines():
        i, name, used, total, util = [x.strip() for x in line.split(",")]
        rows.append({"gpu": int(i), "name": name, "used_GiB": round(int(used) / 1024, 1), "total_GiB": round(int(total) / 1024, 1), "util_pct": int(util)})
    return rows


# -- settings ------------------------------------------------------------------------------------


SECTION_NAMES = ("gen", "ipc", "nccl", "train", "fsdp2", "async")
VLLM_SECTIONS = {"gen", "ipc", "nccl", "async"}  # train and fsdp2 need only torch


class GPUBenchSettings(msgspec.Struct, kw_only=True):
    """Sizes of every section; the defaults are the recorded GPU figures' (benchmarks/RESULTS.md)."""

    model_dir: str = "/tmp/qwen05-shape"
    sections: list[str] = msgspec.field(default_factory=lambda: ["gen", "ipc", "train"])
    util: float = 0.35  # vLLM gpu_memory_utilization
    trainer_gpu: int = 0  # the `train` section's GPU
    eager: bool = False  # vLLM without CUDA graphs
    gen_prompts: int = 256
    gen_prompt_len: int = 128
    gen_len: int = 512
    gen_reps: int = 2  # alternating bare / engine pairs: drift hits both alike
    abort_len: int = 1800  # responses long enough to be running when abort_all comes
    abort_after_s: float = 1.0
    sync_reps: int = 6
    train_seqs: list[int] = msgspec.field(default_factory=lambda: [16, 64, 256])  # sequences per step, rollout.n = train_n
    train_n: int = 4
    train_prompt_len: int = 128
    train_len: int = 512
    train_len_min: int = 0  # > 0: response lengths uniform in [train_len_min, train_len] (packing's case); 0 = all train_len
    train_steps: int = 5
    # the fastest layout measured on one H200 within the memory of the old one (RESULTS.md); sdpa packing is slower
    train_packing: list[bool] = msgspec.field(default_factory=lambda: [False])
    train_compile: list[bool] = msgspec.field(default_factory=lambda: [True])
    train_max_tokens: int = 16384  # trainer.max_tokens_per_micro_batch; 0 = micro_batch_size sequences (the first trainer's)
    train_recompute: bool = False  # model.gradient_checkpointing
    train_attn: str = "sdpa"  # trainer.attn_implementation: packed rows want flash_attention_2 (varlen) or flex_attention
    micro_batch_size: int = 16
    async_prompts: int = 32  # data.train_batch_size of the supervised runs
    async_n: int = 4
    async_len: int = 512  # data.max_response_length
    async_steps: int = 8
    async_staleness: int = 1


def cpu_settings(model_dir: str, sections: list[str] | None = None) -> GPUBenchSettings:
    """Tiny sizes for `CPUPlumbing`: every section in well under a minute on 2 cores."""
    return GPUBenchSettings(
        model_dir=model_dir, sections=list(sections or SECTION_NAMES), gen_prompts=8, gen_prompt_len=4, gen_len=12,
        gen_reps=1, abort_len=64, abort_after_s=0.02, sync_reps=2, train_seqs=[4, 8], train_n=2, train_prompt_len=4,
        train_len=6, train_len_min=2, train_steps=2, train_packing=[False, True], train_compile=[False], train_max_tokens=24,
        micro_batch_size=4,  # compile: a minute per variant on a CPU, in the slow test
        async_prompts=2, async_n=2, async_len=6,
        async_steps=WARMUP + 3, async_staleness=1,
    )


def vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def fixed_batch(groups: int, n: int, prompt_len: int, resp_len: int, vocab: int, seed: int, min_len: int = 0) -> list[Sample]:
    """`groups` samples of `n` responses of exactly `resp_len` tokens (of `min_len`..`resp_len`
    tokens, seeded, when `min_len` > 0), sampled by the uniform policy: a training batch of known size."""
    uniform = -math.log(vocab)
    return random_batch(
        seed, groups=groups, n=n, prompt_len=(prompt_len, prompt_len), response_len=(min_len or resp_len, resp_len),
        tokens=range(vocab), logprob=(uniform, uniform), finish_reason="length",
    )


# -- engine factories ----------------------------------------------------------------------------


class BenchEngines(Protocol):
    """What the sections need: started engines (cached, closed by `release`) and fresh engine sets."""

    settings: GPUBenchSettings
    vocab: int

    async def generation(self) -> Any:
        """The vLLM-shaped generation engine on GPU 0, started once."""
        ...

    async def trainer(self, gpus: list[int], overrides: tuple[str, ...] = ()) -> FSDPTrainEngine:
        """An FSDP2 trainer over `gpus` with config `overrides`, started once per placement and overrides."""
        ...

    async def drop_trainer(self, gpus: list[int], overrides: tuple[str, ...] = ()) -> None: ...

    def transport(self, kind: str, generation: Any, trainer: FSDPTrainEngine) -> Any:
        """The weight transport of `kind` ("ipc" or "nccl") between the two."""
        ...

    async def bare_batch(self, generation: Any, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[int, float]:
        """(tokens, seconds) of the prompts generated by the engine underneath, without asyncpolicy's wrapper."""
        ...

    def run_overrides(self) -> list[str]:
        """Config overrides of the supervised runs (engines, model, placement, sizes)."""
        ...

    def engine_set(self, cfg: Config) -> EngineSet:
        """Fresh engines for one supervised run (the Supervisor starts and closes them)."""
        ...

    async def release(self) -> None:
        """Close every engine started so far."""
        ...


class _EngineCache:
    """Started engines of one bench, closed together on every way out (an async context manager)."""

    def __init__(self, settings: GPUBenchSettings) -> None:
        self.settings = settings
        self.vocab = vocab_size(settings.model_dir)
        self._generation: Any = None
        self._trainers: dict[tuple[tuple[int | None, ...], tuple[str, ...]], FSDPTrainEngine] = {}

    def _new_generation(self) -> Any:
        raise NotImplementedError

    def _trainer_gpus(self, gpus: list[int]) -> list[int | None]:
        return list(gpus)

    def _worker_init(self, overrides: tuple[str, ...] = ()) -> w.WorkerInit:
        s = self.settings
        cfg = load_config(overrides=[*TRAINER_OVERRIDES, f"trainer.micro_batch_size={s.micro_batch_size}", *overrides])
        return w.WorkerInit(model_path=s.model_dir, config=cfg)

    async def generation(self) -> Any:
        if self._generation is None:
            gen = self._new_generation()
            await gen.start()
            self._generation = gen
            log.info("bench_gpu_engine", engine="generation", start_s=round(gen.start_s, 1))
        return self._generation

    async def trainer(self, gpus: list[int], overrides: tuple[str, ...] = ()) -> FSDPTrainEngine:
        placed = self._trainer_gpus(gpus)
        key = (tuple(placed), overrides)
        if key not in self._trainers:
            init = self._worker_init(overrides)
            t = FSDPTrainEngine(init, placed, timeout_s=600)
            t0 = time.perf_counter()
            try:
                await t.start()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await t.aclose()
                raise
            self._trainers[key] = t
            log.info("bench_gpu_engine", engine="trainer", gpus=gpus, overrides=list(overrides), start_s=round(time.perf_counter() - t0, 1), params_M=round(t.n_params / 1e6, 2))
        return self._trainers[key]

    async def drop_trainer(self, gpus: list[int], overrides: tuple[str, ...] = ()) -> None:
        t = self._trainers.pop((tuple(self._trainer_gpus(gpus)), overrides), None)
        if t is not None:
            await _close(t)

    async def release(self) -> None:
        trainers, self._trainers = list(self._trainers.values()), {}
        gen, self._generation = self._generation, None
        for engine in [*trainers, gen]:
            if engine is not None:
                await _close(engine)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.release()


async def _close(engine: Any) -> None:
    """Close an engine, bounded and shielded; a failure to close is logged, never raised over the result."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(120):
        try:
            await engine.aclose()
        except Exception as exc:
            log.warning("bench_gpu_close_failed", engine=type(engine).__name__, error=repr(exc))


class GPUEngines(_EngineCache):
    """vLLM on GPU 0 (dummy weights, EOS ignored: fixed lengths), FSDP2 trainers on the GPUs asked for."""

    def _new_generation(self) -> Any:
        from asyncpolicy.models.stop_ids import stop_token_ids
        from asyncpolicy.engines.generation.vllm import VLLMGenerationEngine, VLLMSettings

        s = self.settings
        return VLLMGenerationEngine(VLLMSettings(
            model_path=s.model_dir, gpus=[0], dummy_weights=True, stop_token_ids=stop_token_ids(s.model_dir),
            max_model_len=2048, gpu_memory_utilization=s.util, max_num_seqs=256, ignore_eos=True, enforce_eager=s.eager,
        ))

    def transport(self, kind: str, generation: Any, trainer: FSDPTrainEngine) -> Any:
        from asyncpolicy.engines.transport.cuda import NCCLTransport

        return IPCTransport(generation, trainer) if kind == "ipc" else NCCLTransport(generation, trainer)

    async def bare_batch(self, generation: Any, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[int, float]:
        from vllm import SamplingParams, TokensPrompt

        sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, logprobs=0, detokenize=False, ignore_eos=True)
        llm = generation.llm
        counts = [0] * len(prompts)

        async def one(i: int, p: list[int]) -> None:
            last = None
            async for o in llm.generate(TokensPrompt(prompt_token_ids=p), sp, request_id=f"{tag}-{i}"):
                last = o
            if last is None:
                raise RuntimeError(f"bare vLLM returned no output for request {tag}-{i}")
            c = last.outputs[0]
            if len(c.logprobs) != len(c.token_ids):
                raise RuntimeError(f"bare vLLM returned {len(c.token_ids)} tokens but {len(c.logprobs)} logprobs")
            counts[i] = len(c.token_ids)

        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i, p in enumerate(prompts):
                tg.start_soon(one, i, p)
        return sum(counts), time.perf_counter() - t

    def run_overrides(self) -> list[str]:
        import torch

        s = self.settings
        two = torch.cuda.device_count() >= 2  # counts devices without creating a CUDA context
        return [
            "rollout.engine=vllm", "trainer.engine=fsdp", f"model.path={s.model_dir}", "model.dtype=float32",
            "rollout.n_gpus_per_node=1", "trainer.n_gpus_per_node=1", f"rollout.colocate={str(not two).lower()}",
            f"rollout.gpu_memory_utilization={s.util}", f"rollout.enforce_eager={str(s.eager).lower()}",
            f"data.train_batch_size={s.async_prompts}", f"rollout.n={s.async_n}", f"data.max_response_length={s.async_len}",
            "data.max_prompt_length=64", f"rollout.max_concurrency={2 * s.async_prompts * s.async_n}",
            f"async_training.max_queue_size={4 * s.async_prompts}", f"trainer.micro_batch_size={s.micro_batch_size}",
            "trainer.lr=1e-6", "seed=0",
        ]

    def engine_set(self, cfg: Config) -> EngineSet:
        from asyncpolicy.engines.sets.vllm_fsdp import build_vllm_fsdp_engines

        return build_vllm_fsdp_engines(cfg)


class HostGeneration(SimulatedGenerationEngine):
    """The simulated engine plus what the weight transports call on vLLM, done on the host.

    `rpc("ap_ipc_load", handle, meta)` rebuilds the trainer's flat buffer from its handle (of a
    CPU tensor: a copy) and keeps views of it by `meta`, as vLLM's workers do
    (`vllm_worker_ext._views`); `rpc("ap_checksum")` sums them as the workers sum their parameters.
    """

    def __init__(self, cfg: SimulatedRolloutConfig, rng: random.Random) -> None:
        super().__init__(cfg, rng)
        self.incarnation = 0
        self.start_s = 0.0
        self.paused = False
        self._weights: list[tuple[str, Any]] = []

    async def start(self) -> None:
        t0 = time.perf_counter()
        await super().start()
        self.incarnation += 1
        self.start_s = time.perf_counter() - t0

    async def wait_ready(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def pause(self) -> None:
        self.paused = True
        await anyio.lowlevel.checkpoint()

    async def resume(self) -> None:
        self.paused = False
        await anyio.lowlevel.checkpoint()

    async def rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """One 'worker' answers, off the event loop, as vLLM's collective_rpc returns one answer per worker."""
        handlers: dict[str, Callable[..., Any]] = {"ap_ipc_load": self._ipc_load, "ap_checksum": self._checksum}
        handler = handlers.get(method)
        if handler is None:
            raise RuntimeError(f"HostGeneration has no worker method {method!r}")
        with anyio.fail_after(timeout or 300):
            return [await anyio.to_thread.run_sync(handler, *args)]

    def _ipc_load(self, handle: bytes, meta: list[tuple[str, list[int], int, int]]) -> int:
        from torch.multiprocessing.reductions import rebuild_tensor

        from asyncpolicy.engines.generation.vllm_worker_ext import _views

        flat = rebuild_tensor(*pickle.loads(handle))  # a CPU tensor's handle carries its storage
        self._weights = _views(flat, meta)
        return len(meta)

    def _checksum(self) -> float:
        return float(sum(t.double().sum().item() for _, t in self._weights))


class HostCopyTransport(IPCTransport):
    """IPCTransport on the CPU: the same pack → handle → load path; the handle of a CPU tensor is a
    copy of its data, so a fresh one is taken on every push (vLLM opens a CUDA handle once)."""

    def __init__(self, generation: Any, trainer: FSDPTrainEngine, label: str) -> None:
        super().__init__(generation, trainer)
        self.kind = f"host-copy ({label})"
        self.init_s = 0.0  # no group to set up

    async def _prepare(self) -> None:
        self._handle = b""
        await super()._prepare()

    async def link_seconds(self, repeats: int = 5) -> float:
        """Best time to copy the packed buffer out of rank 0 (the CPU stand-in for one NCCL broadcast)."""
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            await self.trainer.call(w.IpcHandle())
            times.append(time.perf_counter() - t0)
        return min(times)


class CPUPlumbing(_EngineCache):
    """Every section's code path on a CPU: `HostGeneration` (seeded simulated latencies) and FSDP2 over gloo."""

    def __init__(self, settings: GPUBenchSettings, *, mean_latency_s: float = 0.05, seed: int = 0) -> None:
        super().__init__(settings)
        self.mean_latency_s = mean_latency_s
        self.seed = seed

    def _rollout_cfg(self) -> SimulatedRolloutConfig:
        return SimulatedRolloutConfig(mean_latency_s=self.mean_latency_s, latency_sigma=0.3)

    def _new_generation(self) -> Any:
        return HostGeneration(self._rollout_cfg(), random.Random(self.seed))

    def _trainer_gpus(self, gpus: list[int]) -> list[int | None]:
        return [None] * len(gpus)  # one CPU rank per GPU asked for; same-size requests share a trainer

    def transport(self, kind: str, generation: Any, trainer: FSDPTrainEngine) -> Any:
        return HostCopyTransport(generation, trainer, kind)

    async def bare_batch(self, generation: Any, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[int, float]:
        results, seconds = await engine_batch(generation, prompts, max_tokens, tag)
        return sum(len(r.response_tokens) for r in results), seconds

    def run_overrides(self) -> list[str]:
        s = self.settings
        return [
            "rollout.engine=simulated", "trainer.engine=simulated",  # the task: simulated prompts (tokens < 64)
            f"rollout.simulated.mean_latency_s={self.mean_latency_s}", "rollout.simulated.latency_sigma=0.3",
            f"data.train_batch_size={s.async_prompts}", f"rollout.n={s.async_n}", f"data.max_response_length={s.async_len}",
            f"rollout.max_concurrency={2 * s.async_prompts * s.async_n}", f"async_training.max_queue_size={4 * s.async_prompts}",
            f"seed={self.seed}",
        ]

    def engine_set(self, cfg: Config) -> EngineSet:
        gen = HostGeneration(cfg.rollout.simulated, random.Random(cfg.seed))
        trainer = FSDPTrainEngine(self._worker_init(), [None], timeout_s=600)
        return EngineSet(generation=gen, trainer=trainer, transport=HostCopyTransport(gen, trainer, "sync"))


# -- sections ------------------------------------------------------------------------------------


async def engine_batch(generation: Any, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[list[GenerationResult], float]:
    """Every prompt through asyncpolicy's `generate` at once: the results in prompt order, and the wall time."""
    results: list[GenerationResult | None] = [None] * len(prompts)

    async def one(i: int, p: list[int]) -> None:
        results[i] = await generation.generate(GenerationRequest(request_id=f"{tag}-{i}", prompt_tokens=p, max_tokens=max_tokens))

    t = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i, p in enumerate(prompts):
            tg.start_soon(one, i, p)
    return [r for r in results if r is not None], time.perf_counter() - t


async def _abort_and_continue(gen: Any, prompts: list[list[int]], s: GPUBenchSettings) -> dict[str, Any]:
    """Abort long responses mid-way (they come back partial, finish_reason 'abort'), then continue one."""
    slots: list[GenerationResult | None] = [None] * len(prompts)

    async def one(i: int, p: list[int]) -> None:
        slots[i] = await gen.generate(GenerationRequest(request_id=f"ab{i}", prompt_tokens=p, max_tokens=s.abort_len))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i, p in enumerate(prompts):
                tg.start_soon(one, i, p)
            await anyio.sleep(s.abort_after_s)
            await gen.abort_all()
    results = [r for r in slots if r is not None]
    k = next((i for i, r in enumerate(results) if r.finish_reason == "abort"), 0)
    first = results[k]
    cont = await gen.generate(GenerationRequest(
        request_id="cont", prompt_tokens=prompts[k], max_tokens=len(first.response_tokens) + 16,
        response_tokens=first.response_tokens, behaviour_logprobs=first.behaviour_logprobs, token_versions=first.token_versions,
    ))
    partial = [len(r.response_tokens) for r in results]
    return {
        "abort_reasons": sorted({r.finish_reason for r in results}), "abort_partial_lens": [min(partial), max(partial)],
        "continued_len": len(cont.response_tokens), "continued_from": len(first.response_tokens), "continued_finish": cont.finish_reason,
    }


async def section_gen(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    gen = await e.generation()
    rng = random.Random(0)
    prompts = [[rng.randrange(e.vocab) for _ in range(s.gen_prompt_len)] for _ in range(s.gen_prompts)]
    await e.bare_batch(gen, prompts[:8], 32, "warm")
    bare, engine = [], []
    for rep in range(s.gen_reps):  # alternating, same prompts: drift hits both alike
        toks, dt = await e.bare_batch(gen, prompts, s.gen_len, f"bare{rep}")
        bare.append(toks / dt)
        outs, dt = await engine_batch(gen, prompts, s.gen_len, f"eng{rep}")
        engine.append(sum(len(o.response_tokens) for o in outs) / dt)
    logprobs_ok = all(
        len(o.behaviour_logprobs) == len(o.response_tokens) == len(o.token_versions) > 0 and all(lp <= 0 for lp in o.behaviour_logprobs)
        for o in outs
    )
    ratios = sorted(a / b for a, b in zip(engine, bare, strict=True))
    return {
        "bare_tok_s": [round(x) for x in bare], "engine_tok_s": [round(x) for x in engine],
        "engine_over_bare": max(engine) / max(bare), "engine_over_bare_median_pair": ratios[len(ratios) // 2],
        "response_lens": sorted({len(o.response_tokens) for o in outs}), "logprobs_ok": logprobs_ok,
        **await _abort_and_continue(gen, prompts[:16], s), "gpu": gpu_memory(),
    }


async def _sync_checks(e: BenchEngines, gen: Any, trainer: FSDPTrainEngine, transport: Any, s: GPUBenchSettings) -> dict[str, Any]:
    """`sync_reps` × (train a step so the weights change, push); then checksums and a generation under the new weights."""
    pr, packs, totals = [], [], []
    first = gen.version + 1
    for v in range(first, first + s.sync_reps):
        await trainer.train_step(fixed_batch(2, 2, 16, 16, e.vocab, v), v)
        await transport.push(v)
        last = transport.last
        pr.append(last.pause_to_resume_s)
        packs.append(last.pack_s)
        totals.append(last.total_s)
    ck_t = await trainer.checksum()
    ck_v = (await gen.rpc("ap_checksum"))[0]
    post = await gen.generate(GenerationRequest(request_id=f"post-{transport.kind}", prompt_tokens=[1, 2, 3, 4], max_tokens=32))
    return {
        "transport": transport.kind, "pause_to_resume_s": pr, "pack_s": packs, "total_s": totals, "bytes_GB": last.bytes / 1e9,
        "checksum_trainer": ck_t, "checksum_generation": ck_v, "checksum_match": abs(ck_t - ck_v) <= 1e-6 * max(1.0, abs(ck_t)),
        "post_sync_tokens": len(post.response_tokens), "post_sync_versions": sorted(set(post.token_versions)),
        "engine_version": gen.version,
    }


async def section_ipc(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    gen = await e.generation()
    trainer = await e.trainer([0])  # the trainer rank on vLLM's GPU
    return await _sync_checks(e, gen, trainer, e.transport("ipc", gen, trainer), s)


async def section_nccl(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    gen = await e.generation()
    trainer = await e.trainer([1])
    transport = e.transport("nccl", gen, trainer)
    meta = await trainer.pack()
    link = await transport.link_seconds(5)
    nbytes = 2 * sum(n for *_, n in meta)
    figures = await _sync_checks(e, gen, trainer, transport, s)
    return {"link_init_s": transport.init_s, "link_broadcast_s": link, "link_GB_per_s": nbytes / link / 1e9, **figures}


def train_variants(s: GPUBenchSettings) -> list[tuple[bool, bool]]:
    """(packing, compile) of every trainer the train sections start, in order."""
    return [(p, c) for c in s.train_compile for p in s.train_packing]


def variant_overrides(s: GPUBenchSettings, packing: bool, compile_: bool) -> tuple[str, ...]:
    return (
        f"trainer.packing={str(packing).lower()}", f"trainer.compile={str(compile_).lower()}",
        f"trainer.max_tokens_per_micro_batch={s.train_max_tokens}", f"model.gradient_checkpointing={str(s.train_recompute).lower()}",
        f"trainer.attn_implementation={s.train_attn}",
    )


async def _train_figures(e: BenchEngines, gpus: list[int], s: GPUBenchSettings) -> dict[str, Any]:
    """Every variant × batch size on `gpus`: one trainer per variant (closed before the next)."""
    rows = []
    for packing, compile_ in train_variants(s):
        overrides = variant_overrides(s, packing, compile_)
        trainer = await e.trainer(gpus, overrides)
        try:
            for seqs in s.train_seqs:
                groups = max(1, seqs // s.train_n)
                batch = fixed_batch(groups, s.train_n, s.train_prompt_len, s.train_len, e.vocab, 1, s.train_len_min)
                ms = [await trainer.train_step(batch, step) for step in range(s.train_steps)]
                best = max(ms[1:] or ms, key=lambda m: m["perf/train_tokens_per_s"])  # the first step pays one-time costs (compile)
                rows.append({
                    "ranks": trainer.world_size, "sequences": groups * s.train_n, "seq_len": s.train_prompt_len + s.train_len,
                    "tokens": sum(len(x.prompt.tokens) + len(t.response_tokens) for x in batch for t in x.trajectories),
                    "packing": packing, "compile": compile_, "max_tokens": s.train_max_tokens, "recompute": s.train_recompute, "attn": s.train_attn,
                    "tokens_per_s": best["perf/train_tokens_per_s"], "step_s": [m["perf/train_step_s"] for m in ms],
                    "mfu": best.get("perf/mfu", 0.0), "peak_mem_GiB": max(m.get("perf/gpu_mem_peak_GB", 0.0) for m in ms),  # CUDA only
                    "loss_finite": all(math.isfinite(m["losses/loss"]) for m in ms),
                })
                log.info("bench_gpu_train", **{k: v for k, v in rows[-1].items() if k != "step_s"})
        finally:
            await e.drop_trainer(gpus, overrides)  # one variant's memory is not kept for the next
    return {"ranks": len(gpus), "rows": rows}


async def section_train(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    return await _train_figures(e, [s.trainer_gpu], s)


async def section_fsdp2(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    return await _train_figures(e, [0, 1], s)


def _steady_mean(run: ScenarioRun, key: str) -> float:
    """Mean of a metric over the steps after warm-up (the steps `steady_step_s` times)."""
    return statistics.fmean(r[key] or 0.0 for r in run.rows[WARMUP:])


async def section_async(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    """The same supervised run, on-policy (staleness 0) then overlapped (staleness ≥ 1).

    At staleness 0 the rollouter admits one batch per policy version, so a step is generate →
    train → sync. The engine reports its training time t and the synchronizer the sync time;
    the rest of the synchronous step is the batch's generation g (admission, generation,
    scoring: what overlapping can hide). Overlapped, a step ideally takes max(g, t): ideal speedup
    (g + t) / max(g, t). Weight syncs are hidden by neither schedule; their time is reported.
    (Not the trainer's idle ratio × elapsed: elapsed includes the engines' start, minutes for vLLM.)
    """
    await e.release()  # each supervised run starts (and closes) its own engines: free the GPUs first
    runs: dict[int, ScenarioRun] = {}
    for staleness in (0, s.async_staleness):
        name = f"gpu_async_staleness_{staleness}"
        scenario = [
            f"async_training.staleness_threshold={staleness}", "async_training.trigger_parameter_sync_step=1",
            f"trainer.total_training_steps={s.async_steps}", "trainer.test_freq=0",
        ]
        cfg = ctx.config(e.run_overrides(), scenario, name=name)
        runs[staleness] = await run_supervised(ctx, name, cfg, engines=e.engine_set(cfg), settings={"staleness_threshold": staleness})
    sync, overlapped = runs[0], runs[s.async_staleness]
    for run in runs.values():
        if not run.finished or len(run.rows) <= WARMUP:
            raise RuntimeError(f"{run.name} trained {run.steps} of {s.async_steps} steps; need more than {WARMUP}")
    step_sync, step_async = steady_step_s(sync), steady_step_s(overlapped)
    t, sync_s = _steady_mean(sync, "perf/train_step_s"), _steady_mean(sync, "sync_latency_s")
    g = step_sync - t - sync_s
    speedup, ideal = step_sync / step_async, (g + t) / max(g, t)
    return {
        "steps": s.async_steps, "staleness": s.async_staleness, "tokens_per_step": s.async_prompts * s.async_n * s.async_len,
        "gen_s": g, "train_s": t, "sync_s": sync_s, "step_sync_s": step_sync, "step_async_s": step_async,
        "wall_sync_s": sync.wall_s, "wall_async_s": overlapped.wall_s, "speedup": speedup, "ideal_speedup": ideal,
        "fraction_of_ideal": speedup / ideal, "async_age_max": overlapped.sample_age_max, "async_dropped_stale": overlapped.dropped_stale,
    }


Section = Callable[[BenchEngines, GPUBenchSettings, BenchContext], Awaitable[dict[str, Any]]]
SECTIONS: dict[str, Section] = {
    "gen": section_gen,
    "ipc": section_ipc,
    "nccl": section_nccl,
    "train": section_train,
    "fsdp2": section_fsdp2,
    "async": section_async,
}


# -- running and reporting -----------------------------------------------------------------------


class GPUBenchResult(msgspec.Struct, kw_only=True):
    sections: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    errors: dict[str, str] = msgspec.field(default_factory=dict)  # section → traceback
    seconds: dict[str, float] = msgspec.field(default_factory=dict)
    gpu: list[dict[str, Any]] = msgspec.field(default_factory=list)


async def run_sections(
    e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext, on_section: Callable[[GPUBenchResult], None] | None = None
) -> GPUBenchResult:
    """Run the chosen sections in order; a failing section is recorded and the rest still run."""
    res = GPUBenchResult()
    for name in s.sections:
        t0 = time.perf_counter()
        try:
            res.sections[name] = await SECTIONS[name](e, s, ctx)
        except Exception as exc:  # recorded with its traceback; the exit code says a section failed
            res.errors[name] = traceback.format_exc()
            log.error("bench_gpu_section_failed", section=name, error=repr(exc))
        res.seconds[name] = time.perf_counter() - t0
        res.gpu = gpu_memory()
        log.info("bench_gpu_section", section=name, ok=name not in res.errors, seconds=round(res.seconds[name], 1))
        if on_section is not None:
            on_section(res)
    return res


class TableRow(msgspec.Struct, kw_only=True):
    section: str
    figure: str
    values: dict[str, float]  # every number the row shows: finite on a good run
    text: str


def _mid(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _variant_key(x: dict[str, Any]) -> tuple[Any, ...]:
    """What a one-rank and a two-rank train figure must share to be compared."""
    return (x["sequences"], x["seq_len"], x["packing"], x["compile"], x["max_tokens"], x["recompute"], x["attn"])


def table_rows(res: GPUBenchResult) -> list[TableRow]:
    """The summary table, one row per figure, from the sections that ran."""
    s, rows = res.sections, []
    if "gen" in s:
        g = s["gen"]
        v = {"bare": max(g["bare_tok_s"]), "engine": max(g["engine_tok_s"]), "best_ratio": g["engine_over_bare"], "median_pair": g["engine_over_bare_median_pair"]}
        rows.append(TableRow(section="gen", figure="generation tok/s, bare vLLM / asyncpolicy, best; median pair ratio", values=v,
                             text=f"{v['bare']:.0f} / {v['engine']:.0f} ({v['best_ratio']:.1%}); median pair {v['median_pair']:.1%}"))
    if "nccl" in s:
        n = s["nccl"]
        v = {"broadcast_s": n["link_broadcast_s"], "GB_per_s": n["link_GB_per_s"], "init_s": n["link_init_s"]}
        rows.append(TableRow(section="nccl", figure="NCCL link: one broadcast of the flat buffer", values=v,
                             text=f"{v['broadcast_s']:.5f} s ({v['GB_per_s']:.1f} GB/s); group set-up {v['init_s']:.2f} s"))
    for k in ("ipc", "nccl"):
        if k in s:
            x = s[k]
            v = {"min_s": min(x["pause_to_resume_s"]), "median_s": _mid(x["pause_to_resume_s"]), "pack_s": min(x["pack_s"]), "checksum_match": float(x["checksum_match"])}
            rows.append(TableRow(section=k, figure=f"weight sync {k} ({x['transport']}), pause → resume s (min / median)", values=v,
                                 text=f"{v['min_s']:.4f} / {v['median_s']:.4f}; pack {v['pack_s']:.4f} s; checksums equal: {x['checksum_match']}"))
    one_rank = {_variant_key(x): x["tokens_per_s"] for x in s.get("train", {}).get("rows", [])}
    for k in ("train", "fsdp2"):
        for x in s.get(k, {}).get("rows", []):
            v = {"tokens_per_s": x["tokens_per_s"], "mfu": x["mfu"], "peak_mem_GiB": x["peak_mem_GiB"], "loss_finite": float(x["loss_finite"])}
            scaling = ""
            if k == "fsdp2" and _variant_key(x) in one_rank:
                v["vs_one_rank"] = x["tokens_per_s"] / one_rank[_variant_key(x)]
                scaling = f", {v['vs_one_rank']:.2f}× one rank"
            budget = f"≤ {x['max_tokens']} tok" if x["max_tokens"] else "fixed count"
            variant = (f"packing {'on' if x['packing'] else 'off'}, compile {'on' if x['compile'] else 'off'}, micro-batches {budget}, "
                       f"{x['attn']}, recompute {'on' if x['recompute'] else 'off'}")
            rows.append(TableRow(
                section=k, figure=f"FSDP2 trainer, {x['ranks']} rank(s), {x['sequences']} seqs ≤ {x['seq_len']} tokens, {variant}", values=v,
                text=f"{v['tokens_per_s']:.0f} tok/s, MFU {v['mfu']:.3f}, peak {v['peak_mem_GiB']:.1f} GiB{scaling}",
            ))
    if "async" in s:
        a = s["async"]
        keys = ("speedup", "ideal_speedup", "fraction_of_ideal", "gen_s", "train_s", "sync_s", "step_sync_s", "step_async_s", "wall_sync_s", "wall_async_s")
        v = {k: float(a[k]) for k in keys}
        rows.append(TableRow(
            section="async", figure=f"Supervisor: staleness {a['staleness']} ÷ staleness 0, {a['steps']} steps, same engines", values=v,
            text=f"{v['speedup']:.3f}× (ideal {v['ideal_speedup']:.3f}× = (g + t) / max(g, t); {v['fraction_of_ideal']:.1%} of ideal); "
            f"g {v['gen_s']:.3f} s, t {v['train_s']:.3f} s, sync {v['sync_s']:.4f} s; step {v['step_sync_s']:.3f} → {v['step_async_s']:.3f} s; "
            f"wall {v['wall_sync_s']:.1f} s / {v['wall_async_s']:.1f} s",
        ))
    return rows


def format_table(res: GPUBenchResult) -> str:
    card = (res.gpu or [{}])[0].get("name", "no GPU")
    out = [f"card: {card}", "| figure | measured |", "|---|---|"]
    out += [f"| {r.figure} | {r.text} |" for r in table_rows(res)]
    if res.errors:
        out.append("FAILED sections: " + ", ".join(res.errors))
    return "\n".join(out)


# -- command line --------------------------------------------------------------------------------


_ONOFF = {False: "off", True: "on"}


def _train_lists(args: argparse.Namespace) -> tuple[list[int], list[bool], list[bool], bool]:
    """The train sections' list options; ValueError naming the option on bad input."""
    def onoff(opt: str, text: str) -> list[bool]:
        vals = [x for x in text.split(",") if x]
        if not vals or any(x not in ("on", "off") for x in vals):
            raise ValueError(f"{opt} takes on, off or off,on (got {text!r})")
        return [x == "on" for x in vals]

    try:
        seqs = [int(x) for x in args.train_seqs.split(",") if x]
    except ValueError:
        seqs = []
    if not seqs or min(seqs) < 1:
        raise ValueError(f"--train-seqs takes positive integers, comma-separated (got {args.train_seqs!r})")
    if args.train_max_tokens < 0 or args.train_len_min < 0:
        raise ValueError("--train-max-tokens and --train-len-min must be 0 or more")
    recompute = onoff("--train-recompute", args.train_recompute)
    if len(recompute) != 1:
        raise ValueError(f"--train-recompute takes on or off (got {args.train_recompute!r})")
    return seqs, onoff("--train-packing", args.train_packing), onoff("--train-compile", args.train_compile), recompute[0]


def _parser() -> argparse.ArgumentParser:
    d = GPUBenchSettings()
    p = argparse.ArgumentParser(prog="python -m asyncpolicy bench gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(d.sections), help=f"comma-separated, from {', '.join(SECTION_NAMES)}")
    p.add_argument("--model-dir", default=d.model_dir, help="where the Qwen2.5-0.5B-shaped model directory is written")
    p.add_argument("--make-model", metavar="DIR", help="write the Qwen2.5-0.5B-shaped model dir (+ tokenizer) to DIR and exit")
    p.add_argument("--out-dir", default="", help="results directory (default: a new benchmark_results_<time>/ here)")
    p.add_argument("--util", type=float, default=d.util, help="vLLM gpu_memory_utilization")
    p.add_argument("--trainer-gpu", type=int, default=d.trainer_gpu, help="the train section's GPU")
    p.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs")
    p.add_argument("--train-seqs", default=",".join(map(str, d.train_seqs)), help="train/fsdp2: sequences per step, comma-separated")
    p.add_argument("--train-packing", default=",".join(_ONOFF[x] for x in d.train_packing), help="train/fsdp2: on, off or off,on")
    p.add_argument("--train-compile", default=",".join(_ONOFF[x] for x in d.train_compile), help="train/fsdp2: on, off or off,on")
    p.add_argument("--train-max-tokens", type=int, default=d.train_max_tokens, help="tokens per micro-batch; 0 = 16 sequences")
    p.add_argument("--train-len-min", type=int, default=d.train_len_min, help="> 0: response lengths uniform in [this, 512]")
    p.add_argument("--train-recompute", default=_ONOFF[d.train_recompute], help="gradient checkpointing: on or off")
    p.add_argument("--train-attn", default=d.train_attn, choices=["sdpa", "eager", "flash_attention_2", "flex_attention"],
                   help="the trainer's attention kernel")
    p.add_argument("--gen-reps", type=int, default=d.gen_reps)
    p.add_argument("--async-prompts", type=int, default=d.async_prompts)
    p.add_argument("--async-len", type=int, default=d.async_len)
    p.add_argument("--async-steps", type=int, default=d.async_steps)
    p.add_argument("--async-staleness", type=int, default=d.async_staleness)
    return p


def gpu_main(argv: list[str]) -> int:
    """`python -m asyncpolicy bench gpu [options]`; returns the exit code (2: bad input or no CUDA/vLLM)."""
    args = _parser().parse_args(argv)
    if args.make_model:
        make_model_dir(args.make_model)
        print(f"model dir {args.make_model}")
        return EXIT_OK
    sections = [x for x in args.sections.split(",") if x]
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown or not sections:
        print(f"asyncpolicy bench gpu: unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTION_NAMES)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.async_steps <= WARMUP or args.async_staleness < 1:
        print(f"asyncpolicy bench gpu: --async-steps must exceed {WARMUP} and --async-staleness be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        train_seqs, train_packing, train_compile, train_recompute = _train_lists(args)
    except ValueError as e:
        print(f"asyncpolicy bench gpu: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import torch

    if not torch.cuda.is_available():
        print("asyncpolicy bench gpu: needs a CUDA GPU (and vllm); none on this machine", file=sys.stderr)
        return EXIT_BAD_INPUT
    from asyncpolicy.engines.generation.vllm import import_vllm

    try:
        if set(sections) & VLLM_SECTIONS:
            import_vllm()
    except ConfigError as e:
        print(f"asyncpolicy bench gpu: sections {', '.join(sorted(set(sections) & VLLM_SECTIONS))}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    settings = GPUBenchSettings(
        model_dir=args.model_dir, sections=sections, util=args.util, trainer_gpu=args.trainer_gpu, eager=args.eager,
        gen_reps=args.gen_reps, async_prompts=args.async_prompts, async_len=args.async_len, async_steps=args.async_steps,
        async_staleness=args.async_staleness, train_seqs=train_seqs, train_packing=train_packing, train_compile=train_compile,
        train_max_tokens=args.train_max_tokens, train_len_min=args.train_len_min, train_recompute=train_recompute,
        train_attn=args.train_attn,
    )
    out = Path(args.out_dir) if args.out_dir else new_results_dir()
    out.mkdir(parents=True, exist_ok=True)
    make_model_dir(settings.model_dir)
    command = shlex.join(["python", "-m", "asyncpolicy", "bench", "gpu", *argv])
    ctx = BenchContext(out, quick=False, overrides=[], machine=detect_machine(), command=command)
    previous = structlog.get_config()
    configure_bench_logging(None)
    try:
        res = anyio.run(_run_gpu, settings, ctx, backend="asyncio")  # vLLM's AsyncLLM is asyncio-only
    finally:
        structlog.configure(**previous)
    table = format_table(res)
    (out / "gpu_summary.txt").write_text(f"{command}\n{table}\n")
    print(table)
    for name, tb in res.errors.items():
        print(f"[{name}] FAILED\n{tb}", file=sys.stderr)
    print(f"results: {out}", file=sys.stderr)
    return EXIT_FAILED if res.errors else EXIT_OK


async def _run_gpu(settings: GPUBenchSettings, ctx: BenchContext) -> GPUBenchResult:
    path = ctx.out_dir / "gpu_bench.json"

    def save(res: GPUBenchResult) -> None:  # after every section: a crash later keeps what was measured
        path.write_bytes(msgspec.json.format(msgspec.json.encode(res)))

    async with GPUEngines(settings) as engines:
        res = await run_sections(engines, settings, ctx, on_section=save)
    save(res)
    return res
