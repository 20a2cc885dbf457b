"""The report writer: summary table first, verdicts against targets, machine and command everywhere."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec

from asyncpolicy.bench.common import (
    Figure,
    Machine,
    SuiteResult,
    Table,
    check,
    percentile,
)
from asyncpolicy.bench.report import (
    BenchRun,
    fmt,
    render_markdown,
    render_summary,
    write_report,
)

MACHINE = Machine(cores=2, cpu_model="Test CPU", gpu="none", python="3.11", torch="2.x", os="Linux")


def _run() -> BenchRun:
    suite = SuiteResult(
        suite="channel",
        title="Channel overhead",
        figures=[
            Figure(suite="channel", name="info only", value=3.0, unit="x"),
            Figure(suite="channel", name="ours / bare", value=0.4, unit="x", target=">= 0.5", met=False),
            Figure(suite="channel", name="ours / ray", value=None, unit="x", target=">= 100", met=None),
        ],
        tables=[Table(title="T", columns=["a", "b"], rows=[["x", 1.23456], ["y", math.nan]])],
        plots=["channel.png"],
        notes=["a note"],
    )
    skipped = SuiteResult(suite="learning", title="Learning", skipped="no HF engine")
    return BenchRun(date="2026-01-01", machine=MACHINE, command="python -m asyncpolicy bench channel", revision="abc", quick=True, wall_s=1.0, load_avg=[0.5, 0.7], suites=[suite, skipped])


def test_markdown_opens_with_the_summary_and_names_machine_and_command() -> None:
    md = render_markdown(_run())
    assert md.index("## Summary") < md.index("## Channel overhead")
    assert "2 cores, Test CPU, GPU: none" in md and "`python -m asyncpolicy bench channel`" in md
    summary = md[md.index("## Summary") : md.index("## Channel overhead")]
    # targeted figures come first; verdicts are spelled out
    assert summary.index("ours / bare") < summary.index("info only")
    assert "MISSED" in summary and "not measured" in summary
    assert "**Skipped:** no HF engine" in md and "![channel.png](channel.png)" in md


def test_summary_has_one_figure_per_line() -> None:
    text = render_summary(_run())
    lines = text.splitlines()
    assert lines[1] == "machine: 2 cores, Test CPU, GPU: none"
    assert "channel.ours_/_bare = 0.4 x (target >= 0.5: MISSED)" in lines
    assert "learning: skipped: no HF engine" in lines


def test_write_report_writes_three_files(tmp_path: Path) -> None:
    write_report(tmp_path, _run())
    assert {p.name for p in tmp_path.iterdir()} == {"performance_report.md", "summary.txt", "results.json"}
    data = msgspec.json.decode((tmp_path / "results.json").read_bytes(), type=BenchRun)
    assert data.suites[0].figures[1].met is False


def test_helpers() -> None:
    assert fmt(math.nan) == "–" and fmt(None) == "–" and fmt(3) == "3" and fmt(1234567.0) == "1.23e+06"
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([1.0] * 99 + [100.0], 99) == 1.0
    assert math.isnan(percentile([], 50))
    assert check(0.6, ">=", 0.5) is True and check(60.0, "<", 50) is False and check(None, ">=", 1) is None
