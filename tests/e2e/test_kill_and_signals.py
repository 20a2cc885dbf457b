"""Real processes, real signals: kill -9 at several points (one inside a checkpoint write) and
SIGINT, then resume. What must hold: the step, version, data cursor and counters of the resumed
run agree with each other, no prompt is trained twice or lost, and training reaches its total.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from asyncpolicy import checkpoint

TOTAL = 150
BATCH = 4
RUN = [
    sys.executable,
    "-m",
    "asyncpolicy",
    "run",
    "rollout.engine=simulated",
    "trainer.engine=simulated",
    "rollout.simulated.mean_latency_s=0.002",
    "trainer.simulated.step_latency_s=0.01",
    "trainer.simulated.save_latency_s=0.15",  # widens the checkpoint-write window the test kills inside
    f"data.train_batch_size={BATCH}",
    "rollout.n=2",
    "trainer.save_freq=10",
    "trainer.keep_checkpoints=3",
    "log_level=warning",
    "progress=off",
]


def spawn(out: Path, *args: str) -> subprocess.Popen[bytes]:
    """The CLI in its own session (signals reach only it), its output in a file (a pipe nobody reads would block it)."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / "console.log", "ab")
    return subprocess.Popen([*RUN, f"output_dir={out}", *args], stdout=log, stderr=log, start_new_session=True)


def console(out: Path) -> str:
    return (out.parent / "console.log").read_text(errors="replace")[-3000:]


def start(out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return spawn(out, f"trainer.total_training_steps={TOTAL}", *extra)


def steps_written(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def writing_checkpoint(out: Path) -> bool:
    root = out / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-") for p in root.iterdir())


def latest_checkpoint(out: Path) -> Path:
    """The newest complete checkpoint under `out`; a run that wrote none fails here, by name."""
    path = checkpoint.latest_checkpoint(out)
    assert path is not None, f"no complete checkpoint under {out}"
    return path


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_kill_9_at_several_points_then_resume_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 1: killed mid-training, before any checkpoint exists
    proc = start(out)
    wait_until(lambda: steps_written(out) >= 5)
    kill9(proc)
    # 2: killed inside a checkpoint write (a temporary checkpoint directory exists)
    proc = start(out, "resume=auto")
    wait_until(lambda: steps_written(out) >= 15 and writing_checkpoint(out))
    kill9(proc)
    assert all((p / checkpoint.COMPLETE_MARKER).exists() for p in checkpoint.complete_checkpoints(out))
    # 3: killed between checkpoints, later in the run
    proc = start(out, "resume=auto")
    wait_until(lambda: steps_written(out) >= 55)
    kill9(proc)
    before = checkpoint.load_state(latest_checkpoint(out))
    # finally: resume to the end
    done = subprocess.run([*RUN, f"trainer.total_training_steps={TOTAL}", f"output_dir={out}", "resume=auto"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    rows = [msgspec.json.decode(line) for line in (out / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, TOTAL + 1)), "metrics must continue from the checkpoint's step"
    final_dir = latest_checkpoint(out)
    final = checkpoint.load_state(final_dir)
    assert final.trainer.step == final.trainer.version == TOTAL
    assert final.trainer.step >= before.trainer.step
    chan = final.channel
    assert chan.produced == chan.consumed + chan.dropped_stale + len(chan.items)
    assert chan.consumed == TOTAL * BATCH
    drawn = final.cursor.epoch * 2000 + final.cursor.position
    assert drawn == final.rollout.completed + len(final.in_flight), "a drawn prompt is neither made nor in flight"
    engine = msgspec.json.decode((final_dir / "engine" / "simulated_trainer.json").read_bytes())
    assert engine["steps"] == TOTAL
    assert len(engine["trained_prompts"]) == len(set(engine["trained_prompts"])) == TOTAL * BATCH, "a prompt was trained twice"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_gracefully_with_a_checkpoint(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    out = tmp_path / "run"
    proc = spawn(out, "trainer.total_training_steps=100000", "stop_timeout_s=20")
    wait_until(lambda: steps_written(out) >= 5)
    proc.send_signal(sig)
    proc.wait(timeout=60)  # a hang guard; promptness is the checkpoint below, not a wall-clock figure
    assert proc.returncode == code, console(out)
    assert "did not stop within" not in console(out)  # stopped gracefully, not by the stop_timeout_s exit
    state = checkpoint.load_state(latest_checkpoint(out))
    assert state.reason == "stop"
    assert state.trainer.step == steps_written(out)
    assert f"stopped after {state.trainer.step} of 100000 steps" in console(out)  # not "finished"
    resumed = subprocess.run(
        [*RUN, f"trainer.total_training_steps={state.trainer.step + 5}", f"output_dir={out}", "resume=auto"],
        capture_output=True,
        timeout=60,
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert steps_written(out) == state.trainer.step + 5


def test_sigint_during_start_up_ends_the_start_up(tmp_path: Path) -> None:
    """Ctrl-C while engines start (a minute with vLLM) is not lost: nothing is trained, exit 130."""
    out = tmp_path / "run"
    proc = spawn(out, "rollout.simulated.start_latency_s=600", "stop_timeout_s=60")
    wait_until(lambda: (out / "config.json").exists())  # inputs checked, engines about to start
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)  # a hang guard: the 600 s start is cancelled, not waited out
    assert proc.returncode == 130, console(out)
    assert "stopped after 0 of 400 steps" in console(out)  # the default total
    assert "did not stop within" not in console(out)  # ended gracefully, not by the stop_timeout_s exit
    assert steps_written(out) == 0 and not checkpoint.complete_checkpoints(out)


def test_second_sigint_exits_at_once(tmp_path: Path) -> None:
    """While a graceful stop waits (here: a slow checkpoint write), a second SIGINT exits immediately."""
    out = tmp_path / "run"
    proc = spawn(out, "trainer.simulated.save_latency_s=30", "trainer.total_training_steps=100000")
    wait_until(lambda: steps_written(out) >= 3)
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: writing_checkpoint(out), timeout=20)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=25)  # a hang guard, shorter than the 30 s write it must not wait for
    assert proc.returncode == 130, console(out)
    assert "second SIGINT" in console(out)
    # it did not wait for the write (which would have completed it), and the cut write never looks complete
    assert checkpoint.latest_checkpoint(out) is None
