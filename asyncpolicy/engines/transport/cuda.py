"""Trainer → vLLM weight transports: CUDA IPC on a shared GPU, NCCL broadcast across GPUs.

Both move the whole model as ONE flat bf16 buffer that the trainer fills in `stage`, before the
synchronizer pauses rollout (gathering full tensors from the FSDP shards is the slow part and needs
no pause). Inside the pause only the hand-over happens: one IPC handle (opened once, cached) or one
NCCL broadcast, then `load_weights` on views of the buffer, and resume. No prefix-cache reset: the
engine salts every request's prefix cache with the weights' version, so blocks computed by old
weights are never reused (a reset walks every KV block, 0.3-0.7 s on a small model with a large
cache, measured on H200). Each push records its timings in `last` and logs them.

Data-parallel replicas (`ReplicatedGeneration`): one push pauses every replica the push reaches,
hands the buffer over once (one NCCL broadcast to all of their workers), and resumes each; the
timings of each replica are in `SyncTiming.replicas`. A replica that fails its part is reported to
the replica set (it leaves routing and is restarted) and the push raises naming it: the
synchronizer's retry then goes to the replicas still up. Not so for NCCL group set-up (every
member must join: a replica that fails it fails the attempt) nor for a replica that dies during
the broadcast itself (the trainer's send has no timeout of its own; sync_timeout ends it).

Invariant: every vLLM engine paused by `push` is resumed on every path out of it, even when
another one failed, and a version only changes after the new weights are fully loaded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
import msgspec
import structlog

from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.engines.generation.replicas import ReplicatedGeneration
from asyncpolicy.engines.generation.vllm import VLLMGenerationEngine

log = structlog.get_logger("asyncpolicy.weight_sync")


class ReplicaTiming(msgspec.Struct, kw_only=True):
    """One replica's share of a push, in seconds (replicas are paused, loaded, resumed concurrently)."""

    replica: int
    pause_s: float
    transfer_load_s: float  # from the start of the broadcast to this replica's load returning
    resume_s: float


class SyncTiming(msgspec.Struct, kw_only=True):
    """One push, in seconds. pause_to_resume_s is what generation loses to the sync."""

    version: int
    pack_s: float  # trainer: shards → full tensors → flat buffer, in `stage` (generation still running)
    engine_pause_s: float  # the engine's scheduler pause call (the slowest replica's)
    transfer_load_s: float  # broadcast/IPC + load_weights
    resume_s: float  # the engine's resume call (the slowest replica's)
    pause_to_resume_s: float  # what the hand-over holds generation up for
    total_s: float  # first call of `push` to its end (pack included when it was not staged)
    bytes: int
    replicas: list[ReplicaTiming] = []  # one per replica pushed to


class ReplicaSyncError(RuntimeError):
    """A push failed on some replicas; every replica that was paused has been resumed."""


Meta = list[tuple[str, list[int], int, int]]
Target = tuple[int, VLLMGenerationEngine]


async def _on_each(targets: list[Target], call: Callable[[int, VLLMGenerationEngine], Awaitable[None]]) -> dict[int, Exception]:
    """Run `call` for every replica at once; one replica's error never stops the others'. Errors by replica."""
    errors: dict[int, Exception] = {}

    async def one(k: int, engine: VLLMGenerationEngine) -> None:
        try:
            await call(k, engine)
        except Exception as exc:  # collected: the caller resumes every replica, then raises naming them
            errors[k] = exc

    async with anyio.create_task_group() as tg:
        for k, engine in targets:
            tg.start_soon(one, k, engine)
    return errors


class _FlatTransport:
    """Pushes into `generation`: one vLLM engine, or every push target of a `ReplicatedGeneration`."""

    kind = "base"

    def __init__(self, generation: VLLMGenerationEngine | ReplicatedGeneration, trainer: FSDPTrainEngine) -> None:
        self.generation = generation
        self.trainer = trainer
        self.history: deque[SyncTiming] = deque(maxlen=1000)  # recent pushes, for metrics and benchmarks
        self._staged: tuple[int, Meta, float] | None = None  # version, meta, pack_s

    @property
    def last(self) -> SyncTiming | None:
        return self.history[-1] if self.history else None

    def targets(self) -> list[Target]:
        """(replica index, engine) of every engine this push must reach."""
        if isinstance(self.generation, ReplicatedGeneration):
            return self.generation.push_targets()
        return [(0, self.generation)]

    async def _prepare(self) -> None:
        """Before a push, with `targets()` started: what the hand-over needs once (handles, groups)."""

    async def _transfer(self, meta: Meta, targets: list[Target]) -> tuple[dict[int, float], dict[int, Exception]]:
        """Hand the staged buffer to every target: each one's seconds until loaded, and its error if it failed."""
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
        targets = self.targets()
        if not targets:
            raise ReplicaSyncError(f"weight push of version {version}: no generation replica is up to receive it")
        for _, engine in targets:
            await engine.wait_ready()  # a restart in progress: push once it is back
        await self._prepare()
        targets = self.targets()  # (a replica that failed meanwhile has left them)
        pause_s: dict[int, float] = {}
        resume_s: dict[int, float] = {}
        loaded_s: dict[int, float] = {}

        async def pause(k: int, engine: VLLMGenerationEngine) -> None:
            t = time.perf_counter()
            await engine.pause()
            pause_s[k] = time.perf_counter() - t

        async def resume(k: int, engine: VLLMGenerationEngine) -> None:
            t = time.perf_counter()
            await engine.resume()
            resume_s[k] = time.perf_counter() - t

        t1 = time.perf_counter()
        errors: dict[int, Exception] = {}
        t2 = t3 = t1
        try:
            errors = await _on_each(targets, pause)
            t2 = time.perf_counter()
            if not errors:
                loaded_s, errors = await self._transfer(meta, targets)
                t3 = time.perf_counter()
        finally:
            with anyio.CancelScope(shield=True):  # every replica that paused is resumed, whatever failed
                resume_errors = await _on_each([(k, e) for k, e in targets if k in pause_s], resume)
        t4 = time.perf_counter()
        errors.update(resume_errors)
        if errors:
            self._report(errors)
            raise ReplicaSyncError(
                f"weight push of version {version} failed on replica(s) "
                + ", ".join(f"{k}: {e!r}" for k, e in sorted(errors.items()))
            )
        # after resume: tokens racing the resume count as older (safe side); a router sets every push target
        self.generation.set_version(version)
        timing = SyncTiming(
            version=version,
            pack_s=pack_s,
            engine_pause_s=t2 - t1,
            transfer_load_s=t3 - t2,
            resume_s=t4 - t3,
            pause_to_resume_s=t4 - t1,
            total_s=t4 - t0,
            bytes=2 * sum(n for *_, n in meta),
            replicas=[
                ReplicaTiming(replica=k, pause_s=pause_s[k], transfer_load_s=loaded_s.get(k, t3 - t2), resume_s=resume_s[k])
                for k, _ in targets
            ],
        )
        self.history.append(timing)
        fields = {k: round(v, 4) if isinstance(v, float) else v for k, v in msgspec.structs.asdict(timing).items()}
        fields["replicas"] = len(targets)
        log.info("weights_pushed", transport=self.kind, **fields)
        if len(targets) > 1:
            for r in timing.replicas:
                log.info("weights_pushed_replica", version=version, replica=r.replica, pause_s=round(r.pause_s, 4),
                         transfer_load_s=round(r.transfer_load_s, 4), resume_s=round(r.resume_s, 4))

    def _report(self, errors: dict[int, Exception]) -> None:
        """Failed replicas leave routing (and the next attempt's targets); their owner restarts them."""
        if isinstance(self.generation, ReplicatedGeneration):
            for k, exc in errors.items():
                self.generation.report_failure(k, exc)


class IPCTransport(_FlatTransport):
    """Trainer rank 0 and vLLM share one GPU: vLLM reads the trainer's buffer through a CUDA IPC handle."""

    kind = "ipc"

    def __init__(self, generation: VLLMGenerationEngine | ReplicatedGeneration, trainer: FSDPTrainEngine) -> None:
        super().__init__(generation, trainer)
        self._handle: bytes = b""

    async def _prepare(self) -> None:
        if len(self.targets()) != 1:
            raise RuntimeError("CUDA IPC reaches one vLLM engine on the trainer's GPU, not replicas")
        if not self._handle:  # the buffer is allocated once, so is its handle (vLLM caches it open)
            self._handle = (await self.trainer.call(w.IpcHandle()))[0].blob

    async def _transfer(self, meta: Meta, targets: list[Target]) -> tuple[dict[int, float], dict[int, Exception]]:
        t0 = time.perf_counter()
        ((k, engine),) = targets
        await engine.rpc("ap_ipc_load", self._handle, meta)
        return {k: time.perf_counter() - t0}, {}


class NCCLTransport(_FlatTransport):
    """Trainer rank 0 broadcasts the buffer to every vLLM worker of every replica over ONE NCCL group.

    The group holds rank 0 and each replica's workers, replica k's from its rank offset on (1 + the
    workers of the replicas before it); one broadcast per sync reaches them all. It is made again
    whenever the set of replicas pushed to changes (a replica down, or restarted: new processes).
    """

    kind = "nccl"

    def __init__(
        self, generation: VLLMGenerationEngine | ReplicatedGeneration, trainer: FSDPTrainEngine, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(generation, trainer)
        self.host = host
        self._group_of: tuple[tuple[int, int, int], ...] = ()  # (replica, engine id, incarnation) the group was made with
        self.rank_offsets: dict[int, int] = {}  # replica → rank of its first worker in the group
        self.world_size = 0
        self.init_s = 0.0

    @staticmethod
    def _members(targets: list[Target]) -> tuple[tuple[int, int, int], ...]:
        return tuple((k, id(engine), engine.incarnation) for k, engine in targets)

    async def _prepare(self) -> None:
        targets = self.targets()
        members = self._members(targets)
        if members == self._group_of:
            return  # a restarted vLLM has new worker processes: they need a new group
        t0 = time.perf_counter()
        port = w.free_port()
        offsets: dict[int, int] = {}
        world = 1  # trainer rank 0, then each replica's workers
        for k, engine in targets:
            offsets[k] = world
            world += len(engine.settings.gpus)
        self._group_of = ()
        async with anyio.create_task_group() as tg:  # every member must join the rendezvous together
            tg.start_soon(self.trainer.call, w.NcclInit(host=self.host, port=port, world_size=world))
            for k, engine in targets:
                tg.start_soon(engine.rpc, "ap_nccl_init", self.host, port, offsets[k], world)
        self._group_of, self.rank_offsets, self.world_size = members, offsets, world
        self.init_s = time.perf_counter() - t0
        log.info("nccl_group_ready", world_size=world, rank_offsets=offsets, init_s=round(self.init_s, 3))

    async def _transfer(self, meta: Meta, targets: list[Target]) -> tuple[dict[int, float], dict[int, Exception]]:
        if self._members(targets) != self._group_of:  # the group would wait for a rank that is not there
            raise RuntimeError(f"the replicas changed during the weight push (group {self._group_of}, now {targets})")
        numel = sum(n for *_, n in meta)
        t0 = time.perf_counter()
        loaded: dict[int, float] = {}
        errors: dict[int, Exception] = {}

        async def load(k: int, engine: VLLMGenerationEngine) -> None:
            await engine.rpc("ap_nccl_load", meta, numel)
            loaded[k] = time.perf_counter() - t0

        async def receive_all() -> None:
            errors.update(await _on_each(targets, load))

        async with anyio.create_task_group() as tg:
            tg.start_soon(self.trainer.call, w.NcclSend())  # ONE broadcast; every replica's workers receive it
            tg.start_soon(receive_all)
        return loaded, errors

    async def link_seconds(self, repeats: int = 5) -> float:
        """Best time of a bare broadcast of the flat buffer (no load): the link's share of a sync."""
        await self._prepare()
        targets = self.targets()
        numel = sum(n for *_, n in self.trainer.meta)
        replies: list[float] = []

        async def send() -> None:
            replies.append((await self.trainer.call(w.NcclBench(repeats=repeats)))[0].value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            for _, engine in targets:
                tg.start_soon(engine.rpc, "ap_nccl_recv_only", numel, repeats)
        return replies[0]
