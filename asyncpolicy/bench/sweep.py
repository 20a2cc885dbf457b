"""The seed's benchmark sweep: staleness, queue size, generation interval, resource split, pause/resume.

Simulated engines by default (so the numbers measure the runtime's scheduling, not a model); any
`key=value` given to `bench` is passed through, so `rollout.engine=hf trainer.engine=torch` sweeps
the real CPU path. Each scenario is one Supervisor run, time-boxed so that slow settings (a 1 s
generation interval) still finish within the suite's budget; throughput is then measured over the
time the run had.

Resource split model (simulated engines): the seed splits GPUs between rollout and training. Here
a pool of `SPLIT_UNITS` units is split into r rollout units and the rest for training: r units
generate `r * rollout.n` responses at once (rollout.max_concurrency, one prompt group per unit), and
a training step's fixed work `SPLIT_UNITS * trainer.simulated.step_latency_s` is shared by the
training units (step latency = work / (SPLIT_UNITS - r)), i.e. both sides scale linearly.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import anyio
import structlog

from asyncpolicy.bench.common import (
    SIMULATED,
    BenchContext,
    Figure,
    ScenarioRun,
    SuiteResult,
    Table,
    percentile,
    run_supervised,
)
from asyncpolicy.bench.plots import new_figure, save
from asyncpolicy.bench.probe import ProbedGeneration
from asyncpolicy.engines.factory import build_engines
from asyncpolicy.supervisor import Supervisor

log = structlog.get_logger("asyncpolicy.bench.sweep")

STALENESS = (0, 1, 3, 5, 10)
QUEUE_SIZES = (50, 100, 500, 1000)
INTERVALS = (0.0, 0.1, 0.5, 1.0)
SPLIT_UNITS = 8
PAUSE_HOLD_S = 0.05  # how long each pause is held before resume


def _sizes(ctx: BenchContext) -> dict[str, Any]:
    if ctx.quick:
        return {"steps": 12, "max_wall_s": 2.0, "splits": (2, 4, 6), "pause_cycles": 8}
    return {"steps": 40, "max_wall_s": 8.0, "splits": tuple(range(1, SPLIT_UNITS)), "pause_cycles": 30}


async def run(ctx: BenchContext) -> SuiteResult:
    sizes = _sizes(ctx)
    base = [*SIMULATED, f"trainer.total_training_steps={sizes['steps']}"]
    groups: dict[str, list[tuple[Any, ScenarioRun]]] = {"staleness": [], "queue": [], "interval": [], "split": []}

    for s in STALENESS:
        name = f"sweep_staleness_{s}"
        cfg = ctx.config(base, [f"async_training.staleness_threshold={s}"], name=name)
        groups["staleness"].append((s, await run_supervised(ctx, name, cfg, max_wall_s=sizes["max_wall_s"], settings={"staleness_threshold": s})))
    for q in QUEUE_SIZES:
        name = f"sweep_queue_{q}"
        cfg = ctx.config(base, [f"async_training.max_queue_size={q}"], name=name)
        groups["queue"].append((q, await run_supervised(ctx, name, cfg, max_wall_s=sizes["max_wall_s"], settings={"max_queue_size": q})))
    for i in INTERVALS:
        name = f"sweep_interval_{i:g}"
        cfg = ctx.config(base, [f"rollout.interval_s={i}"], name=name)
        groups["interval"].append((i, await run_supervised(ctx, name, cfg, max_wall_s=sizes["max_wall_s"], settings={"interval_s": i})))
    probe_cfg = ctx.config(base, name="split_probe")
    work = SPLIT_UNITS * probe_cfg.trainer.simulated.step_latency_s
    for r in sizes["splits"]:
        name = f"sweep_split_{r}of{SPLIT_UNITS}"
        scenario = [f"rollout.max_concurrency={r * probe_cfg.rollout.n}"]
        if probe_cfg.trainer.engine == "simulated":
            scenario.append(f"trainer.simulated.step_latency_s={work / (SPLIT_UNITS - r)}")
        cfg = ctx.config(base, scenario, name=name)
        settings = {"rollout_units": r, "train_units": SPLIT_UNITS - r, "overrides": scenario}
        groups["split"].append((r, await run_supervised(ctx, name, cfg, max_wall_s=sizes["max_wall_s"], settings=settings)))

    pause = await _pause_resume(ctx, base, sizes["pause_cycles"])
    return _result(ctx, groups, pause, probe_cfg.trainer.engine == "simulated")


# -- pause / resume -----------------------------------------------------------------------------


async def _pause_resume(ctx: BenchContext, base: list[str], cycles: int) -> dict[str, Any]:
    """Pause and resume `cycles` times during a loaded run; time each until it takes effect.

    Pause takes effect when `pause()` returns (it promises no generation runs then — checked);
    resume takes effect at the first engine `generate` call after `resume()` is called.
    """
    name = "sweep_pause_resume"
    cfg = ctx.config(base, ["trainer.total_training_steps=100000"], name=name)
    engines = build_engines(cfg, rng=random.Random(cfg.seed))
    probe = ProbedGeneration(engines.generation)
    engines.generation = probe
    pause_s: list[float] = []
    resume_s: list[float] = []
    violations = {"running_after_pause": 0, "started_while_paused": 0}
    rng = random.Random(cfg.seed)

    async def host(sup: Supervisor) -> None:
        with anyio.fail_after(30):
            await probe.changed.wait_until(lambda: probe.starts >= 20)  # loaded: generation under way
        for _ in range(cycles):
            await anyio.sleep(rng.uniform(0.01, 0.05))
            t0 = time.monotonic()
            await sup.pause()
            pause_s.append(time.monotonic() - t0)
            violations["running_after_pause"] += probe.active > 0
            before = probe.starts
            await anyio.sleep(PAUSE_HOLD_S)
            violations["started_while_paused"] += probe.starts - before
            t2 = probe.mark()
            await sup.resume()
            with anyio.fail_after(30):
                await probe.changed.wait_until(lambda: probe.first_start_after_mark is not None)
            assert probe.first_start_after_mark is not None
            resume_s.append(probe.first_start_after_mark - t2)
        sup.stop()

    run = await run_supervised(ctx, name, cfg, engines=engines, host=host, settings={"cycles": cycles, "hold_s": PAUSE_HOLD_S})
    return {"run": run, "pause_s": pause_s, "resume_s": resume_s, **violations}


# -- report -------------------------------------------------------------------------------------


def _row(label: str, r: ScenarioRun) -> list[Any]:
    return [
        label,
        r.samples_per_s,
        r.steps_per_s,
        r.sample_age_mean,
        r.sample_age_max,
        r.sync_latency_mean_s * 1e3,
        r.sync_latency_max_s * 1e3,
        r.queue_utilization_mean,
        r.trainer_idle_ratio,
        r.rollouter_idle_ratio,
        r.dropped_stale,
        r.peak_rss_mb,
        f"{r.steps}{'' if r.finished else ' (time-boxed)'}",
    ]


COLUMNS = [
    "scenario",
    "samples/s",
    "steps/s",
    "age mean",
    "age max",
    "sync ms mean",
    "sync ms max",
    "queue util",
    "trainer idle",
    "rollout idle",
    "dropped stale",
    "peak RSS MB",
    "steps",
]


def _result(ctx: BenchContext, groups: dict[str, list[tuple[Any, ScenarioRun]]], pause: dict[str, Any], simulated: bool) -> SuiteResult:
    res = SuiteResult(suite="sweep", title="Seed sweep")
    titles = {
        "staleness": ("staleness_threshold", "async_training.staleness_threshold"),
        "queue": ("max_queue_size", "async_training.max_queue_size"),
        "interval": ("generation interval (s)", "rollout.interval_s"),
        "split": (f"rollout units of {SPLIT_UNITS}", "rollout/trainer split (see model)"),
    }
    for key, rows in groups.items():
        res.tables.append(
            Table(title=f"{titles[key][0]} — {titles[key][1]}", columns=COLUMNS, rows=[_row(f"{titles[key][0]}={v}", r) for v, r in rows])
        )
    if not simulated:
        res.notes.append("Resource split: with real engines only rollout.max_concurrency varies; the trainer's speed is fixed.")
    res.notes.append(
        f"Resource split model: {SPLIT_UNITS} units; r rollout units generate r × rollout.n responses at once; "
        f"a training step's work of {SPLIT_UNITS} × trainer.simulated.step_latency_s is shared by the {SPLIT_UNITS}-r training units."
    )
    res.notes.append(
        "Time-boxed scenarios (e.g. a 1 s generation interval) stop early; their samples/s is over the time they ran. "
        "Queue utilisation is sampled at each step's end (the seed expects 50-80%). Peak RSS is of the whole bench process."
    )
    best = max((r for rows in groups.values() for _, r in rows), key=lambda r: r.samples_per_s)
    res.figures.append(Figure(suite="sweep", name="best samples/s (sweep)", value=best.samples_per_s, unit="samples/s", note=best.name))
    # pause / resume
    p, q = pause["pause_s"], pause["resume_s"]
    pr_rows = [
        ["pause() until no generation runs", len(p), percentile(p, 50) * 1e3, percentile(p, 99) * 1e3, max(p, default=math.nan) * 1e3],
        ["resume() until the first generation starts", len(q), percentile(q, 50) * 1e3, percentile(q, 99) * 1e3, max(q, default=math.nan) * 1e3],
    ]
    res.tables.append(
        Table(
            title="Pause / resume latency under load",
            columns=["what", "cycles", "p50 ms", "p99 ms", "max ms"],
            rows=pr_rows,
            note=f"violations: generation still running after pause() returned: {pause['running_after_pause']}; "
            f"generations started while paused: {pause['started_while_paused']}",
        )
    )
    res.figures += [
        Figure(suite="sweep", name="pause latency p99", value=percentile(p, 99) * 1e3, unit="ms"),
        Figure(suite="sweep", name="resume latency p99", value=percentile(q, 99) * 1e3, unit="ms"),
        Figure(
            suite="sweep",
            name="generations started while paused",
            value=float(pause["started_while_paused"] + pause["running_after_pause"]),
            target="== 0",
            met=pause["started_while_paused"] + pause["running_after_pause"] == 0,
        ),
    ]
    res.plots.append(_plot(ctx, groups))
    return res


def _plot(ctx: BenchContext, groups: dict[str, list[tuple[Any, ScenarioRun]]]) -> str:
    fig, axes = new_figure(2, 2, width=5.0, height=3.5)
    labels = {
        "staleness": "staleness_threshold",
        "queue": "max_queue_size",
        "interval": "rollout.interval_s (s)",
        "split": f"rollout units (of {SPLIT_UNITS})",
    }
    for ax, (key, rows) in zip(axes.flat, groups.items(), strict=True):
        xs = [v for v, _ in rows]
        ax.plot(xs, [r.samples_per_s for _, r in rows], "o-", label="samples/s")
        ax2 = ax.twinx()
        ax2.plot(xs, [r.steps_per_s for _, r in rows], "s--", color="tab:orange", label="steps/s")
        ax.set_xlabel(labels[key])
        ax.set_ylabel("samples/s")
        ax2.set_ylabel("steps/s", color="tab:orange")
        if key == "queue":
            ax.set_xscale("log")
        ax.set_title(f"throughput vs {labels[key]}")
    return save(fig, ctx.out_dir, "sweep", ctx.caption())
