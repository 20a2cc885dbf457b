"""TrainEngine over `n` FSDP2 worker processes that this engine starts, drives and stops.

The engine is the executor: it sends one typed command to every rank and waits for every
rank's `Reply`, each wait bounded by `timeout_s`. A worker that dies (its pipe closes) or stops
answering fails the call with `RunFailed`/`EngineTimeout` naming the rank — never a hang, never
a silent success. After any failure the engine refuses further work.

A cancelled wait is not a failure: the replies of the interrupted command are collected into
its `_Replies` record and drained before the next command is sent (a SIGINT during a weight
sync still gets its stop checkpoint). The workers ignore the terminal's SIGINT/SIGTERM
(`child_procs`): the supervisor stops them, in order, after its stop checkpoint.

With `trainer.nnodes` > 1 the engine still starts and reads only node 0's ranks; global rank 0
relays every command to the ranks of the other nodes (started by `python -m asyncpolicy
trainer-node`) and returns their replies inside its own, so a failure there names its rank and
node like a local one (`relay.Relay`).
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import structlog

from asyncpolicy.config import FSDP_START_TIMEOUT_S
from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.child_procs import children_shielded
from asyncpolicy.engines.training.setup import TrainerSummary
from asyncpolicy.errors import EngineTimeout, RunFailed
from asyncpolicy.samples import Sample

log = structlog.get_logger("asyncpolicy.fsdp")


class WorkerDied(RunFailed):
    """A trainer worker process exited or raised."""


class _Replies:
    """The replies to one command, stored as they arrive, so a cancelled wait loses none of them."""

    def __init__(self, what: str, ranks: int, deadline: float) -> None:
        self.what = what
        self.deadline = deadline
        self.replies: list[w.Reply | None] = [None] * ranks  # every node's ranks; rank 0's reply brings the remote ones
        self.reader = threading.Lock()  # one collecting thread at a time reads the pipes

    def store(self, reply: w.Reply) -> None:
        for relayed in reply.relayed:
            self.replies[relayed.rank] = relayed
        self.replies[reply.rank] = msgspec.structs.replace(reply, relayed=[])


class FSDPTrainEngine:
    """`len(gpus)` ranks of data-parallel FSDP2 training on each of `trainer.nnodes` nodes; gpus=[None]
    trains on CPU over gloo (tests). The engine starts node 0's ranks, on this machine."""

    def __init__(self, base: w.WorkerInit, gpus: Sequence[int | None], timeout_s: float = 600.0, start_timeout_s: float = FSDP_START_TIMEOUT_S) -> None:
        self.base = base
        self.gpus = list(gpus)  # this node's
        self.nnodes = base.config.trainer.nnodes
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._broken: str = ""
        self._pending: _Replies | None = None  # an interrupted command's replies, drained before the next
        self._lock = anyio.Lock()
        # A doorbell a cancelled caller rings: its collecting thread, waiting on the pipes and the
        # processes' sentinels, wakes at once and lets go of them (no poll interval).
        self._wake_reader, self._wake = multiprocessing.Pipe(duplex=False)
        self.n_params = 0
        self.summary: TrainerSummary | None = None  # rank 0's set-up as built, after start()
        self.meta: list[tuple[str, list[int], int, int]] = []
        self.last_pack_s = 0.0

    @property
    def world_size(self) -> int:
        return len(self.gpus) * self.nnodes

    def _where(self, rank: int) -> str:
        return f"rank {rank}" if self.nnodes == 1 else f"rank {rank} (node {rank // len(self.gpus)})"

    async def start(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = self.base.config.trainer.master_port or w.free_port()
        with children_shielded():  # the ranks never see the terminal's SIGINT/SIGTERM
            for rank, gpu in enumerate(self.gpus):
                init = w.rank_init(self.base, rank, gpu, len(self.gpus), port)
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=w.worker_main, args=(w.encode(init), child), name=f"fsdp-rank{rank}", daemon=True)
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
        t0 = time.perf_counter()
        pending = _Replies("start", self.world_size, time.monotonic() + self.start_timeout_s)
        replies = await self._await(pending, pending.deadline)
        self.n_params = int(replies[0].value)
        self.summary = replies[0].summary
        log.info(
            "fsdp_started", ranks=self.world_size, gpus=self.gpus, params_M=round(self.n_params / 1e6, 1),
            start_s=round(time.perf_counter() - t0, 1), **(msgspec.structs.asdict(self.summary) if self.summary else {}),
        )

    def _died(self, rank: int) -> WorkerDied:
        proc = self._procs[rank]
        proc.join(5)
        return WorkerDied(f"FSDP worker rank {rank} died (exit code {proc.exitcode})")

    def _collect(self, pending: _Replies, deadline: float, cancelled: threading.Event) -> None:
        """Read replies into `pending` until every rank answered (worker thread).

        Raises on a failed reply, a dead rank or the deadline; returns early once `cancelled`
        is set (its caller then rings `_wake`), having stored whatever arrived (the next collector
        continues from there). One wait on the pipes, the processes' sentinels and the doorbell:
        a reply, a death or a cancellation is seen as it happens.
        """
        with pending.reader:
            while True:
                bad = next((r for r in pending.replies if r is not None and not r.ok), None)
                if bad is not None:
                    raise WorkerDied(f"FSDP worker {self._where(bad.rank)} failed during {pending.what}:\n{bad.error}")
                # this node's ranks; the other nodes' replies come inside rank 0's
                missing = [rank for rank in range(len(self._conns)) if pending.replies[rank] is None]
                if not missing or cancelled.is_set():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    relaying = f" (it relays the ranks of nodes 1..{self.nnodes - 1})" if missing[0] == 0 and self.nnodes > 1 else ""
                    raise EngineTimeout(f"FSDP worker rank {missing[0]}{relaying} did not answer {pending.what} within its timeout")
                conns = {self._conns[rank]: rank for rank in missing}
                sentinels = {self._procs[rank].sentinel: rank for rank in missing}
                ready = multiprocessing.connection.wait([*conns, *sentinels, self._wake_reader], timeout=left)
                if self._wake_reader in ready:
                    while self._wake_reader.poll():  # rung for this collector or an earlier, finished one
                        self._wake_reader.recv_bytes()
                for obj in ready:
                    if obj in conns:
                        rank = conns[obj]
                        try:
                            pending.store(w.reply_decoder.decode(self._conns[rank].recv_bytes()))
                        except (EOFError, OSError):
                            raise self._died(rank) from None
                for obj in ready:
                    if obj in sentinels:  # exited: dead unless its last reply is still in the pipe
                        rank = sentinels[obj]
                        if pending.replies[rank] is None and not self._conns[rank].poll():
                            raise self._died(rank)

    async def _await(self, pending: _Replies, deadline: float) -> list[w.Reply]:
        """Every rank's reply to `pending`'s command; a cancelled wait leaves it to be drained."""
        cancelled = threading.Event()
        try:
            await anyio.to_thread.run_sync(self._collect, pending, deadline, cancelled, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            cancelled.set()  # then wake its thread: it lets go of the pipes; replies stay in `pending`
            with contextlib.suppress(OSError):  # closed: the engine is closed, no thread is left to wake
                self._wake.send_bytes(b"")
            self._pending = pending
            log.info("fsdp_command_interrupted", command=pending.what, note="its replies are drained before the next command")
            raise
        except BaseException as e:
            self._broken = f"{pending.what} failed: {e!r}"
            raise
        self._pending = None
        replies = [r for r in pending.replies if r is not None]
        if len(replies) != self.world_size:  # rank 0 answered without relaying every other node's rank
            self._broken = f"{pending.what}: {len(replies)} of {self.world_size} replies"
            raise WorkerDied(f"FSDP trainer: {len(replies)} of {self.world_size} ranks answered {pending.what}")
        return replies

    async def call(self, cmd: Any, timeout: float | None = None) -> list[w.Reply]:
        """Send `cmd` to every rank; every rank's reply, or an error naming the failed rank."""
        if self._broken:
            raise RunFailed(f"FSDP trainer is unusable after an earlier failure ({self._broken})")
        limit = timeout or self.timeout_s
        async with self._lock:  # one command in flight: replies stay in order
            if self._pending is not None:
                interrupted = self._pending
                await self._await(interrupted, min(interrupted.deadline, time.monotonic() + limit))
                log.info("fsdp_command_drained", command=interrupted.what)
            blob = w.encode(cmd)
            for rank, conn in enumerate(self._conns):
                try:
                    conn.send_bytes(blob)
                except (BrokenPipeError, OSError):
                    self._broken = f"rank {rank} pipe closed"
                    raise WorkerDied(f"FSDP worker rank {rank} died (exit code {self._procs[rank].exitcode})") from None
            pending = _Replies(type(cmd).__name__, self.world_size, time.monotonic() + limit)
            return await self._await(pending, pending.deadline)

    async def train_step(self, batch: list[Sample], version: int) -> dict[str, float]:
        replies = await self.call(w.Train(batch=batch, version=version))
        return dict(replies[0].metrics)

    async def pack(self) -> list[tuple[str, list[int], int, int]]:
        """Gather full weights into rank 0's flat buffer; returns its layout."""
        replies = await self.call(w.Pack())
        self.meta = [tuple(m) for m in replies[0].meta]  # type: ignore[misc]
        self.last_pack_s = replies[0].value
        return self.meta

    async def save_state(self, directory: str) -> None:
        """Sharded checkpoint of weights, optimizer and schedule (each rank writes its own shards;
        several nodes must share the directory's filesystem: checked first, see `_shared_check`)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.abspath(directory)
        with self._shared_check(path) as token:
            await self.call(w.SaveState(directory=path, shared_check=token))

    async def load_state(self, directory: str) -> None:
        path = os.path.abspath(directory)
        with self._shared_check(path) as token:
            await self.call(w.LoadState(directory=path, shared_check=token))

    @contextlib.contextmanager
    def _shared_check(self, directory: str) -> Iterator[str]:
        """Several nodes: a token in `directory` that every rank must read back before DCP touches it."""
        if self.nnodes == 1:
            yield ""
            return
        token = uuid.uuid4().hex
        marker = os.path.join(directory, w.SHARED_CHECK_FILE)
        with open(marker, "w") as f:
            f.write(token)
        try:
            yield token
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(marker)

    async def save_model(self, directory: str) -> None:
        """The full model as a Hugging Face directory (safetensors, config, tokenizer), written by rank 0."""
        os.makedirs(directory, exist_ok=True)
        await self.call(w.SaveModel(directory=os.path.abspath(directory)))

    async def full_state_dict(self) -> dict[str, Any]:
        """Full tensors on the CPU, Hugging Face names (CPU weight sync to the hf engine)."""
        import io

        import torch

        blob = (await self.call(w.FullState()))[0].blob
        # a whole model's tensors: deserialised in a worker thread, not on the event loop
        return await anyio.to_thread.run_sync(lambda: torch.load(io.BytesIO(blob), weights_only=True))

    async def checksum(self) -> float:
        return (await self.call(w.Checksum()))[0].value

    async def aclose(self) -> None:
        if not self._procs:
            return
        with anyio.CancelScope(shield=True):
            if not self._broken:
                try:
                    await self.call(w.Stop(), timeout=30)
                except Exception as e:  # still tear the processes down below
                    log.warning("fsdp_stop_failed", error=repr(e))
            for conn in self._conns:
                conn.close()  # a rank waiting for its next command reads EOF and exits
            for proc in self._procs:
                await anyio.to_thread.run_sync(proc.join, 10)
                if proc.is_alive():
                    proc.kill()  # the workers ignore SIGTERM; they stop by command, EOF, or not at all
                    await anyio.to_thread.run_sync(proc.join, 5)
        self._procs, self._conns = [], []
        self._wake.close()
        self._wake_reader.close()

