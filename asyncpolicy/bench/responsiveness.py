"""Event-loop responsiveness: can an application share its event loop with a training run?

A host task beats every `HEARTBEAT_S` in the same loop as the Supervisor's actors (the embedding
case: a web server or agent framework running asyncpolicy inside its own loop). Lag = how late
each beat wakes up, from before the Supervisor starts (imports, model, engines) to the end of
training. A baseline with the loop otherwise idle is measured first, side by side.
Engines are the default CPU path (HF generation + torch trainer, tiny sizes); if that path is
not available in this checkout, the simulated engines are used and the report says so.
"""

from __future__ import annotations

import time

import anyio
import structlog

from asyncpolicy.bench.common import (
    BenchContext,
    default_engines_available,
    Figure,
    SuiteResult,
    Table,
    check,
    percentile,
    run_supervised,
    scenario_log,
    write_log_record,
)
from asyncpolicy.bench.plots import new_figure, save
from asyncpolicy.supervisor import Supervisor

log = structlog.get_logger("asyncpolicy.bench.responsiveness")

HEARTBEAT_S = 0.01
TARGET_P99_MS = 50.0


async def heartbeat(lags: list[float]) -> None:
    """Beat forever; append each beat's lateness in seconds."""
    while True:
        t = time.perf_counter()
        await anyio.sleep(HEARTBEAT_S)
        lags.append(time.perf_counter() - t - HEARTBEAT_S)


async def run(ctx: BenchContext) -> SuiteResult:
    steps = 10 if ctx.quick else 30
    missing = default_engines_available()
    engine_words = ["rollout.engine=simulated", "trainer.engine=simulated"] if missing else []
    baseline: list[float] = []
    with scenario_log(ctx, "responsiveness_baseline", heartbeat_s=HEARTBEAT_S) as logf:
        with anyio.move_on_after(0.5 if ctx.quick else 2.0):
            await heartbeat(baseline)
        write_log_record(logf, "bench_heartbeat", {"beats": len(baseline), "p99_ms": percentile(baseline, 99) * 1e3})

    # One heartbeat from before the Supervisor starts to the end: its start-up (imports, model,
    # tokenizer, engines) shares the host's loop too. The beats before the run is up are start-up's.
    beats_all: list[float] = []
    up_at: list[int | None] = [None]  # how many beats there were when the Supervisor had started

    async def host(sup: Supervisor) -> None:  # called once the Supervisor has started
        up_at[0] = len(beats_all)
        await anyio.sleep_forever()

    cfg = ctx.config([*engine_words, f"trainer.total_training_steps={steps}"], name="responsiveness_training")
    engines = f"rollout.engine={cfg.rollout.engine} trainer.engine={cfg.trainer.engine}"
    async with anyio.create_task_group() as beats:
        beats.start_soon(heartbeat, beats_all)
        run_ = await run_supervised(
            ctx, "responsiveness_training", cfg, host=host, settings={"heartbeat_s": HEARTBEAT_S, "engines": engines}
        )
        beats.cancel_scope.cancel()
    split = len(beats_all) if up_at[0] is None else up_at[0]  # never up: all of it was start-up
    startup, lags = beats_all[:split], beats_all[split:]

    res = SuiteResult(suite="responsiveness", title="Event-loop responsiveness")
    if missing:
        res.notes.append(f"Measured with simulated engines: {missing}.")
    rows = []
    for name, xs in (
        ("idle loop (baseline)", baseline),
        (f"during start-up ({engines})", startup),
        (f"during training ({engines})", lags),
    ):
        rows.append([name, len(xs), percentile(xs, 50) * 1e3, percentile(xs, 99) * 1e3, max(xs, default=float("nan")) * 1e3])
    res.tables.append(
        Table(
            title=f"Heartbeat lag of a host task beating every {HEARTBEAT_S * 1e3:.0f} ms in the training run's event loop",
            columns=["loop", "beats", "p50 ms", "p99 ms", "max ms"],
            rows=rows,
            note=f"training: {run_.steps} steps at {run_.steps_per_s:.2f} steps/s, {run_.samples_per_s:.1f} samples/s",
        )
    )
    p99 = percentile(lags, 99) * 1e3
    res.figures.append(
        Figure(
            suite="responsiveness",
            name="heartbeat lag p99 during training",
            value=p99,
            unit="ms",
            target=f"< {TARGET_P99_MS:g}",
            met=check(p99, "<", TARGET_P99_MS),
            note=engines + (" (fallback)" if missing else ""),
        )
    )
    res.figures.append(Figure(suite="responsiveness", name="heartbeat lag p50 during training", value=percentile(lags, 50) * 1e3, unit="ms"))
    startup_max = max(startup, default=0.0) * 1e3
    res.figures.append(
        Figure(
            suite="responsiveness",
            name="heartbeat lag max during start-up",
            value=startup_max,
            unit="ms",
            target=f"< {TARGET_P99_MS:g}",
            met=check(startup_max, "<", TARGET_P99_MS),
            note=engines + " (a fresh process measures imports too; a warm one does not)",
        )
    )
    res.plots.append(_plot(ctx, baseline, lags, startup))
    return res


def _plot(ctx: BenchContext, baseline: list[float], lags: list[float], startup: list[float]) -> str:
    fig, axes = new_figure(1, 1)
    ax = axes[0][0]
    top = max([*baseline, *lags, *startup, 1e-4]) * 1e3
    bins = [top * i / 50 for i in range(51)]
    ax.hist([x * 1e3 for x in baseline], bins=bins, alpha=0.6, label="idle loop")
    ax.hist([x * 1e3 for x in lags], bins=bins, alpha=0.6, label="during training")
    ax.hist([x * 1e3 for x in startup], bins=bins, alpha=0.6, label="during start-up")
    ax.axvline(TARGET_P99_MS, color="red", linestyle="--", label=f"p99 target {TARGET_P99_MS:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("heartbeat lag (ms)")
    ax.set_ylabel("beats")
    ax.legend()
    ax.set_title("host-task heartbeat lag")
    return save(fig, ctx.out_dir, "responsiveness", ctx.caption())
