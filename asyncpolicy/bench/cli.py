"""`python -m asyncpolicy bench [SUITE ...] [--quick] [key=value ...]`.

Runs the named suites (all by default) in one process and one event loop, so that comparisons are
made side by side, then writes `benchmark_results_<time>/` in the current directory. A suite that
fails is reported as failed (exit code 1) and the others still run; a suite that cannot run here
(no HF engine yet, no GPU, no ray) is reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable

import anyio
import structlog

from asyncpolicy.bench.common import (
    BenchContext,
    SuiteResult,
    configure_bench_logging,
    detect_machine,
    git_revision,
    new_results_dir,
)
from asyncpolicy.bench.report import BenchRun, now_iso, write_report
from asyncpolicy.config import load_config

log = structlog.get_logger("asyncpolicy.bench")

SUITES = ("sweep", "overlap", "channel", "responsiveness", "learning", "autotune", "agentic")
Suite = Callable[[BenchContext], Awaitable[SuiteResult]]


def _load_suites() -> dict[str, tuple[str, Suite]]:
    """The CPU suites; imported here, not at module level, so `bench gpu` needs no matplotlib."""
    try:
        from asyncpolicy.bench import agentic, autotune, channel, learning, overlap, responsiveness, sweep
    except ModuleNotFoundError as missing:  # the plots need the `bench` extra
        if missing.name != "matplotlib":
            raise
        print("asyncpolicy bench: matplotlib is missing: pip install -e '.[bench]'", file=sys.stderr)
        raise SystemExit(2) from None
    return {
        "sweep": ("Seed sweep", sweep.run),
        "overlap": ("Overlap efficiency", overlap.run),
        "channel": ("Channel overhead", channel.run),
        "responsiveness": ("Event-loop responsiveness", responsiveness.run),
        "learning": ("CPU learning speed", learning.run),
        "autotune": ("Autotune vs static settings", autotune.run),
        "agentic": ("Agentic episodes (simulated tools)", agentic.run),
    }

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parse(argv: list[str]) -> tuple[list[str], bool, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m asyncpolicy bench",
        description="Run benchmark suites and write benchmark_results_<time>/ in the current directory. "
        f"Suites: {', '.join(SUITES)} (default: all). key=value words are config overrides passed to every run. "
        "`bench gpu [--sections ...]` runs the GPU experiments instead (`bench gpu --help`).",
    )
    p.add_argument("words", nargs="*", metavar="SUITE|key=value")
    p.add_argument("--quick", action="store_true", help="small sizes: all suites in under 4 minutes on 2 cores")
    args = p.parse_intermixed_args(argv)
    suites = [w for w in args.words if "=" not in w]
    overrides = [w for w in args.words if "=" in w]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        p.exit(EXIT_BAD_INPUT, f"asyncpolicy bench: error: unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}\n")
    return suites or list(SUITES), args.quick, overrides


async def _run_suites(ctx: BenchContext, names: list[str]) -> list[SuiteResult]:
    suites = _load_suites()
    results = []
    for name in names:
        title, fn = suites[name]
        log.info("bench_suite_start", suite=name, quick=ctx.quick)
        started = time.monotonic()
        try:
            res = await fn(ctx)
        except Exception as exc:  # a failed suite is reported (and fails the exit code); the others still run
            log.exception("bench_suite_failed", suite=name, error=repr(exc))
            res = SuiteResult(suite=name, title=title, error=f"{type(exc).__name__}: {exc}")
        res.wall_s = time.monotonic() - started
        log.info("bench_suite_done", suite=name, wall_s=round(res.wall_s, 1), skipped=res.skipped or None)
        results.append(res)
    return results


def bench_main(argv: list[str]) -> int:
    """Entry point of `python -m asyncpolicy bench`; returns the exit code."""
    argv = [a for a in argv if a != "--"]  # `bench -- --quick` gets options past the top-level parser
    if argv[:1] == ["gpu"]:  # vLLM + FSDP2 experiments: their own options, no matplotlib needed
        from asyncpolicy.bench.gpu.cli import gpu_main

        return gpu_main(argv[1:])
    names, quick, overrides = _parse(argv)
    _load_suites()  # a missing matplotlib stops here (exit 2), before a results directory is made
    load_config(None, overrides)  # bad overrides fail now (ConfigError, exit 2), not after minutes of runs
    previous = structlog.get_config()
    configure_bench_logging(None)
    try:
        return _bench(names, quick, overrides, argv)
    finally:
        structlog.configure(**previous)


def _bench(names: list[str], quick: bool, overrides: list[str], argv: list[str]) -> int:
    out = new_results_dir()
    typed = sys.argv[1:] if sys.argv[1:2] == ["bench"] else ["bench", *argv]  # as typed, when run from the CLI
    command = shlex.join(["python", "-m", "asyncpolicy", *typed])
    machine = detect_machine()
    ctx = BenchContext(out, quick=quick, overrides=overrides, machine=machine, command=command)
    log.info("bench_start", suites=names, out=str(out), machine=machine.describe())
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    results = anyio.run(_run_suites, ctx, names, backend="asyncio")
    run = BenchRun(
        date=now_iso(),
        machine=machine,
        command=command,
        revision=git_revision(),
        quick=quick,
        wall_s=time.monotonic() - started,
        load_avg=[load_start, os.getloadavg()[0]],
        suites=results,
    )
    report = write_report(out, run)
    print(f"report: {report}", file=sys.stderr)
    print((out / "summary.txt").read_text(), end="")
    return EXIT_FAILED if any(r.error for r in results) else EXIT_OK
