"""Agentic episodes at scale: 1 000+ concurrent tool-using episodes, asynchronous vs synchronous.

Every response is an episode of `tool_env.LognormalTools` (two tool calls of lognormal latency,
median 200 ms, sigma 1, then an answer) on the simulated engines. The synchronous schedule is
`staleness_threshold=0` with a sync every step (one batch per policy version, as in the overlap
suite): each step waits for the slowest of its batch's episodes, the tool latencies' tail. With
staleness >= 1 the next batches' episodes run while the trainer trains and while stragglers
finish. Reported: episodes/s and trainer idle per schedule, the most episodes live at once, and
the event loop's lag (a heartbeat task in the same loop, as in the responsiveness suite) while
thousands of episodes share it.
"""

from __future__ import annotations

from typing import Any

import anyio

from asyncpolicy.bench.common import (
    SIMULATED,
    BenchContext,
    Figure,
    ScenarioRun,
    SuiteResult,
    Table,
    check,
    percentile,
    run_supervised,
    steady_step_s,
)
from asyncpolicy.bench.plots import new_figure, save
from asyncpolicy.bench.responsiveness import HEARTBEAT_S, heartbeat
from asyncpolicy.bench.tool_env import TOOL_MEDIAN_S, TOOL_SIGMA, TOOL_TURNS, LognormalTools
from asyncpolicy.supervisor import Supervisor

BATCH, N = 64, 16  # 1 024 episodes a batch
BASE = (
    *SIMULATED,
    "task.env=asyncpolicy.bench.tool_env:LognormalTools",
    f"task.max_turns={TOOL_TURNS + 1}",
    "task.max_turn_tokens=16",
    "data.max_response_length=128",
    "rollout.simulated.mean_latency_s=0.05",  # a model turn: median 50 ms at full length
    "rollout.simulated.latency_sigma=0.5",
    f"data.train_batch_size={BATCH}",
    f"rollout.n={N}",
    f"rollout.max_concurrency={3 * BATCH * N}",  # never the limit: the staleness bound is
    f"async_training.max_queue_size={3 * BATCH}",
    "trainer.simulated.step_latency_s=0.5",
    "trainer.simulated.sync_latency_s=0.01",
    "async_training.trigger_parameter_sync_step=1",
)
STALENESS = (0, 1, 2)
TARGET_SPEEDUP = 2.0
TARGET_LAG_MS = 50.0
TARGET_CONCURRENT = 1000


class Scenario:
    """One schedule's run, its peak of live episodes and its heartbeat lags during training."""

    def __init__(self, run: ScenarioRun, per_step: int, peak: int, tool_calls: int, lags: list[float]) -> None:
        self.run = run
        self.per_step = per_step  # episodes a training step consumes: train_batch_size × rollout.n
        self.peak = peak
        self.tool_calls = tool_calls
        self.lags = lags

    @property
    def episodes_per_s(self) -> float:
        """Steady state (the first steps left out)."""
        return self.per_step / steady_step_s(self.run)


async def _scenario(ctx: BenchContext, staleness: int, steps: int) -> Scenario:
    name = f"agentic_{'sync' if staleness == 0 else f'async_s{staleness}'}"
    cfg = ctx.config(BASE, [f"async_training.staleness_threshold={staleness}", f"trainer.total_training_steps={steps}"], name=name)
    LognormalTools.reseed(staleness)
    beats: list[float] = []
    up_at: list[int] = []

    async def host(sup: Supervisor) -> None:  # the Supervisor has started: beats from here are training's
        up_at.append(len(beats))
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat, beats)
        run = await run_supervised(ctx, name, cfg, host=host, settings={"staleness_threshold": staleness})
        tg.cancel_scope.cancel()
    per_step = cfg.data.train_batch_size * cfg.rollout.n
    return Scenario(run, per_step, LognormalTools.peak, LognormalTools.tool_calls, beats[up_at[0] if up_at else len(beats) :])


async def run(ctx: BenchContext) -> SuiteResult:
    steps = 5 if ctx.quick else 12
    runs = {s: await _scenario(ctx, s, steps) for s in STALENESS}
    res = SuiteResult(suite="agentic", title="Agentic episodes (simulated tools)")
    rows: list[list[Any]] = []
    sync = runs[0].episodes_per_s
    for s, sc in runs.items():
        r = sc.run
        rows.append(
            [
                "synchronous (staleness 0)" if s == 0 else f"async (staleness {s})",
                sc.episodes_per_s,
                sc.episodes_per_s / sync,
                r.trainer_idle_ratio,
                sc.peak,
                r.sample_age_mean,
                percentile(sc.lags, 99) * 1e3,
                max(sc.lags, default=float("nan")) * 1e3,
            ]
        )
    res.tables.append(
        Table(
            title=f"Episodes of {TOOL_TURNS} tool calls (lognormal, median {TOOL_MEDIAN_S * 1e3:.0f} ms, sigma {TOOL_SIGMA:g}) + an answer, "
            f"{BATCH}×{N} = {BATCH * N} episodes a step",
            columns=["schedule", "episodes/s", "speedup", "trainer idle", "peak live episodes", "age mean", "loop lag p99 ms", "loop lag max ms"],
            rows=rows,
            note=f"{steps} steps each; episodes/s in steady state (first steps excluded); training step 500 ms; "
            f"lag = oversleep of a {HEARTBEAT_S * 1e3:.0f} ms heartbeat in the run's event loop while it trains.",
        )
    )
    for s in STALENESS[1:]:
        speedup = runs[s].episodes_per_s / sync
        res.figures.append(
            Figure(
                suite="agentic",
                name=f"episodes/s, async (staleness {s}) / sync",
                value=speedup,
                unit="×",
                target=f">= {TARGET_SPEEDUP:g}",
                met=check(speedup, ">=", TARGET_SPEEDUP),
                note=f"{runs[s].episodes_per_s:.0f} vs {sync:.0f} episodes/s",
            )
        )
    lag_max = max(max(sc.lags, default=0.0) for sc in runs.values()) * 1e3
    res.figures.append(
        Figure(
            suite="agentic",
            name="event-loop lag max, all schedules",
            value=lag_max,
            unit="ms",
            target=f"< {TARGET_LAG_MS:g}",
            met=check(lag_max, "<", TARGET_LAG_MS),
        )
    )
    peak = max(sc.peak for sc in runs.values())
    res.figures.append(
        Figure(
            suite="agentic",
            name="peak concurrent episodes",
            value=float(peak),
            target=f">= {TARGET_CONCURRENT}",
            met=check(float(peak), ">=", TARGET_CONCURRENT),
        )
    )
    res.notes.append(f"Simulated engines and tools: {', '.join(BASE)}.")
    res.plots.append(_plot(ctx, runs))
    return res


def _plot(ctx: BenchContext, runs: dict[int, Scenario]) -> str:
    fig, axes = new_figure(1, 1)
    ax = axes[0][0]
    labels = ["sync" if s == 0 else f"async s={s}" for s in runs]
    ax.bar(labels, [sc.episodes_per_s for sc in runs.values()], color=["tab:red", *["tab:blue"] * (len(runs) - 1)])
    ax.set_ylabel("episodes/s (steady state)")
    ax.set_title("agentic episodes with lognormal tool latency")
    return save(fig, ctx.out_dir, "agentic", ctx.caption())
