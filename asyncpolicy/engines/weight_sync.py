"""Trainer → vLLM weight transports: CUDA IPC on a shared GPU, NCCL broadcast across GPUs.

Both move the whole model as ONE flat bf16 buffer that the trainer fills in `stage`, before the
synchronizer pauses rollout (gathering full tensors from the FSDP shards is the slow part and needs
no pause). Inside the pause only the hand-over happens: one IPC handle (opened once, cached) or one
NCCL broadcast, then `load_weights` on views of the buffer, and resume. No prefix-cache reset: the
engine salts every request's prefix cache with the weights' version, so blocks computed by old
weights are never reused (a reset walks every KV block, 0.3-0.7 s on a small model with a large
cache, measured on H200). Each push records its timings in `last` and logs them.

Invariant: vLLM is resumed on every path out of `push`, and its version only changes after the
new weights are fully loaded.
"""

from __future__ import annotations

import time
from collections import deque

import anyio
import msgspec
import structlog

from asyncpolicy.engines import fsdp_worker as w
from asyncpolicy.engines.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.engines.vllm_generation import VLLMGenerationEngine

log = structlog.get_logger("asyncpolicy.weight_sync")


class SyncTiming(msgspec.Struct, kw_only=True):
    """One push, in seconds. pause_to_resume_s is what generation loses to the sync."""

    version: int
    pack_s: float  # trainer: shards → full tensors → flat buffer, in `stage` (generation still running)
    engine_pause_s: float  # the engine's scheduler pause call
    transfer_load_s: float  # broadcast/IPC + load_weights
    resume_s: float  # the engine's resume call
    pause_to_resume_s: float  # what the hand-over holds generation up for
    total_s: float  # first call of `push` to its end (pack included when it was not staged)
    bytes: int


class _FlatTransport:
    kind = "base"

    def __init__(self, generation: VLLMGenerationEngine, trainer: FSDPTrainEngine) -> None:
        self.generation = generation
        self.trainer = trainer
        self.history: deque[SyncTiming] = deque(maxlen=1000)  # recent pushes, for metrics and benchmarks
        self._staged: tuple[int, list[tuple[str, list[int], int, int]], float] | None = None  # version, meta, pack_s

    @property
    def last(self) -> SyncTiming | None:
        return self.history[-1] if self.history else None

    async def _prepare(self) -> None:
        """Once, before the first push (handles, groups)."""

    async def _transfer(self, meta: list[tuple[str, list[int], int, int]]) -> None:
        raise NotImplementedError

    async def stage(self, version: int) -> None:
        """Pack the trainer's weights into the flat buffer while generation runs on."""
        t0 = time.perf_counter()
        meta = await self.trainer.pack()
        self._staged = (version, meta, time.perf_counter() - t0)

    async def push(self, version: int) -> None:
        t0 = time.perf_counter()
        if self._staged is None or self._staged[0] != version:
            await self.stage(version)  # not staged (a forced push after an engine restart): pack now
        assert self._staged is not None
        _, meta, pack_s = self._staged
        await self.generation.wait_ready()  # a restart in progress: push once it is back
        await self._prepare()
        gen = self.generation
        t1 = time.perf_counter()
        await gen.pause()
        t2 = time.perf_counter()
        t3 = t2
        try:
            await self._transfer(meta)
            t3 = time.perf_counter()
        finally:
            with anyio.CancelScope(shield=True):
                await gen.resume()
        t4 = time.perf_counter()
        gen.set_version(version)  # after resume: tokens racing the resume count as older (safe side)
        timing = SyncTiming(
            version=version,
            pack_s=pack_s,
            engine_pause_s=t2 - t1,
            transfer_load_s=t3 - t2,
            resume_s=t4 - t3,
            pause_to_resume_s=t4 - t1,
            total_s=t4 - t0,
            bytes=2 * sum(n for *_, n in meta),
        )
        self.history.append(timing)
        log.info("weights_pushed", transport=self.kind, **{k: round(v, 4) if isinstance(v, float) else v for k, v in msgspec.structs.asdict(timing).items()})


class IPCTransport(_FlatTransport):
    """Trainer rank 0 and vLLM share one GPU: vLLM reads the trainer's buffer through a CUDA IPC handle."""

    kind = "ipc"

    def __init__(self, generation: VLLMGenerationEngine, trainer: FSDPTrainEngine) -> None:
        super().__init__(generation, trainer)
        self._handle: bytes = b""

    async def _prepare(self) -> None:
        if not self._handle:  # the buffer is allocated once, so is its handle (vLLM caches it open)
            self._handle = (await self.trainer.call(w.IpcHandle()))[0].blob

    async def _transfer(self, meta: list[tuple[str, list[int], int, int]]) -> None:
        await self.generation.rpc("ap_ipc_load", self._handle, meta)


class NCCLTransport(_FlatTransport):
    """Trainer rank 0 broadcasts the buffer to every vLLM worker over a dedicated NCCL group."""

    kind = "nccl"

    def __init__(self, generation: VLLMGenerationEngine, trainer: FSDPTrainEngine, host: str = "127.0.0.1") -> None:
        super().__init__(generation, trainer)
        self.host = host
        self._group_of = -1  # the engine incarnation the NCCL group was made with
        self.init_s = 0.0

    async def _prepare(self) -> None:
        if self._group_of == self.generation.incarnation:
            return  # a restarted vLLM has new worker processes: they need a new group
        t0 = time.perf_counter()
        port = w.free_port()
        world = 1 + len(self.generation.settings.gpus)  # trainer rank 0 + one rank per vLLM worker
        async with anyio.create_task_group() as tg:  # both sides must join the rendezvous together
            tg.start_soon(self.trainer.call, w.NcclInit(host=self.host, port=port, world_size=world))
            tg.start_soon(self.generation.rpc, "ap_nccl_init", self.host, port, 1, world)
        self._group_of = self.generation.incarnation
        self.init_s = time.perf_counter() - t0
        log.info("nccl_group_ready", world_size=world, init_s=round(self.init_s, 3))

    async def _transfer(self, meta: list[tuple[str, list[int], int, int]]) -> None:
        numel = sum(n for *_, n in meta)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.trainer.call, w.NcclSend())
            tg.start_soon(self.generation.rpc, "ap_nccl_load", meta, numel)

    async def link_seconds(self, repeats: int = 5) -> float:
        """Best time of a bare broadcast of the flat buffer (no load): the link's share of a sync."""
        await self._prepare()
        numel = sum(n for *_, n in self.trainer.meta)
        replies: list[float] = []

        async def send() -> None:
            replies.append((await self.trainer.call(w.NcclBench(repeats=repeats)))[0].value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            tg.start_soon(self.generation.rpc, "ap_nccl_recv_only", numel, repeats)
        return replies[0]
