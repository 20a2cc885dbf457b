"""CPU learning speed: wall time to a reward threshold, asynchronous (staleness 1, 2, 4) vs on-policy (0).

Throughput only matters if the policy still learns: stale samples may cost more steps than the
overlap saves. Each run uses the default task and CPU engines (HF generation + torch trainer) and
stops when the moving average of the training reward over `WINDOW` steps reaches `THRESHOLD`, or
at its step/time budget (reported as not reached, never extrapolated). Runs follow each other in
one process, so they see the same machine load.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import structlog

from asyncpolicy.bench.common import (
    BenchContext,
    default_engines_available,
    Figure,
    ScenarioRun,
    SuiteResult,
    Table,
    read_metrics,
    run_supervised,
)
from asyncpolicy.supervisor import Supervisor

log = structlog.get_logger("asyncpolicy.bench.learning")

STALENESS = (0, 1, 2, 4)
THRESHOLDS = (0.1, 0.5)  # moving-average training reward: first clear rise (random ≈ 0.01), and learned
THRESHOLD = THRESHOLDS[-1]  # a run stops once it reaches the highest
WINDOW = 5


def _sizes(ctx: BenchContext) -> dict[str, float]:
    return {"steps": 60, "max_wall_s": 15.0} if ctx.quick else {"steps": 400, "max_wall_s": 100.0}


def time_to_threshold(rows: list[dict[str, Any]], threshold: float = THRESHOLD) -> tuple[float, int] | None:
    """(elapsed seconds, step) where the WINDOW-step moving average of reward_mean first reaches `threshold`."""
    for i in range(WINDOW - 1, len(rows)):
        window = [r["reward_mean"] for r in rows[i - WINDOW + 1 : i + 1]]
        if sum(window) / WINDOW >= threshold:
            return rows[i]["elapsed_s"], rows[i]["step"]
    return None


def tenth_means(rows: list[dict[str, Any]], key: str = "reward_mean") -> tuple[float, float]:
    """Mean of `key` over the first and the last tenth of the steps (at least one step each)."""
    if not rows:
        raise ValueError("no metric rows: the run trained no step")
    k = max(1, len(rows) // 10)
    first = sum(r[key] for r in rows[:k]) / k
    last = sum(r[key] for r in rows[-k:]) / k
    return first, last


class RewardRise(msgspec.Struct, frozen=True, kw_only=True):
    """Did a run learn: its training reward's first tenth against its last."""

    steps: int
    first: float
    last: float
    factor: float  # required: last >= factor × first

    @property
    def learned(self) -> bool:
        return self.last >= self.factor * self.first and self.last > self.first

    def describe(self) -> str:
        ratio = f"{self.last / self.first:.1f}x" if self.first > 0 else "from 0"
        verdict = "learned" if self.learned else f"did NOT learn (needs last >= {self.factor:g} x first)"
        return f"reward_mean first tenth {self.first:.3f} -> last tenth {self.last:.3f} ({ratio}) over {self.steps} steps: {verdict}"


def reward_rise(run_dir: str | Path, factor: float = 2.0) -> RewardRise:
    """The reward rise of the run whose `metrics.jsonl` is in `run_dir` (the GPU e2e script's learning check)."""
    rows = read_metrics(Path(run_dir))
    first, last = tenth_means(rows)
    return RewardRise(steps=len(rows), first=first, last=last, factor=factor)


async def stop_at_threshold(sup: Supervisor) -> None:
    """A host task: stop the run once its moving-average reward reaches THRESHOLD."""
    rows: list[dict[str, Any]] = []
    async for row in sup.events():
        rows.append(row)
        if time_to_threshold(rows) is not None:
            sup.stop()
            return


async def run(ctx: BenchContext) -> SuiteResult:
    res = SuiteResult(suite="learning", title="CPU learning speed")
    missing = default_engines_available()
    if missing:
        res.skipped = missing
        return res
    sizes = _sizes(ctx)
    runs: dict[int, ScenarioRun] = {}
    for s in STALENESS:
        name = f"learning_staleness_{s}"
        cfg = ctx.config([f"trainer.total_training_steps={int(sizes['steps'])}"], [f"async_training.staleness_threshold={s}"], name=name)
        runs[s] = await run_supervised(
            ctx, name, cfg, host=stop_at_threshold, max_wall_s=sizes["max_wall_s"], settings={"staleness_threshold": s, "threshold": THRESHOLD}
        )
    return _result(ctx, res, runs, sizes)


def _result(ctx: BenchContext, res: SuiteResult, runs: dict[int, ScenarioRun], sizes: dict[str, float]) -> SuiteResult:
    rows = []
    reached = {(s, t): time_to_threshold(r.rows, t) for s, r in runs.items() for t in THRESHOLDS}
    for s, r in runs.items():
        final = sum(x["reward_mean"] for x in r.rows[-WINDOW:]) / max(1, len(r.rows[-WINDOW:]))
        row: list[Any] = ["on-policy (0)" if s == 0 else f"async (staleness {s})"]
        for t in THRESHOLDS:
            hit, base = reached[(s, t)], reached[(0, t)]
            row += [hit[0] if hit else math.nan, hit[1] if hit else None, (base[0] / hit[0]) if (hit and base) else math.nan]
            res.figures.append(
                Figure(
                    suite="learning",
                    name=f"time to reward {t:g}, staleness {s}",
                    value=hit[0] if hit else None,
                    unit="s",
                    note=f"step {hit[1]}" if hit else f"not reached in {r.steps} steps / {r.wall_s:.0f} s (last {WINDOW}-step mean {final:.3f})",
                )
            )
        rows.append([*row, r.steps_per_s, final, f"{r.steps} steps, {r.wall_s:.0f} s"])
    columns = ["schedule"]
    for t in THRESHOLDS:
        columns += [f"s to {t:g}", f"step at {t:g}", f"speed-up vs on-policy at {t:g}"]
    res.tables.append(
        Table(
            title=f"Wall time until the {WINDOW}-step mean training reward reaches {' and '.join(f'{t:g}' for t in THRESHOLDS)} (default task, CPU engines)",
            columns=[*columns, "steps/s", f"final {WINDOW}-step reward", "ran"],
            rows=rows,
            note=f"budget per run: {int(sizes['steps'])} steps or {sizes['max_wall_s']:.0f} s; a run stops at {THRESHOLD:g}. "
            "Seconds are from the run's start (model load included) to the step where the moving average first reaches the threshold.",
        )
    )
    res.plots.append(_plot(ctx, runs))
    return res


def _plot(ctx: BenchContext, runs: dict[int, ScenarioRun]) -> str:
    from asyncpolicy.bench.plots import new_figure, save  # matplotlib: only the suite needs it

    fig, axes = new_figure(1, 1, width=7.0)
    ax = axes[0][0]
    for s, r in runs.items():
        ax.plot([x["elapsed_s"] for x in r.rows], [x["reward_mean"] for x in r.rows], label=f"staleness {s}", alpha=0.8)
    for t in THRESHOLDS:
        ax.axhline(t, color="red", linestyle="--", alpha=0.6)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("training reward (batch mean)")
    ax.legend()
    ax.set_title("learning curves, default task")
    return save(fig, ctx.out_dir, "learning", ctx.caption())
