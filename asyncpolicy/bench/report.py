"""Write `benchmark_results_<time>/`: performance_report.md, summary.txt and results.json.

The report opens with the summary table of figures against their targets (met or not), then one
section per suite with its tables and plots. Every file names the machine and the command.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import msgspec

from asyncpolicy.bench.common import Figure, Machine, SuiteResult


class BenchRun(msgspec.Struct, kw_only=True):
    """The whole bench invocation: what results.json holds."""

    date: str
    machine: Machine
    command: str
    revision: str
    quick: bool
    wall_s: float
    load_avg: list[float]  # 1-minute load average at start and end: other work on the machine skews timings
    suites: list[SuiteResult]


def fmt(value: Any) -> str:
    """Numbers to at most four significant digits; nan/None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def verdict(fig: Figure) -> str:
    if not fig.target:
        return ""
    if fig.met is None:
        return "not measured"
    return "MET" if fig.met else "MISSED"


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _figures(run: BenchRun) -> list[Figure]:
    figs = [f for s in run.suites for f in s.figures]
    return [f for f in figs if f.target] + [f for f in figs if not f.target]


def render_markdown(run: BenchRun) -> str:
    m = run.machine
    out = [
        "# asyncpolicy performance report",
        "",
        f"- date: {run.date}",
        f"- machine: {m.describe()} (Python {m.python}, torch {m.torch}, {m.os})",
        f"- command: `{run.command}`",
        f"- revision: {run.revision}{' (quick sizes)' if run.quick else ''}; total wall time {run.wall_s:.0f} s",
        f"- 1-minute load average at start / end: {' / '.join(f'{x:.2f}' for x in run.load_avg)} (on {m.cores} cores; above that, other work shared the CPU)",
        "",
        "## Summary: figures against targets",
        "",
    ]
    rows = [[f.suite, f.name, f.value, f.unit, f.target, verdict(f), f.note] for f in _figures(run)]
    out += _table(["suite", "figure", "value", "unit", "target", "verdict", "note"], rows)
    for s in run.suites:
        out += ["", f"## {s.title} (`{s.suite}`)", "", f"Wall time {s.wall_s:.1f} s on {m.describe()}.", ""]
        if s.skipped:
            out += [f"**Skipped:** {s.skipped}", ""]
        if s.error:
            out += [f"**Failed:** `{s.error}` (see the suite's .log files)", ""]
        for t in s.tables:
            out += [f"### {t.title}", ""] + _table(t.columns, t.rows) + (["", t.note] if t.note else []) + [""]
        for p in s.plots:
            out += [f"![{p}]({p})", ""]
        out += [f"- {n}" for n in s.notes]
    return "\n".join(out) + "\n"


def render_summary(run: BenchRun) -> str:
    lines = [
        f"date: {run.date}",
        f"machine: {run.machine.describe()}",
        f"command: {run.command}",
        f"load average (start/end): {' / '.join(f'{x:.2f}' for x in run.load_avg)}",
    ]
    for f in _figures(run):
        target = f" (target {f.target}: {verdict(f)})" if f.target else ""
        lines.append(f"{f.suite}.{f.name.replace(' ', '_')} = {fmt(f.value)} {f.unit}{target}".replace("  ", " "))
    for s in run.suites:
        if s.skipped:
            lines.append(f"{s.suite}: skipped: {s.skipped}")
        if s.error:
            lines.append(f"{s.suite}: failed: {s.error}")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, run: BenchRun) -> Path:
    (out_dir / "performance_report.md").write_text(render_markdown(run))
    (out_dir / "summary.txt").write_text(render_summary(run))
    (out_dir / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(run)))
    return out_dir / "performance_report.md"


def now_iso() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
