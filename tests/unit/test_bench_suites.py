"""Suites at tiny sizes: the files and fields exist and the numbers are sane (each well under 10 s)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from asyncpolicy.bench import channel
from asyncpolicy.bench.cli import bench_main
from asyncpolicy.bench.common import BenchContext, Machine, run_supervised
from asyncpolicy.bench.report import BenchRun
from asyncpolicy.bench.sweep import _pause_resume
from asyncpolicy.errors import ConfigError

MACHINE = Machine(cores=2, cpu_model="Test CPU", gpu="none", python="3.11", torch="2.x", os="Linux")
TINY = ["rollout.engine=simulated", "trainer.engine=simulated", "rollout.simulated.mean_latency_s=0.002", "trainer.simulated.step_latency_s=0.001"]


def _ctx(tmp_path: Path) -> BenchContext:
    return BenchContext(tmp_path, quick=True, overrides=[], machine=MACHINE, command="pytest")


def test_channel_measurements_are_sane() -> None:
    async def main() -> None:
        for make in (channel.bare_queue, channel.anyio_stream, channel.versioned_channel):
            assert await channel.throughput(make(), 2_000) > 1_000
            lat = await channel.ping_pong(make(), 200)
            assert len(lat) == 200 and all(0 <= x < 1 for x in lat)
        assert await channel.batch_throughput(2_000, 8) > 1_000

    anyio.run(main)


def test_run_supervised_reads_the_run_and_writes_its_log(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    cfg = ctx.config(TINY, ["trainer.total_training_steps=5"], name="tiny")
    run = anyio.run(lambda: run_supervised(ctx, "tiny", cfg, settings={"x": 1}))
    assert run.finished and run.steps == 5 and len(run.rows) == 5
    assert run.samples_per_s > 0 and run.steps_per_s > 0 and run.peak_rss_mb > 10
    assert 0 <= run.sample_age_max <= 1 and 0 <= run.trainer_idle_ratio <= 1
    lines = (tmp_path / "tiny.log").read_bytes().splitlines()
    head, events = msgspec.json.decode(lines[0]), [msgspec.json.decode(line) for line in lines[1:]]
    assert head["machine"]["cpu_model"] == "Test CPU" and head["command"] == "pytest" and head["settings"] == {"x": 1}
    (result,) = [e for e in events if e["event"] == "bench_scenario_result"]
    assert result["steps"] == 5 and any(e["event"] == "run_started" for e in events)


def test_time_box_stops_a_slow_run(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    cfg = ctx.config(TINY, ["rollout.interval_s=0.2", "trainer.total_training_steps=100"], name="boxed")
    run = anyio.run(lambda: run_supervised(ctx, "boxed", cfg, max_wall_s=0.5))
    assert not run.finished and run.made >= 1 and math.isfinite(run.samples_per_s)


def test_pause_resume_probe_sees_no_generation_while_paused(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    out = anyio.run(lambda: _pause_resume(ctx, TINY, 3))
    assert len(out["pause_s"]) == 3 and len(out["resume_s"]) == 3
    assert out["started_while_paused"] == 0 and out["running_after_pause"] == 0
    assert all(math.isfinite(x) and x >= 0 for x in out["pause_s"] + out["resume_s"])  # their size is a benchmark figure


def test_cli_writes_the_results_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert bench_main(["responsiveness", "--quick", *TINY]) == 0
    (out,) = tmp_path.glob("benchmark_results_*")
    names = {p.name for p in out.iterdir()}
    assert {"performance_report.md", "summary.txt", "results.json", "responsiveness.png"} <= names
    assert {"responsiveness_baseline.log", "responsiveness_training.log"} <= names
    run = msgspec.json.decode((out / "results.json").read_bytes(), type=BenchRun)
    figs = {f.name: f for f in run.suites[0].figures if f.target}
    assert set(figs) == {"heartbeat lag p99 during training", "heartbeat lag max during start-up"}
    assert all(f.value is not None and f.value >= 0 and f.met is not None for f in figs.values())
    assert "command: python -m asyncpolicy bench responsiveness --quick" in (out / "summary.txt").read_text()


def test_cli_rejects_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        bench_main(["nosuchsuite"])
    assert exc.value.code == 2
    with pytest.raises(ConfigError):
        bench_main(["channel", "async_training.nokey=1"])
    assert not list(tmp_path.glob("benchmark_results_*"))


@pytest.mark.slow
def test_quick_run_of_every_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert bench_main(["--quick"]) == 0
    (out,) = tmp_path.glob("benchmark_results_*")
    run = msgspec.json.decode((out / "results.json").read_bytes(), type=BenchRun)
    assert [s.suite for s in run.suites] == ["sweep", "overlap", "channel", "responsiveness", "learning", "autotune", "agentic"]
    assert not any(s.error for s in run.suites)  # its wall time is a benchmark figure (RESULTS.md), not a test


def _write_metrics(run_dir: Path, rewards: list[float]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [msgspec.json.encode({"step": i + 1, "reward_mean": r}) for i, r in enumerate(rewards)]
    (run_dir / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def test_reward_rise_compares_the_first_and_last_tenth(tmp_path: Path) -> None:
    from asyncpolicy.bench.learning import reward_rise, tenth_means

    rewards = [0.1] * 10 + [0.5] * 80 + [0.3] * 10  # tenths: the first 10 and the last 10 of 100 steps
    _write_metrics(tmp_path / "up", rewards)
    rise = reward_rise(tmp_path / "up")
    assert (rise.steps, rise.first, rise.last) == (100, pytest.approx(0.1), pytest.approx(0.3))
    assert rise.learned and "3.0x" in rise.describe() and "learned" in rise.describe()
    _write_metrics(tmp_path / "flat", [0.2] * 5 + [0.39] * 5)  # below 2x
    flat = reward_rise(tmp_path / "flat")
    assert not flat.learned and "did NOT learn" in flat.describe()
    assert reward_rise(tmp_path / "flat", factor=1.5).learned  # 0.39 >= 1.5 × 0.2
    _write_metrics(tmp_path / "zero", [0.0] * 10)  # 0 → 0 is no rise, even though 0 >= 2 × 0
    assert not reward_rise(tmp_path / "zero").learned
    assert tenth_means([{"r": 1.0}, {"r": 3.0}], "r") == (1.0, 3.0)  # fewer than 10 rows: one row each
    with pytest.raises(ValueError, match="no metric rows"):
        reward_rise(tmp_path / "missing")


def test_autotune_bench_plumbing_on_the_quick_shapes(tmp_path: Path) -> None:
    """`bench autotune --quick`'s simulated part: every shape (the held-out one too) runs its grid and
    its interleaved rounds to the end, with the accounting and autotune's limits in bounds (no speed
    is checked)."""
    from asyncpolicy.bench.autotune import _sizes, compare_on_shapes, held_out_shape, shapes
    from asyncpolicy.bench.common import SuiteResult, detect_machine

    ctx = BenchContext(tmp_path, quick=True, overrides=[], machine=detect_machine(), command="test")
    sizes = _sizes(ctx)
    steps, rounds = sizes["steps"], sizes["rounds"]
    res = SuiteResult(suite="autotune", title="t")
    records = anyio.run(compare_on_shapes, ctx, res)
    assert list(records) == [s.name for s in shapes(steps)] + [held_out_shape(steps).name]
    for shape, row in records.items():
        assert row["finished"], shape
        assert row["held_out"] == (shape == "held-out")
        for who in ("autotune", "defaults", "best"):
            assert len(row[who]["runs"]) == rounds and all(r["made"] >= steps * 8 for r in row[who]["runs"])
        assert row["vs_best"] > 0 and row["vs_default"] > 0 and row["vs_best_range"][0] <= row["vs_best"] <= row["vs_best_range"][1]
        assert set(row["grid"]) == {"s1_w8", "s1_w32", "s4_w8", "s4_w32"}
        assert len(row["autotune_final"]) == rounds
        for final in row["autotune_final"]:
            assert 1 <= final["window"] <= 64 and 0 <= final["staleness"] <= 4
    for run_dir in (tmp_path / "runs").iterdir():  # every run's own accounting line
        result = [msgspec.json.decode(line) for line in (run_dir / "metrics.jsonl").read_bytes().splitlines()]
        n = sizes["grid_steps"] if "_grid" in run_dir.name else steps
        assert [r["step"] for r in result] == list(range(1, n + 1)), run_dir.name
        assert all(r["staleness_max"] <= 4 for r in result)
    assert [len(t.rows) for t in res.tables] == [5, 1]


def _scenario(times: tuple[float, ...] = (), steps_per_s: float = 0.0, dropped_stale: int = 0) -> Any:
    from asyncpolicy.bench.common import ScenarioRun

    rows = [{"step": i + 1, "elapsed_s": t} for i, t in enumerate(times)]
    return ScenarioRun(name="x", wall_s=0, steps=len(rows), made=0, samples_per_s=0, steps_per_s=steps_per_s, sample_age_mean=0,
                       sample_age_max=0, sync_latency_mean_s=0, sync_latency_max_s=0, queue_utilization_mean=0,
                       trainer_idle_ratio=0, rollouter_idle_ratio=0, dropped_stale=dropped_stale, peak_rss_mb=0, trainer_wait_s=0,
                       sync_total_s=0, finished=True, rows=rows)


def test_grid_cells_meeting_both_autotune_targets() -> None:
    from asyncpolicy.bench.autotune import both_targets

    grid = {(1, 8): _scenario(steps_per_s=40, dropped_stale=20), (4, 8): _scenario(steps_per_s=50, dropped_stale=30),
            (4, 4): _scenario(steps_per_s=48, dropped_stale=20), (2, 8): _scenario(steps_per_s=47, dropped_stale=0)}
    assert both_targets(grid, (4, 8)) == ["s4 w4"]  # 48 >= 0.95 * 50 with 20 drops; s2 w8 is 6 % slower
    grid[(4, 4)] = _scenario(steps_per_s=48, dropped_stale=21)
    assert both_targets(grid, (4, 8)) == []


def test_second_half_rate_counts_only_the_steps_after_the_middle() -> None:
    from asyncpolicy.bench.autotune import second_half_rate

    def run(times: list[float]) -> Any:
        return _scenario(tuple(times))

    # a slow start (steps 1-4 at 1 s each), then 4 steps in 0.5 s: the second half runs at 8 steps/s
    assert second_half_rate(run([1.0, 2.0, 3.0, 4.0, 4.125, 4.25, 4.375, 4.5])) == 8.0
    assert math.isnan(second_half_rate(run([1.0, 2.0])))
