"""CPU stand-ins for `GPUEngines`: every `bench gpu` section's code runs on a CPU through them.

`SimulatedVLLMGeneration` is the seeded simulated generation engine plus the methods the weight
transports call on vLLM, done on the host; the trainer is the real FSDP2 engine over gloo. What a
CPU cannot do (CUDA IPC handles, NCCL) becomes a host copy of the same flat buffer, through the
same pack → handle → load-by-meta path (`HostCopyTransport`, over the real `IPCTransport`).
"""

from __future__ import annotations

import pickle
import random
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from asyncpolicy.bench.gpu.engines import EngineCache, engine_batch
from asyncpolicy.bench.gpu.settings import GPUBenchSettings
from asyncpolicy.config import Config, SimulatedRolloutConfig
from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.engines.simulated import SimulatedGenerationEngine
from asyncpolicy.engines.generation.vllm_worker_ext import views
from asyncpolicy.engines.transport.cuda import IPCTransport, SyncTiming

Meta = list[tuple[str, list[int], int, int]]  # (name, shape, offset, numel) per parameter, as the transports send it


class SimulatedVLLMGeneration(SimulatedGenerationEngine):
    """The simulated engine (whose pause/resume stop its generations in place, as vLLM's "keep") plus what
    the weight transports call on vLLM, done on the host.

    `rpc("ap_ipc_load", handle, meta)` rebuilds the trainer's flat buffer from its handle (of a
    CPU tensor: a copy) and keeps views of it by `meta`, as vLLM's workers do
    (`vllm_worker_ext.views`); `rpc("ap_checksum")` sums them as the workers sum their parameters.
    """

    def __init__(self, cfg: SimulatedRolloutConfig, rng: random.Random) -> None:
        super().__init__(cfg, rng)
        self.incarnation = 0
        self.start_s = 0.0
        self._weights: list[tuple[str, Any]] = []

    async def start(self) -> None:
        t0 = time.perf_counter()
        await super().start()
        self.incarnation += 1
        self.start_s = time.perf_counter() - t0

    async def wait_ready(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def rpc(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """One 'worker' answers, off the event loop, as vLLM's collective_rpc returns one answer per worker."""
        handlers: dict[str, Callable[..., Any]] = {"ap_ipc_load": self._ipc_load, "ap_checksum": self._checksum}
        handler = handlers.get(method)
        if handler is None:
            raise RuntimeError(f"SimulatedVLLMGeneration has no worker method {method!r}")
        with anyio.fail_after(timeout or 300):
            return [await anyio.to_thread.run_sync(handler, *args)]

    def _ipc_load(self, handle: bytes, meta: Meta) -> int:
        from torch.multiprocessing.reductions import rebuild_tensor

        flat = rebuild_tensor(*pickle.loads(handle))  # a CPU tensor's handle carries its storage
        self._weights = views(flat, meta)
        return len(meta)

    def _checksum(self) -> float:
        return float(sum(t.double().sum().item() for _, t in self._weights))


class HostCopyTransport:
    """`IPCTransport` on the CPU: the same pack → handle → load path. The handle of a CPU tensor is
    a copy of its data, not a window on it (vLLM opens a CUDA handle once and reads the live buffer),
    so every push goes through a fresh `IPCTransport`, which takes a fresh handle."""

    def __init__(self, generation: Any, trainer: FSDPTrainEngine, label: str) -> None:
        self.generation, self.trainer = generation, trainer
        self.kind = f"host-copy ({label})"
        self.init_s = 0.0  # no group to set up
        self.history: list[SyncTiming] = []
        self._staged: IPCTransport | None = None

    def _fresh(self) -> IPCTransport:
        t = IPCTransport(self.generation, self.trainer)
        t.kind = self.kind
        return t

    @property
    def last(self) -> SyncTiming | None:
        return self.history[-1] if self.history else None

    async def stage(self, version: int) -> None:
        self._staged = self._fresh()
        await self._staged.stage(version)

    async def push(self, version: int) -> None:
        t, self._staged = self._staged or self._fresh(), None  # not staged, or staged another version: it packs
        await t.push(version)
        self.history.extend(t.history)

    async def link_seconds(self, repeats: int = 5) -> float:
        """Best time to copy the packed buffer out of rank 0 (the CPU stand-in for one NCCL broadcast)."""
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            await self.trainer.call(w.IpcHandle())
            times.append(time.perf_counter() - t0)
        return min(times)


class CPUPlumbing(EngineCache):
    """Every section's code path on a CPU: `SimulatedVLLMGeneration` (seeded simulated latencies) and FSDP2 over gloo."""

    def __init__(self, settings: GPUBenchSettings, *, mean_latency_s: float = 0.05, seed: int = 0) -> None:
        super().__init__(settings)
        self.mean_latency_s = mean_latency_s
        self.seed = seed

    def _rollout_cfg(self) -> SimulatedRolloutConfig:
        return SimulatedRolloutConfig(mean_latency_s=self.mean_latency_s, latency_sigma=0.3)

    def new_generation(self) -> Any:
        return SimulatedVLLMGeneration(self._rollout_cfg(), random.Random(self.seed))

    def trainer_gpus(self, gpus: list[int]) -> list[int | None]:
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

    def learn_overrides(self) -> list[str]:
        """Simulated engines (whose task is the simulated one: arith's keys are accepted and unused) and the
        tiny model the trainer of `engine_set` trains."""
        return [
            "rollout.engine=simulated", "trainer.engine=simulated", f"model.path={self.settings.model_dir}",
            f"rollout.simulated.mean_latency_s={self.mean_latency_s}", "rollout.simulated.latency_sigma=0.3",
        ]

    def engine_set(self, cfg: Config) -> EngineSet:
        gen = SimulatedVLLMGeneration(cfg.rollout.simulated, random.Random(cfg.seed))
        trainer = FSDPTrainEngine(self.worker_init(), [None], timeout_s=600)
        return EngineSet(generation=gen, trainer=trainer, transport=HostCopyTransport(gen, trainer, "sync"))

