"""Held-out accuracy over a run: its validations, read back from metrics lines, and the time a run
takes to reach a target accuracy (`bench gpu --sections learn`).

A validation shows in the first metrics line written after it ends (`val_step`, `val/accuracy`:
the latest result), so it is counted once, at the step it followed (`val_step`; 0 is the one at
the start, of the policy training starts from). Its time is that step's time — when the policy it
measured existed —, not when its result came back: validation runs beside training in every
schedule alike, and how long it takes is a cost of measuring, not of learning. (A weight sync during
a validation continues its generations under the new weights, as it does training's, so a
validation "at step k" may hold tokens of the next versions too.) A validation whose result no
later line carries (one still running when the run ended) is not counted.

Times are seconds of training: a line's `elapsed_s` minus the run's start-up (`Supervisor.ready_s`:
engines, first weight sync), so every schedule's clock starts at its first step, whatever its
engines took to start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from asyncpolicy.actors.validator import ValidationResult


class ValPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One validation: the step it followed, that step's training time, the accuracy measured."""

    step: int
    t_s: float  # seconds of training when the measured policy existed (0 for the start's validation)
    accuracy: float
    tool_call_rate: float = 0.0  # share of held-out episodes that called a tool (0 single-turn; from the validator's history only)


def validation_points(
    rows: list[dict[str, Any]], ready_s: float = 0.0, results: Sequence[ValidationResult] | None = None
) -> list[ValPoint]:
    """Each validation of a run once, in step order: from the validator's own `results` when given
    (`Validator.history()`: every one), else from its metrics lines (see the module's docstring)."""
    step_t = {0: 0.0} | {int(r["step"]): float(r["elapsed_s"]) - ready_s for r in rows}
    points: dict[int, ValPoint] = {}
    if results is not None:
        for v in results:
            if v.step not in points and v.step in step_t:
                points[v.step] = ValPoint(step=v.step, t_s=step_t[v.step], accuracy=v.accuracy, tool_call_rate=v.tool_call_rate)
        return [points[k] for k in sorted(points)]
    for r in rows:
        step, accuracy = r.get("val_step"), r.get("val/accuracy")
        if step is None or accuracy is None or step in points:
            continue
        # the step's own line is always written before its validation is asked for; the fallback, the
        # line that carries the result, is only for lines lost before the step (a run resumed elsewhere)
        t = step_t.get(step, float(r["elapsed_s"]) - ready_s)
        points[step] = ValPoint(step=step, t_s=t, accuracy=float(accuracy))
    return [points[k] for k in sorted(points)]


def time_to_accuracy(
    rows: list[dict[str, Any]], target: float, ready_s: float = 0.0, results: Sequence[ValidationResult] | None = None
) -> ValPoint | None:
    """The first validation whose accuracy is at least `target`; None when none is.

    No interpolation between validations: accuracy is measured only at them, noisily, so the time
    is that of the first measurement at or above the target — an upper bound on the true crossing,
    at the resolution of `trainer.test_freq`. A target the starting policy already meets is reached
    at step 0, time 0.
    """
    return next((p for p in validation_points(rows, ready_s, results) if p.accuracy >= target), None)
