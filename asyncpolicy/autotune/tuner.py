"""The autotune task: watches the actors, asks `policy.decide` every few steps, applies its answer.

One more task in the Supervisor's actor task group, cancelled with the others. It only reads the
actors' `statistics()` (and each step's behaviour KL, from the step callback) and moves two knobs that exist for it (`Rollouter.set_admission_window`,
`VersionedChannel.set_staleness_limit`); whatever it does, the channel's hard bound
(`staleness_threshold`) and the sample accounting are untouched. Every wait is bounded: it samples
the statistics every `SAMPLE_S` seconds and at every training step. Its limits are in
checkpoints (`snapshot` / `restore`): a resumed run tunes on from the limits it had, within the
resumed config's bounds; a probe still waiting for its verdict is dropped (its throughput before was
measured by another process).

CPU threads (the hf/torch path) are not moved: the hf engine's worker thread and the torch trainer's
worker thread live in one process, and `torch.set_num_threads` is process-wide, so a "generation
share" of threads cannot be set apart from the training share without separate processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import anyio
import anyio.abc
import msgspec
import structlog

from asyncpolicy.actors.rollouter import Rollouter
from asyncpolicy.actors.synchronizer import ParameterSynchronizer
from asyncpolicy.actors.trainer import Trainer
from asyncpolicy.autotune.policy import AutotuneSnapshot, Limits, Memory, Observation, bounds_for, decide
from asyncpolicy.channels import VersionedChannel
from asyncpolicy.channels.signal import StateSignal
from asyncpolicy.config import Config
from asyncpolicy.samples import Sample

log = structlog.get_logger("asyncpolicy.autotune")

SAMPLE_S = 0.01  # how often the admission state is sampled between steps
MIN_INTERVAL_S = 0.25  # an interval lasts this long at least, whatever its step count (why: _observe_interval)
BEHAVIOUR_KL = "is/approx_kl_behaviour_k3"  # the trainer's KL(behaviour || trainer) over a step's tokens


class AutotuneStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What the controller has done; the `autotune/*` metrics."""

    window: int
    staleness: int  # the effective staleness bound
    moves: int  # decisions that changed a limit
    decisions: int
    last_reason: str


class Autotuner:
    """Applies `policy.decide` to the run every `async_training.autotune_every_steps` steps."""

    name = "autotune"

    def __init__(
        self,
        cfg: Config,
        rollouter: Rollouter,
        trainer: Trainer,
        channel: VersionedChannel[Sample],
        synchronizer: ParameterSynchronizer,
    ) -> None:
        at = cfg.async_training
        self.every = at.autotune_every_steps
        self.rollouter, self.trainer, self.channel, self.synchronizer = rollouter, trainer, channel, synchronizer
        self.bounds, self.limits = bounds_for(
            min_window=at.autotune_min_window,
            max_window=at.autotune_max_window,
            staleness_threshold=at.staleness_threshold,
            sync_every=at.trigger_parameter_sync_step,
            initial_window=rollouter.statistics().admission_window,
        )
        self.memory = Memory()
        self._moves = self._decisions = 0
        self._reason = "start"
        self._stepped = StateSignal()
        self._steps_seen = 0  # on_step calls: a step is counted once its sync (if any) is done
        self._kl_sum, self._kl_steps = 0.0, 0  # the trainer's behaviour KL, summed over the steps that reported it
        self._apply(self.limits)  # before any actor runs: admission follows the starting limits from the first group

    def on_step(self, engine_metrics: Mapping[str, float]) -> None:
        """The supervisor's step callback, after the step's sync: wakes the task (an interval ends
        on a count of these, so a decision never falls inside the sync that follows a step). The
        step's behaviour KL is kept: what staleness costs the learning, which no statistics() has."""
        self._steps_seen += 1
        kl = engine_metrics.get(BEHAVIOUR_KL)
        if kl is not None and math.isfinite(kl):
            self._kl_sum += kl
            self._kl_steps += 1
        self._stepped.notify()

    def statistics(self) -> AutotuneStatistics:
        return AutotuneStatistics(
            window=self.limits.window,
            staleness=self.limits.staleness,
            moves=self._moves,
            decisions=self._decisions,
            last_reason=self._reason,
        )

    def snapshot(self) -> AutotuneSnapshot:
        return AutotuneSnapshot(
            limits=self.limits, memory=self.memory, moves=self._moves, decisions=self._decisions, last_reason=self._reason
        )

    def restore(self, snap: AutotuneSnapshot) -> None:
        """Load a checkpoint's controller state into this fresh one (after the channel's restore)."""
        if self._decisions or self._moves:
            raise RuntimeError("autotune: restore() needs a fresh controller")
        b = self.bounds
        self._apply(Limits(
            window=min(b.max_window, max(b.min_window, snap.limits.window)),
            staleness=min(b.max_staleness, max(b.min_staleness, snap.limits.staleness)),
        ))
        self.memory = msgspec.structs.replace(snap.memory, probe="", settle=0, before=None, rate_before=0.0)
        self._moves, self._decisions, self._reason = snap.moves, snap.decisions, snap.last_reason

    def metrics(self) -> dict[str, float]:
        """The `autotune/*` keys of a metrics line."""
        return {"autotune/window": self.limits.window, "autotune/staleness": self.limits.staleness, "autotune/moves": self._moves}

    def _apply(self, limits: Limits) -> None:
        self.rollouter.set_admission_window(limits.window)
        self.channel.set_staleness_limit(limits.staleness)
        self.limits = limits

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        log.info("autotune_started", window=self.limits.window, staleness=self.limits.staleness, bounds=msgspec.to_builtins(self.bounds))
        while True:
            obs = await self._observe_interval()
            decision = decide(obs, self.limits, self.bounds, self.memory)
            self.memory = decision.memory
            self._decisions += 1
            self._reason = decision.reason
            if not decision.moved(self.limits):
                log.debug("autotune_hold", reason=decision.reason, trainer_idle=round(obs.trainer_idle, 3), drops=obs.stale_drops)
            else:
                before = self.limits
                self._apply(decision.limits)
                self._moves += 1
                log.info(
                    "autotune_move",
                    reason=decision.reason,
                    window=decision.limits.window,
                    staleness=decision.limits.staleness,
                    window_before=before.window,
                    staleness_before=before.staleness,
                    step=self.trainer.statistics().step,
                    moves=self._moves,
                    trainer_idle=round(obs.trainer_idle, 3),
                    steps_per_s=round(obs.rate, 3),
                )

    async def _observe_interval(self) -> Observation:
        """Sample the admission state until `every` more steps are trained and `MIN_INTERVAL_S` has
        passed (each wait bounded). The floor is for fast loops: 4 steps of 25 ms are a tenth of a
        second, in which a busy host's scheduling hiccups (tens of ms) moved a measured rate by up
        to 2x, and every probe is judged by that rate. On a GPU, where a step takes seconds, it
        never binds."""
        t0, tr0, seen0 = time.monotonic(), self.trainer.statistics(), self._steps_seen
        kl0 = (self._kl_sum, self._kl_steps)
        chan0 = self.channel.statistics()
        samples = window_full = room_exhausted = queue_full = 0
        age_max = -math.inf
        last_step = tr0.step
        while True:
            with anyio.move_on_after(SAMPLE_S):
                await self._stepped.wait()
            rollout, chan, trainer = self.rollouter.statistics(), self.channel.statistics(), self.trainer.statistics()
            samples += 1
            window_full += rollout.generating >= rollout.admission_window
            room_exhausted += rollout.admission_room <= 0
            queue_full += chan.size >= chan.capacity
            if trainer.step != last_step and not math.isnan(chan.sample_age_max):
                age_max = max(age_max, chan.sample_age_max)
                last_step = trainer.step
            if self._steps_seen - seen0 >= self.every and time.monotonic() - t0 >= MIN_INTERVAL_S:
                break
        seconds = time.monotonic() - t0
        kl_steps = self._kl_steps - kl0[1]
        return Observation(
            steps=self._steps_seen - seen0,
            seconds=seconds,
            trainer_idle=min(1.0, max(0.0, (trainer.idle_s - tr0.idle_s) / max(seconds, 1e-9))),
            window_full=window_full / samples,
            room_exhausted=room_exhausted / samples,
            queue_full=queue_full / samples,
            stale_drops=chan.dropped_stale - chan0.dropped_stale,
            trained=chan.consumed - chan0.consumed,
            age_max=age_max if math.isfinite(age_max) else math.nan,
            behaviour_kl=(self._kl_sum - kl0[0]) / kl_steps if kl_steps else math.nan,
            syncing=self.synchronizer.statistics().syncing,
            paused=rollout.paused,
        )
