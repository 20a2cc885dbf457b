"""`python -m asyncpolicy run`, as a user runs it: exit codes 0 / 1 / 2, one-line errors, metrics written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SIM = ["rollout.engine=simulated", "trainer.engine=simulated", "progress=off"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncpolicy", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_bad_input(proc: subprocess.CompletedProcess[str], *named: str) -> None:
    """Exit 2, exactly one line on stderr naming the culprit(s), no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("asyncpolicy: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for name in named:
        assert name in proc.stderr


def test_help_exits_0() -> None:
    proc = cli("run", "--help")
    assert proc.returncode == 0 and "key=value" in proc.stdout


def test_done_when_50_simulated_steps_with_staleness_2(tmp_path: Path) -> None:
    """Issue 2's acceptance run: 50 rows, staleness_max <= 2, weights synced, idle ratios present."""
    proc = cli(
        "run", "rollout.engine=simulated", "trainer.engine=simulated", "trainer.total_training_steps=50",
        "async_training.staleness_threshold=2", f"output_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and [r["step"] for r in rows] == list(range(1, 51))
    assert all(r["staleness_max"] <= 2 and r["sample_age_max"] <= 2 for r in rows)
    assert rows[-1]["param_version"] == 50 and all(r["param_version"] > 0 for r in rows)
    assert rows[-1]["rollout_version"] > 0
    for r in rows:
        assert 0.0 <= r["trainer_idle_ratio"] <= 1.0 and 0.0 <= r["rollouter_idle_ratio"] <= 1.0


@pytest.mark.parametrize(
    "override, named",
    [
        ("async_training.staleness_threshold=-1", "async_training.staleness_threshold"),
        ("no_such_key=1", "no_such_key"),
        ("data.train_batch_size=abc", "data.train_batch_size"),
        ("async_training.max_queue_size=1", "async_training.max_queue_size"),
        ("not-an-override", "not-an-override"),
    ],
)
def test_bad_override_exits_2_naming_the_key(override: str, named: str) -> None:
    assert_bad_input(cli("run", *SIM, override), named)


@pytest.mark.parametrize(
    "name, content",
    [("bad.yaml", b"data: [\n"), ("bad.toml", b"a = \n"), ("bin.yaml", b"\xff\xfe"), ("list.yaml", b"- a\n")],
)
def test_bad_config_file_exits_2_naming_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    assert_bad_input(cli("run", "--config", str(path)), str(path))


def test_missing_config_file_exits_2_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    assert_bad_input(cli("run", "--config", str(path)), str(path))


def test_unknown_option_exits_2() -> None:
    assert_bad_input(cli("run", "--bogus"), "--bogus")


def test_unwritable_output_dir_exits_2_naming_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_bad_input(cli("run", *SIM, f"output_dir={blocker}/sub"), "output_dir")


def test_a_failing_actor_exits_1_naming_it(tmp_path: Path) -> None:
    """The rollouter's engine fails every request: exit 1, and stderr's last line names the rollouter."""
    proc = cli(
        "run", *SIM, "rollout.simulated.failure_rate=1.0", "rollout.max_retries=0", "rollout.max_restarts=0",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("asyncpolicy: run failed: actor 'rollouter' failed: GenerationFailed: "), last


def test_a_persistent_sync_failure_exits_1_naming_the_trainer_and_the_cause(tmp_path: Path) -> None:
    proc = cli(
        "run", *SIM, "trainer.simulated.sync_failures=3", "async_training.sync_retries=1",
        "async_training.sync_backoff_s=0.001", f"output_dir={tmp_path}",
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "asyncpolicy: run failed: actor 'trainer' failed: SyncFailed: weight sync to version 1 failed after 2 attempt(s): "
        "SimulatedEngineError('simulated weight-transfer failure for version 1')"
    )
