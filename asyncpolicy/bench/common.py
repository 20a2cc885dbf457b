"""What every suite shares: the machine, result records, per-scenario logs and one supervised run.

A scenario is one `Supervisor` run (or one measurement) with its own `.log` file: a header line
naming the machine and the command, every structlog event of the run as a JSON line, and a
closing line with the scenario's figures. The console only shows the bench's own `bench_*`
events and errors, so a sweep of forty runs stays readable.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import anyio
import msgspec
import structlog

from asyncpolicy.actors.validator import ValidationResult
from asyncpolicy.config import Config, load_config
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.logging import JsonEvents
from asyncpolicy.metrics import rss_bytes
from asyncpolicy.supervisor import RunResult, Supervisor

log = structlog.get_logger("asyncpolicy.bench")

SIMULATED = ("rollout.engine=simulated", "trainer.engine=simulated")
WARMUP = 2  # steady-state figures leave out the first steps (pipeline fill, first weight sync)


# -- records ---------------------------------------------------------------------------------------


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    """Where a figure was measured: every figure in a report names it."""

    cores: int  # CPUs this process may run on
    cpu_model: str
    gpu: str  # "none" on a CPU machine
    python: str
    torch: str
    os: str

    def describe(self) -> str:
        return f"{self.cores} cores, {self.cpu_model}, GPU: {self.gpu}"


class Figure(msgspec.Struct, kw_only=True):
    """One headline number; with a target it goes into the report's summary table."""

    suite: str
    name: str
    value: float | None  # None: not measured (the suite was skipped or failed)
    unit: str = ""
    target: str = ""  # e.g. ">= 0.95"; empty: reported, no target
    met: bool | None = None  # None when there is no target or no value
    note: str = ""


class Table(msgspec.Struct, kw_only=True):
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


class SuiteResult(msgspec.Struct, kw_only=True):
    """What a suite hands the report writer."""

    suite: str
    title: str
    figures: list[Figure] = msgspec.field(default_factory=list)
    tables: list[Table] = msgspec.field(default_factory=list)
    plots: list[str] = msgspec.field(default_factory=list)  # PNG file names in the results dir
    notes: list[str] = msgspec.field(default_factory=list)
    skipped: str = ""  # why the suite did not run; empty when it ran
    error: str = ""  # the exception that ended the suite early; empty when it completed
    wall_s: float = 0.0


class ScenarioRun(msgspec.Struct, kw_only=True):
    """One supervised run, reduced to the sweep's columns (from RunResult and metrics.jsonl)."""

    name: str
    wall_s: float
    steps: int
    made: int
    samples_per_s: float
    steps_per_s: float
    sample_age_mean: float
    sample_age_max: float
    sync_latency_mean_s: float
    sync_latency_max_s: float
    queue_utilization_mean: float
    trainer_idle_ratio: float
    rollouter_idle_ratio: float
    dropped_stale: int
    peak_rss_mb: float
    trainer_wait_s: float  # total time the trainer waited for batches
    sync_total_s: float  # total time spent in weight syncs
    finished: bool
    rows: list[dict[str, Any]] = msgspec.field(default_factory=list)  # metrics.jsonl lines
    ready_s: float = math.nan  # Supervisor start → every actor running (engines, first sync): rows' elapsed_s minus it is training time
    validations: list[ValidationResult] = msgspec.field(default_factory=list)  # every completed validation (rows carry the latest only)
    run_s: float = math.nan  # Supervisor start → the run's end (RunResult.elapsed_s)


# -- context -------------------------------------------------------------------------------------


class BenchContext:
    """The run-wide settings a suite needs: where to write, how big, which overrides, which machine."""

    def __init__(self, out_dir: Path, *, quick: bool, overrides: list[str], machine: Machine, command: str) -> None:
        self.out_dir = out_dir
        self.quick = quick
        self.overrides = list(overrides)
        self.machine = machine
        self.command = command
        self.rng = random.Random(0)

    def config(self, base: tuple[str, ...] | list[str], scenario: tuple[str, ...] | list[str] = (), *, name: str) -> Config:
        """Suite defaults ← the user's overrides ← the scenario's own variable (which must win)."""
        run_dir = self.out_dir / "runs" / name
        return load_config(None, [*base, *self.overrides, *scenario, f"output_dir={run_dir}"])

    def caption(self) -> str:
        """What every plot is stamped with: the machine and the command."""
        return f"{self.machine.describe()} | {self.command}"

    def log_path(self, name: str) -> Path:
        return self.out_dir / f"{name}.log"


def detect_machine() -> Machine:
    """Cores, CPU model and GPUs of this machine (nvidia-smi when present, else torch.cuda)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = str(torch.__version__)
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    except ImportError:
        torch_version, gpus = "not installed", []
    gpu = f"{len(gpus)}x {gpus[0]}" if gpus else "none"
    return Machine(
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        cpu_model=cpu,
        gpu=gpu,
        python=platform.python_version(),
        torch=torch_version,
        os=f"{platform.system()} {platform.release()}",
    )


def git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


# -- logs ----------------------------------------------------------------------------------------


def _console_filter(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Keep the console to the bench's progress lines and real errors; the .log file has the rest."""
    if str(event.get("event", "")).startswith("bench") or event.get("level") in ("error", "critical"):
        return event
    raise structlog.DropEvent


def configure_bench_logging(file: IO[bytes] | None) -> None:
    """Every info event to `file` (a scenario log) as JSON; the console gets bench events only."""
    processors: list[Any] = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)]
    if file is not None:
        processors.append(JsonEvents(file))
    processors += [_console_filter, structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(20),  # info
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


@contextmanager
def scenario_log(ctx: BenchContext, name: str, **header: Any) -> Iterator[IO[bytes]]:
    """`<name>.log`: a header (machine, command, scenario settings), the run's events, then figures."""
    path = ctx.log_path(name)
    with open(path, "wb") as f:
        head = {"event": "bench_scenario", "scenario": name, "machine": msgspec.to_builtins(ctx.machine), "command": ctx.command}
        f.write(msgspec.json.encode({**head, **header}) + b"\n")
        previous = structlog.get_config()
        configure_bench_logging(f)
        try:
            yield f
        finally:
            structlog.configure(**previous)


def write_log_record(f: IO[bytes], event: str, record: Any) -> None:
    f.write(msgspec.json.encode({"event": event, **msgspec.to_builtins(record)}) + b"\n")
    f.flush()


# -- one supervised run --------------------------------------------------------------------------


Host = Callable[[Supervisor], Coroutine[Any, Any, None]]  # an async def: anyio's start_soon takes coroutines


async def run_supervised(
    ctx: BenchContext,
    name: str,
    cfg: Config,
    *,
    engines: EngineSet | None = None,
    host: Host | None = None,
    max_wall_s: float | None = None,
    settings: dict[str, Any] | None = None,
) -> ScenarioRun:
    """Run `cfg` under a Supervisor (with an optional host task beside it), time-boxed by `max_wall_s`.

    The host task runs in the same event loop as the actors (the embedding case); it may call
    `sup.stop()` itself. A run cut short by `max_wall_s` is stopped gracefully and reported with
    finished=False: its throughput still counts, its unfinished steps do not.
    """
    with scenario_log(ctx, name, settings=settings or {}) as logf:
        log.info("bench_scenario_start", scenario=name)
        started = time.monotonic()
        async with Supervisor.open(cfg, engines=engines) as sup:
            async with anyio.create_task_group() as tg:
                if host is not None:
                    tg.start_soon(host, sup)
                with anyio.move_on_after(max_wall_s if max_wall_s is not None else math.inf):
                    await sup.wait()
                sup.stop()
                result = await sup.wait()
                tg.cancel_scope.cancel()
            trainer_wait = sup.trainer.statistics().idle_s
            sync_total = sup.synchronizer.statistics().counters.total_latency_s
            ready = sup.ready_s
            validations = list(sup.validator.history())
        wall = time.monotonic() - started
        run = summarise(name, result, read_metrics(Path(result.output_dir)), wall, trainer_wait, sync_total)
        run.ready_s = math.nan if ready is None else ready
        run.validations = validations
        write_log_record(logf, "bench_scenario_result", msgspec.structs.replace(run, rows=[], validations=[]))
        log.info(
            "bench_scenario_done",
            scenario=name,
            wall_s=round(wall, 2),
            steps=run.steps,
            samples_per_s=round(run.samples_per_s, 1),
            age_max=run.sample_age_max,
        )
    return run


def default_engines_available() -> str:
    """'' when the default hf/torch engines can be built here, else why not."""
    try:
        import asyncpolicy.engines.sets.hf_torch  # noqa: F401
    except ImportError as exc:
        return f"the default hf/torch engines are not importable ({exc})"
    return ""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [msgspec.json.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def summarise(
    name: str, result: RunResult, rows: list[dict[str, Any]], wall_s: float, trainer_wait_s: float, sync_total_s: float
) -> ScenarioRun:
    """Throughput from the RunResult (valid even with zero steps); ages, syncs, idle from the metrics lines."""
    elapsed = max(result.elapsed_s, 1e-9)
    syncs = [r["sync_latency_s"] for r in rows if r.get("sync_latency_s") is not None]
    last = rows[-1] if rows else {}
    peak = max((r["rss_bytes"] for r in rows), default=rss_bytes())  # the whole bench process
    return ScenarioRun(
        name=name,
        wall_s=wall_s,
        steps=result.steps,
        made=result.made,
        samples_per_s=result.made / elapsed,
        steps_per_s=result.steps / elapsed,
        sample_age_mean=_mean([r["sample_age_mean"] for r in rows]),
        sample_age_max=max((r["sample_age_max"] for r in rows), default=math.nan),
        sync_latency_mean_s=_mean(syncs),
        sync_latency_max_s=max(syncs, default=math.nan),
        queue_utilization_mean=_mean([r["queue_utilization"] for r in rows]),
        trainer_idle_ratio=last.get("trainer_idle_ratio", math.nan),
        rollouter_idle_ratio=last.get("rollouter_idle_ratio", math.nan),
        dropped_stale=result.dropped_stale,
        peak_rss_mb=peak / 2**20,
        trainer_wait_s=trainer_wait_s,
        sync_total_s=sync_total_s,
        finished=result.finished,
        rows=rows,
        run_s=result.elapsed_s,
    )


def steady_step_s(run: ScenarioRun) -> float:
    """Seconds per step after the warm-up steps (pipeline fill excluded)."""
    rows = run.rows
    return (rows[-1]["elapsed_s"] - rows[WARMUP - 1]["elapsed_s"]) / (len(rows) - WARMUP)


def step_waits_s(run: ScenarioRun) -> list[float]:
    """The trainer's wait before each step after warm-up (idle ratio × elapsed is its cumulative wait)."""
    waited = [r["trainer_idle_ratio"] * r["elapsed_s"] for r in run.rows]
    return [b - a for a, b in zip(waited[WARMUP - 1 :], waited[WARMUP:], strict=False)]


def steady_wait_s(run: ScenarioRun) -> float:
    """Mean trainer wait per step after warm-up; in the synchronous schedule, the batch generation time."""
    return statistics.fmean(step_waits_s(run))


def new_results_dir(prefix: str = "benchmark_results") -> Path:
    """`<prefix>_<time>/` in the current directory, never one that exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path.cwd() / f"{prefix}_{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = Path.cwd() / f"{prefix}_{stamp}-{n}"
    out.mkdir(parents=True)
    return out


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for an empty list."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def check(value: float | None, op: str, bound: float) -> bool | None:
    """Whether `value op bound` holds; None when nothing was measured."""
    if value is None or math.isnan(value):
        return None
    return value >= bound if op == ">=" else value < bound
