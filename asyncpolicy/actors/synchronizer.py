"""The parameter synchronizer: stage weights → pause rollout → push → resume, with retries.

Staging (gathering the trainer's weights for the hand-over) runs while rollout goes on; only the
push holds generation up, and `SyncCounters.last_pause_s` records how long.

Two ways to hold generation up (`async_training.in_flight_updates`): by default the rollouter is
paused, which aborts running generations (partial rollout continues them, re-reading their tokens
under the new weights) or drains them; with in-flight updates the rollouter is left alone and the
transport pauses the engine in place (vLLM's pause mode "keep"): running requests stay in the
engine's scheduler, nothing is aborted or recomputed, and their later tokens carry the new version
(the staleness bound counts from a sample's oldest token, so it holds either way). Then the pause
is the push alone: `last_pause_s` is its time, an upper bound of the engine's own pause.

A sync either completes (the generation engine now serves the trainer's `version`) or raises
`SyncFailed` naming the cause after `sync_retries` retries, each attempt bounded by
`sync_timeout`. Rollout is resumed on every path out, so a failed sync never leaves a paused,
idle engine behind a run that looks alive. Syncs are serialised: one that arrives while another
runs waits for it, and a push the engine has already overtaken is skipped, so the engine never
goes back to an older version.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import msgspec
import structlog

from asyncpolicy import counters
from asyncpolicy.actors.rollouter import Rollouter
from asyncpolicy.config import AsyncTrainingConfig
from asyncpolicy.engines.protocols import WeightTransport
from asyncpolicy.errors import SyncFailed

log = structlog.get_logger("asyncpolicy.synchronizer")


class SyncCounters(msgspec.Struct, frozen=True, kw_only=True):
    """Counts and the last sync's timings, over the whole run; checkpoints hold them."""

    syncs: int = 0  # completed syncs (a skipped, overtaken push is none)
    failed_attempts: int = 0  # stage or push attempts that failed or timed out (retried or fatal)
    last_latency_s: float = 0.0  # the last sync: stage → resumed
    total_latency_s: float = 0.0
    last_stage_s: float = 0.0  # gathering the weights, rollout running
    last_rollout_pause_s: float = 0.0  # waiting for in-flight generations to stop (abort or drain)
    last_push_s: float = 0.0  # the transport's push, retries included
    last_pause_s: float = 0.0  # rollout stopped: pause requested → resumed (what generation loses)
    last_in_flight: int = 0  # generations running when the last sync began (aborted, drained, or kept running)


class SyncStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A consistent view of the synchronizer now; metrics and logs read these, never the internals."""

    counters: SyncCounters
    syncing: bool  # a sync is running (or waiting for the one that runs)


class SyncResult(msgspec.Struct, frozen=True):
    """What one `sync` call cost: all zero when the engine already served that version (nothing pushed)."""

    latency_s: float = 0.0  # stage → resumed
    pause_s: float = 0.0  # rollout stopped: pause requested → resumed
    in_flight: int = 0  # generations running when it began


class ParameterSynchronizer:
    """Moves trainer weights into the rollout engine between training steps."""

    name = "synchronizer"

    def __init__(self, cfg: AsyncTrainingConfig, rollouter: Rollouter, transport: WeightTransport) -> None:
        self.cfg = cfg
        self.rollouter = rollouter
        self.transport = transport
        self._counters = SyncCounters()
        self._lock = anyio.Lock()  # one sync at a time: the trainer's, or an engine restart's

    def snapshot(self) -> SyncCounters:
        return self._counters

    def restore(self, snap: SyncCounters) -> None:
        """Load a snapshot into this fresh synchronizer: the counts continue."""
        if self._counters != SyncCounters():
            raise RuntimeError("synchronizer: restore() needs a fresh synchronizer")
        self._counters = snap

    def statistics(self) -> SyncStatistics:
        return SyncStatistics(counters=self._counters, syncing=self._lock.locked())

    async def sync(self, version: int, *, force: bool = False) -> SyncResult:
        """Make the rollout serve `version`; returns this call's latency and pause.

        `force` pushes even when the engine reports that version already (a restarted engine
        holds its initial weights, whatever it reports).
        """
        async with self._lock:
            start = time.monotonic()
            if not force and self.rollouter.version >= version:
                return SyncResult()  # a newer push already happened while this one waited
            await self._with_retries(version, self.transport.stage)
            staged = paused = pushed = time.monotonic()
            in_flight = self.rollouter.statistics().running
            async with self._rollout_held():
                paused = time.monotonic()
                await self._with_retries(version, self.transport.push)
                pushed = time.monotonic()
            self.rollouter.notify_version()  # admission's staleness capacity follows the version
        end = time.monotonic()
        latency = end - start
        c = self._counters = msgspec.structs.replace(
            self._counters,
            syncs=self._counters.syncs + 1,
            last_latency_s=latency,
            total_latency_s=self._counters.total_latency_s + latency,
            last_stage_s=staged - start,
            last_rollout_pause_s=paused - staged,
            last_push_s=pushed - paused,
            last_pause_s=end - staged,
            last_in_flight=in_flight,
        )
        log.debug(
            "weights_synced",
            version=version,
            latency_s=round(latency, 4),
            stage_s=round(c.last_stage_s, 4),
            rollout_pause_s=round(c.last_rollout_pause_s, 4),
            push_s=round(c.last_push_s, 4),
            pause_s=round(c.last_pause_s, 4),
            in_flight=in_flight,
            in_place=self.cfg.in_flight_updates,
        )
        return SyncResult(latency_s=latency, pause_s=c.last_pause_s, in_flight=in_flight)

    @contextlib.asynccontextmanager
    async def _rollout_held(self) -> AsyncIterator[None]:
        """Hold rollout for a push: pause the rollouter — partial rollout interrupts generations (they
        continue under the new weights), otherwise they finish under the weights that started them —
        and resume it on every path out; with in-flight updates leave it running (the transport
        pauses the engine in place around its hand-over)."""
        if self.cfg.in_flight_updates:
            yield
            return
        try:
            await self.rollouter.pause("sync", drain=not self.cfg.partial_rollout)
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.rollouter.resume("sync")

    async def sync_weights(self, version: int) -> bool:
        """The seed's check: True once the rollout serves `version` (raises SyncFailed otherwise)."""
        await self.sync(version)
        return True

    async def _with_retries(self, version: int, step: Callable[[int], Awaitable[None]]) -> None:
        delay = self.cfg.sync_backoff_s
        for attempt in range(self.cfg.sync_retries + 1):
            try:
                with anyio.fail_after(self.cfg.sync_timeout):
                    await step(version)
                return
            except Exception as exc:  # transport failure or TimeoutError: retried, then fatal
                self._counters = counters.add(self._counters, failed_attempts=1)
                cause = f"timeout after {self.cfg.sync_timeout}s" if isinstance(exc, TimeoutError) else repr(exc)
                if attempt == self.cfg.sync_retries:
                    raise SyncFailed(
                        f"weight sync to version {version} failed after {attempt + 1} attempt(s): {cause}"
                    ) from exc
                log.warning("sync_retry", version=version, attempt=attempt + 1, error=cause, backoff_s=delay)
                await anyio.sleep(delay)
                delay *= 2
