"""The trainer: takes batches from the channel, trains, bumps the version, triggers syncs.

Invariants: every batch it trains on has `version - sample.min_version <= staleness_threshold`
for each sample (the channel enforces it; the trainer re-checks and fails loudly rather than
train on a violation); the policy version increases by exactly one per step; weights are pushed
every `trigger_parameter_sync_step` steps, and the trainer waits for the push, so weights never
change under a transfer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import msgspec
import structlog

from asyncpolicy import counters
from asyncpolicy.actors.synchronizer import ParameterSynchronizer
from asyncpolicy.channels import EndOfStream, VersionedChannel
from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import TrainEngine
from asyncpolicy.errors import RunFailed
from asyncpolicy.samples import Sample

log = structlog.get_logger("asyncpolicy.trainer")


class StepReport(msgspec.Struct, kw_only=True):
    """What one training step did, for the metrics collector."""

    step: int
    version: int  # after the step
    batch: list[Sample]
    engine_metrics: dict[str, float]
    sync_latency_s: float | None
    sync_pause_s: float | None  # of that sync, the time rollout was stopped
    sync_in_flight: int | None = None  # of that sync, the generations running when it began
    wait_s: float
    train_s: float


class TrainerSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a checkpoint needs to continue the count (the weights are the engine's)."""

    step: int = 0  # training steps done
    version: int = 0  # policy version: one more per step
    idle_s: float = 0.0  # total time waiting for batches, over the whole run


class TrainerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A consistent view of the trainer now; metrics and logs read these, never the internals."""

    step: int
    version: int
    idle_s: float  # over the whole run (a resumed run's earlier processes included)
    idle_ratio: float  # share of this process's wall time spent waiting for batches


class Trainer:
    """Consumes `data.train_batch_size` samples per step until `total_training_steps`."""

    name = "trainer"

    def __init__(
        self,
        cfg: Config,
        engine: TrainEngine,
        channel: VersionedChannel[Sample],
        synchronizer: ParameterSynchronizer,
        on_step: Callable[[StepReport], None],
        checkpoint: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.channel = channel
        self.synchronizer = synchronizer
        self.on_step = on_step
        self.checkpoint = checkpoint
        self._state = TrainerSnapshot()
        # Held while the weights change; whoever reads them from outside the trainer's own
        # sequence (an engine restart's weight push) takes it too.
        self.weights_lock = anyio.Lock()
        self._started_at = time.monotonic()
        self._idle_base = 0.0  # idle time restored from a checkpoint: the ratio covers this process only

    @property
    def version(self) -> int:
        return self._state.version

    def snapshot(self) -> TrainerSnapshot:
        return self._state

    def restore(self, snap: TrainerSnapshot) -> None:
        """Load a snapshot into this fresh trainer (its engine loads the weights separately)."""
        if self._state != TrainerSnapshot():
            raise RuntimeError("trainer: restore() needs a fresh trainer")
        self._state = snap
        self._idle_base = snap.idle_s

    def statistics(self) -> TrainerStatistics:
        s = self._state
        idle_ratio = (s.idle_s - self._idle_base) / max(1e-9, time.monotonic() - self._started_at)
        return TrainerStatistics(
            step=s.step, version=s.version, idle_s=s.idle_s, idle_ratio=idle_ratio
        )

    async def _bounded_step(self, batch: list[Sample]) -> dict[str, float]:
        limit = self.cfg.trainer.step_timeout_s
        try:
            with anyio.fail_after(limit):
                return await self.engine.train_step(batch, self._state.version)
        except TimeoutError:
            raise RunFailed(
                f"training step {self._state.step + 1} took longer than trainer.step_timeout_s={limit}s"
            ) from None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        total = cfg.trainer.total_training_steps
        self._started_at, self._idle_base = time.monotonic(), self._state.idle_s
        task_status.started()
        while self._state.step < total:
            waited = time.monotonic()
            try:
                batch = await self.channel.get_batch(cfg.data.train_batch_size, self._state.version)
            except EndOfStream:
                raise RunFailed(
                    f"the sample channel closed after step {self._state.step} of {total}; the rollouter stopped early"
                ) from None
            wait_s = time.monotonic() - waited
            self._state = counters.add(self._state, idle_s=wait_s)
            # A fixed order makes the batch independent of completion order (on-policy equivalence).
            batch.sort(key=lambda s: (s.prompt.epoch, s.prompt.index))
            # the channel's bound, checked again on what is about to be trained (its age metrics are the channel's)
            oldest_age = self._state.version - min(s.min_version for s in batch)
            if oldest_age > cfg.async_training.staleness_threshold:
                raise RunFailed(
                    f"staleness bound violated: sample age {oldest_age} > {cfg.async_training.staleness_threshold}"
                )
            started = time.monotonic()
            # Shielded: a batch taken from the channel is trained on and counted, or neither;
            # a stop request waits for the step instead of losing the batch half-way.
            with anyio.CancelScope(shield=True):
                async with self.weights_lock:
                    engine_metrics = await self._bounded_step(batch)
                self._state = counters.add(self._state, step=1, version=1)
            train_s = time.monotonic() - started
            sync_latency = sync_pause = sync_in_flight = None
            try:
                if self._state.step % cfg.async_training.trigger_parameter_sync_step == 0:
                    done = await self.synchronizer.sync(self._state.version)
                    sync_latency, sync_pause, sync_in_flight = done.latency_s, done.pause_s, done.in_flight
            finally:  # the step happened: its metrics line is written even if the sync is cancelled or fails
                self.on_step(
                    StepReport(
                        step=self._state.step,
                        version=self._state.version,
                        batch=batch,
                        engine_metrics=engine_metrics,
                        sync_latency_s=sync_latency,
                        sync_pause_s=sync_pause,
                        sync_in_flight=sync_in_flight,
                        wait_s=wait_s,
                        train_s=train_s,
                    )
                )
            save_freq = cfg.trainer.save_freq
            if self.checkpoint is not None and save_freq and self._state.step % save_freq == 0 and self._state.step < total:
                await self.checkpoint("save_freq")
        log.info("training_finished", steps=self._state.step, version=self._state.version)
