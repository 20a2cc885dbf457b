"""TrainEngine over `n` FSDP2 worker processes that this engine starts, drives and stops.

The engine is the executor: it sends one typed command to every rank and waits for every
rank's `Reply`, each wait bounded by `timeout_s`. A worker that dies (its pipe closes) or stops
answering fails the call with `RunFailed`/`EngineTimeout` naming the rank — never a hang, never
a silent success. After any failure the engine refuses further work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import structlog

from asyncpolicy.engines import fsdp_worker as w
from asyncpolicy.errors import EngineTimeout, RunFailed
from asyncpolicy.samples import Sample

log = structlog.get_logger("asyncpolicy.fsdp")


class WorkerDied(RunFailed):
    """A trainer worker process exited or raised."""


class FSDPTrainEngine:
    """`len(gpus)` ranks of data-parallel FSDP2 training; gpus=[None] trains on CPU over gloo (tests)."""

    def __init__(self, base: w.WorkerInit, gpus: Sequence[int | None], timeout_s: float = 600.0, start_timeout_s: float = 900.0) -> None:
        self.base = base
        self.gpus = list(gpus)
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._broken: str = ""
        self._lock = anyio.Lock()
        self.n_params = 0
        self.meta: list[tuple[str, list[int], int, int]] = []
        self.last_pack_s = 0.0

    @property
    def world_size(self) -> int:
        return len(self.gpus)

    async def start(self) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = w.free_port()
        for rank, gpu in enumerate(self.gpus):
            init = msgspec.structs.replace(self.base, rank=rank, world_size=len(self.gpus), gpu=gpu, master_port=port)
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=w.worker_main, args=(w.encode(init), child), name=f"fsdp-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        t0 = time.perf_counter()
        replies = await self._gather(self.start_timeout_s, "start")
        self.n_params = int(replies[0].value)
        log.info("fsdp_started", ranks=self.world_size, gpus=self.gpus, params_M=round(self.n_params / 1e6, 1), start_s=round(time.perf_counter() - t0, 1))

    def _recv(self, rank: int, deadline: float) -> w.Reply:
        conn, proc = self._conns[rank], self._procs[rank]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineTimeout(f"FSDP worker rank {rank} did not answer within its timeout")
            try:
                if conn.poll(min(left, 1.0)):
                    return w.reply_decoder.decode(conn.recv_bytes())
            except (EOFError, OSError):
                proc.join(5)
                raise WorkerDied(f"FSDP worker rank {rank} died (exit code {proc.exitcode})") from None
            if not proc.is_alive():
                raise WorkerDied(f"FSDP worker rank {rank} died (exit code {proc.exitcode})")

    async def _gather(self, timeout: float, what: str) -> list[w.Reply]:
        deadline = time.monotonic() + timeout
        replies: list[w.Reply | None] = [None] * self.world_size

        async def one(rank: int) -> None:
            replies[rank] = await anyio.to_thread.run_sync(self._recv, rank, deadline, abandon_on_cancel=True)

        try:
            async with anyio.create_task_group() as tg:
                for rank in range(self.world_size):
                    tg.start_soon(one, rank)
        except BaseException as e:
            self._broken = f"{what} failed: {e!r}"
            raise
        bad = [r for r in replies if r is not None and not r.ok]
        if bad:
            self._broken = f"{what} failed on rank {bad[0].rank}"
            raise WorkerDied(f"FSDP worker rank {bad[0].rank} failed during {what}:\n{bad[0].error}")
        return [r for r in replies if r is not None]

    async def call(self, cmd: Any, timeout: float | None = None) -> list[w.Reply]:
        """Send `cmd` to every rank; every rank's reply, or an error naming the failed rank."""
        if self._broken:
            raise RunFailed(f"FSDP trainer is unusable after an earlier failure ({self._broken})")
        async with self._lock:  # one command in flight: replies stay in order
            blob = w.encode(cmd)
            for rank, conn in enumerate(self._conns):
                try:
                    conn.send_bytes(blob)
                except (BrokenPipeError, OSError):
                    self._broken = f"rank {rank} pipe closed"
                    raise WorkerDied(f"FSDP worker rank {rank} died (exit code {self._procs[rank].exitcode})") from None
            return await self._gather(timeout or self.timeout_s, type(cmd).__name__)

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
        """Sharded checkpoint of weights, optimizer and schedule (each rank writes its own shards)."""
        import os

        os.makedirs(directory, exist_ok=True)
        await self.call(w.SaveState(directory=os.path.abspath(directory)))

    async def load_state(self, directory: str) -> None:
        import os

        await self.call(w.LoadState(directory=os.path.abspath(directory)))

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
            for proc in self._procs:
                await anyio.to_thread.run_sync(proc.join, 10)
                if proc.is_alive():
                    proc.terminate()
                    await anyio.to_thread.run_sync(proc.join, 5)
            for conn in self._conns:
                conn.close()
        self._procs, self._conns = [], []

