"""The validator: scores the rollout policy on held-out prompts at the start (the policy training
starts from) and every `trainer.test_freq` steps.

Greedy by default (`rollout.val_temperature=0`), so `val/accuracy` is pass@1: the share of
held-out prompts whose one greedy response scores as correct.

It runs beside training, never in its way: its generations go through the rollouter's guarded
path (so weight syncs pause them like any other) but their results never enter the channel.
Requests that arrive while a validation runs are coalesced into one for the latest step.
A validation whose generations fail is logged as an error and counted (`failures`), and the
next one is tried; it does not stop training, whose own generations fail the run (after engine
restarts) if the engine is really gone.
"""

from __future__ import annotations

import math

import anyio
import anyio.abc
import msgspec
import structlog

from asyncpolicy.actors.rollouter import Rollouter
from asyncpolicy.channels.signal import StateSignal
from asyncpolicy.errors import GenerationFailed, first_failure
from asyncpolicy.samples import Prompt

log = structlog.get_logger("asyncpolicy.validator")

CORRECT = 1.0  # a reward at least this counts as a correct answer (math tasks score 0 or 1; reverse/copy/add 1 when exact)


class ValidationResult(msgspec.Struct, frozen=True, kw_only=True):
    step: int  # the training step after which validation started
    rollout_version: int
    reward_mean: float
    accuracy: float  # share of prompts whose response scored at least 1: a correct answer on every built-in task
    prompts: int
    tool_call_rate: float = 0.0  # share of prompts whose episode called a tool at least once (0 single-turn)


class ValidatorSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What a checkpoint keeps of validation: a resumed run's learning curve and failure count go on
    from where they were, not from nothing."""

    history: list[ValidationResult] = msgspec.field(default_factory=list)
    failures: int = 0


class Validator:
    """Held-out reward of the policy being served, measured concurrently with training."""

    name = "validator"

    def __init__(self, rollouter: Rollouter, prompts: list[Prompt], concurrency: int) -> None:
        self.rollouter = rollouter
        self.prompts = prompts
        self.limiter = anyio.CapacityLimiter(max(1, concurrency))
        self.latest: ValidationResult | None = None
        self._history: list[ValidationResult] = []
        self.failures = 0
        self._requested_step: int | None = None
        self._changed = StateSignal()

    def history(self) -> tuple[ValidationResult, ...]:
        """Every validation that completed, in order: metrics lines carry only the latest, and two may
        end between one line and the next (a learning curve needs them all)."""
        return tuple(self._history)

    def snapshot(self) -> ValidatorSnapshot:
        return ValidatorSnapshot(history=list(self._history), failures=self.failures)

    def restore(self, snap: ValidatorSnapshot) -> None:
        self._history = list(snap.history)
        self.latest = self._history[-1] if self._history else None
        self.failures = snap.failures

    def request(self, step: int) -> None:
        """Ask for a validation after `step` (coalesced with any pending request)."""
        self._requested_step = step
        self._changed.notify()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._changed.wait_until(lambda: self._requested_step is not None)
            step, self._requested_step = self._requested_step, None
            assert step is not None
            try:
                self.latest = await self.validate(step)
                self._history.append(self.latest)
            except GenerationFailed as exc:
                self.failures += 1
                log.error("validation_failed", step=step, error=str(exc), validation_failures=self.failures)
                continue
            log.info(
                "validation", step=step, val_reward_mean=round(self.latest.reward_mean, 4),
                val_accuracy=round(self.latest.accuracy, 4), version=self.latest.rollout_version,
            )

    async def validate(self, step: int) -> ValidationResult:
        version = self.rollouter.version
        rewards: list[float] = [math.nan] * len(self.prompts)
        tool_users = 0

        async def one(i: int, prompt: Prompt) -> None:
            nonlocal tool_users
            async with self.limiter:
                trajectory = await self.rollouter.evaluate(prompt)
            rewards[i] = trajectory.reward
            tool_users += trajectory.tool_calls > 0

        try:
            async with anyio.create_task_group() as tg:
                for i, prompt in enumerate(self.prompts):
                    tg.start_soon(one, i, prompt)
        except BaseExceptionGroup as group:  # surface the named failure, not the task group's wrapper
            raise first_failure(group) from None
        n = max(1, len(rewards))
        return ValidationResult(
            step=step, rollout_version=version, reward_mean=sum(rewards) / n,
            accuracy=sum(r >= CORRECT for r in rewards) / n, prompts=len(rewards), tool_call_rate=tool_users / n,
        )
