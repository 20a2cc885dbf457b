"""`python -m asyncpolicy run`, as a user runs it: exit codes 0 / 1 / 2, one-line errors, metrics written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from asyncpolicy.cli import reward_summary
from asyncpolicy.models import tiny

ROOT = Path(__file__).resolve().parents[2]
SIM = ["rollout.engine=simulated", "trainer.engine=simulated", "progress=off"]


def cli(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m asyncpolicy ARGS`, run in `cwd` (default: the repository) on this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "asyncpolicy", *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, env=env,
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


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["task.agent=examples.calc_agent:solve", "task.env=asyncpolicy.bench.tool_env:LognormalTools"], ("task.agent", "task.env")),
        (["task.agent=examples.no_such_agent:solve"], ("task.agent",)),
    ],
)
def test_agent_and_env_together_or_an_agent_that_does_not_import_exit_2(
    tmp_path: Path, overrides: list[str], named: tuple[str, ...]
) -> None:
    assert_bad_input(cli("run", *SIM, *overrides, f"output_dir={tmp_path / 'run'}"), *named)


def test_an_agent_port_in_use_exits_2_naming_the_key(tmp_path: Path) -> None:
    """The agents' endpoint binds when the actors start, after the engines: a port another process
    holds is still bad input (exit 2, the key named), not a failed actor."""
    (tmp_path / "idle_agent.py").write_text("async def solve(base_url: str, prompt: str) -> float:\n    return 0.0\n")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = cli("run", *SIM, "task.agent=idle_agent:solve", f"task.agent_port={port}", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("asyncpolicy: error: config key 'task.agent_port'") and f"127.0.0.1:{port}" in last, last
    assert "Traceback" not in proc.stderr


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


# -- bad input leaves nothing behind --------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_model() -> None:
    """Build the embedded model up front, so a run's stderr holds only its own error line."""
    tiny.ensure_embedded()


def assert_nothing_written(cwd: Path) -> None:
    assert not (cwd / "outputs").exists(), sorted(p.name for p in (cwd / "outputs").iterdir())


@pytest.mark.parametrize(
    "override, named",
    [
        ("seed=99999999999999999999999999", "'seed'"),
        ("trainer.lr=.inf", "'trainer.lr': inf is not a finite number"),
        ("async_training.sync_timeout=.inf", "'async_training.sync_timeout'"),
        ("rollout.engine=ray", "one of: simulated, hf, vllm"),
    ],
)
def test_bad_value_exits_2_and_writes_nothing(tmp_path: Path, override: str, named: str) -> None:
    assert_bad_input(cli("run", "progress=off", override, cwd=tmp_path), named)
    assert_nothing_written(tmp_path)


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_data_file_that_is_not_utf8_exits_2_naming_file_and_line(tmp_path: Path, embedded_model: None) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"prompt": "ab>", "ground_truth": "ba"}\n{"prompt": "\xff\xfe", "ground_truth": "x"}\n')
    (tmp_path / "rewards.py").write_text("def score(prompt, response, ground_truth):\n    return 0.0\n")
    proc = cli("run", "progress=off", f"data.train_files=[{data}]", "task.reward_fn=rewards:score", cwd=tmp_path)
    assert_bad_input(proc, "'data.train_files'", f"{data}:2 is not UTF-8 text")
    assert_nothing_written(tmp_path)


def test_character_outside_the_embedded_vocabulary_exits_2_naming_file_line_and_character(
    tmp_path: Path, embedded_model: None
) -> None:
    """A space or a capital is fine now; an 'é' would be dropped without a word, so it is refused."""
    data = write_rows(
        tmp_path / "train.jsonl",
        [{"prompt": "Sort these letters: eszy", "ground_truth": "esyz"}, {"prompt": "caf\u00e9", "ground_truth": "x"}],
    )
    (tmp_path / "rewards.py").write_text("def score(prompt, response, ground_truth):\n    return 0.0\n")
    proc = cli("run", "progress=off", f"data.train_files=[{data}]", "task.reward_fn=rewards:score", cwd=tmp_path)
    assert_bad_input(proc, f"{data}:2: character 'é' (U+00E9) at position 4 of the prompt", "printable ASCII")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "source, named",
    [
        ("def score(prompt, response, ground_truth:\n    return 0.0\n", "SyntaxError: "),
        ("raise RuntimeError('no GPU here')\n", "RuntimeError: no GPU here"),
    ],
)
def test_reward_module_that_fails_on_import_exits_2(tmp_path: Path, embedded_model: None, source: str, named: str) -> None:
    data = write_rows(tmp_path / "train.jsonl", [{"prompt": "ab>", "ground_truth": "ba"}])
    (tmp_path / "broken_reward.py").write_text(source)
    proc = cli("run", "progress=off", f"data.train_files=[{data}]", "task.reward_fn=broken_reward:score", cwd=tmp_path)
    assert_bad_input(proc, "'task.reward_fn'", "cannot import module 'broken_reward'", named)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "config_json, named",
    [("{not json", "is not valid JSON"), ('{"model_type": "no-such-model"}', "is not a model config transformers can load")],
)
def test_model_directory_with_a_corrupt_config_exits_2(tmp_path: Path, config_json: str, named: str) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(config_json)
    (model / "tokenizer.json").write_text("{}")
    assert_bad_input(cli("run", "progress=off", f"model.path={model}", cwd=tmp_path), "'model.path'", named)
    assert_nothing_written(tmp_path)


def test_model_directory_with_corrupt_weights_exits_2(tmp_path: Path) -> None:
    model = Path(tiny.ensure_embedded())
    copy = tmp_path / "model"
    copy.mkdir()
    for f in model.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "model.safetensors").write_bytes(b"\x00" * 16)
    proc = cli("run", "progress=off", f"model.path={copy}", cwd=tmp_path)
    assert_bad_input(proc, "'model.path'", "model.safetensors' is not a readable safetensors file")
    assert_nothing_written(tmp_path)


# -- the console script and `python -m` find the same modules ------------------------------------


def console_script(tmp_path: Path) -> Path:
    """The wrapper pip writes for `[project.scripts] asyncpolicy`, placed outside the working directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "asyncpolicy"
    script.write_text("import sys\nfrom asyncpolicy.cli import main\nif __name__ == '__main__':\n    sys.exit(main())\n")
    return script


def test_console_script_and_python_m_import_a_reward_module_from_the_current_directory(
    tmp_path: Path, embedded_model: None
) -> None:
    """Both report the module's own error, so both found ./cwd_reward.py (not 'No module named ...')."""
    work = tmp_path / "work"
    work.mkdir()
    data = write_rows(work / "train.jsonl", [{"prompt": "ab>", "ground_truth": "ba"}])
    (work / "cwd_reward.py").write_text("raise RuntimeError('found in the current directory')\n")
    args = ["run", "progress=off", f"data.train_files=[{data}]", "task.reward_fn=cwd_reward:score"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = subprocess.run(
        [sys.executable, str(console_script(tmp_path)), *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=work, env=env,
    )
    module = cli(*args, cwd=work)
    for proc in (script, module):
        assert_bad_input(proc, "cannot import module 'cwd_reward': RuntimeError: found in the current directory")
    assert script.stderr == module.stderr


# -- the summary line ---------------------------------------------------------------------------


def test_summary_line_shows_first_and_last_reward(tmp_path: Path) -> None:
    proc = cli("run", *SIM, "trainer.total_training_steps=20", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(r["reward_mean"] for r in part) / 2 for part in (rows[:2], rows[-2:]))
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("finished 20 steps in ")
    assert f": reward {first:.3f} -> {last:.3f} (mean of the first and last 2 step(s)); made " in last_line


def test_reward_summary_includes_the_latest_validation(tmp_path: Path) -> None:
    rows = [{"step": s, "reward_mean": s / 10, "val_reward_mean": None, "val_step": None} for s in range(1, 11)]
    rows[4].update(val_reward_mean=0.25, val_step=5)
    rows[9].update(val_reward_mean=0.75, val_step=10)
    rows[8]["reward_mean"] = None  # a step without a finite reward is left out, not counted as 0
    write_rows(tmp_path / "metrics.jsonl", rows)  # type: ignore[arg-type]
    assert reward_summary(tmp_path / "metrics.jsonl") == (
        "reward 0.100 -> 1.000 (mean of the first and last 1 step(s)), validation reward 0.750 (step 10)"
    )
    rows[9]["val/accuracy"] = 0.5
    write_rows(tmp_path / "metrics.jsonl", rows)  # type: ignore[arg-type]
    assert reward_summary(tmp_path / "metrics.jsonl").endswith(", validation reward 0.750, accuracy 0.500 (step 10)")
