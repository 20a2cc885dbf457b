"""Ctrl-C as a terminal sends it — SIGINT to every process of the job — on the GPU path's process
tree, built on the CPU: the FSDP trainer's worker processes over gloo (`trainer.engine=fsdp
trainer.n_gpus_per_node=0`). Sent mid-step and mid-weight-sync; the run must stop gracefully
(exit 130, a stop checkpoint that resumes and exports), and leave no process behind.

Where the run is when the signal goes is known, not guessed: the FSDP rank holds the chosen
command (`ASYNCPOLICY_DEBUG_HOLD`) until the test releases it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from asyncpolicy import checkpoint
from asyncpolicy.engines.training.fsdp_worker import DEBUG_HOLD_ENV

pytestmark = pytest.mark.slow  # each case starts FSDP ranks three times: about a minute on 2 cores

RUN = [
    sys.executable, "-m", "asyncpolicy", "run",
    "rollout.engine=hf", "trainer.engine=fsdp", "trainer.n_gpus_per_node=0",
    "data.train_batch_size=4", "rollout.n=4", "data.max_response_length=8",
    "stop_timeout_s=120", "log_level=info", "progress=off",
]


def events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [msgspec.json.decode(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def has_event(out: Path, name: str) -> bool:
    return any(e.get("event") == name for e in events(out))


def wait_until(predicate, proc: subprocess.Popen[bytes], out: Path, timeout: float = 300.0) -> None:
    """A hang guard, not a speed requirement; fails at once if the run exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) early:\n{console(out)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached:\n{console(out)}")
        time.sleep(0.05)


def console(out: Path) -> str:
    return (out.parent / "console.log").read_text(errors="replace")[-4000:]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.parametrize("held", ["train", "full_state"], ids=["mid-step", "mid-sync"])
def test_sigint_to_the_process_group_stops_gracefully(tmp_path: Path, held: str) -> None:
    out, hold = tmp_path / "run", tmp_path / "hold"
    out.mkdir()
    hold.mkdir()
    log = open(tmp_path / "console.log", "ab")
    env = {**os.environ, DEBUG_HOLD_ENV: f"{held}={hold}"}
    proc = subprocess.Popen(
        [*RUN, "trainer.total_training_steps=1000", f"output_dir={out}"],
        stdout=log, stderr=log, env=env, start_new_session=True,  # its own group: killpg reaches only the job
    )
    try:
        wait_until(lambda: (hold / f"{held}.reached").exists(), proc, out)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: every process of the job
        wait_until(lambda: has_event(out, "stop_requested"), proc, out)
        if held == "full_state":  # the sync was cancelled while the rank still owed its reply
            wait_until(lambda: has_event(out, "fsdp_command_interrupted"), proc, out)
        (hold / f"{held}.release").touch()
        assert proc.wait(timeout=300) == 130, console(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert "died" not in console(out)
    if held == "full_state":
        drained = [e for e in events(out) if e.get("event") == "fsdp_command_drained"]
        assert [e["command"] for e in drained] == ["FullState"]
    ckpt = checkpoint.latest_checkpoint(out)
    assert ckpt is not None, console(out)
    state = checkpoint.load_state(ckpt)
    assert state.reason == "stop" and state.trainer.step >= 1
    deadline = time.monotonic() + 60  # the run has exited: its children go with it (no waiting on speed)
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(proc.pid) == [], "a process of the job outlived it"

    exported = subprocess.run([sys.executable, "-m", "asyncpolicy", "export", str(ckpt), str(tmp_path / "model")],
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()

    resumed = subprocess.run(
        [*RUN, f"trainer.total_training_steps={state.trainer.step + 1}", f"output_dir={out}", "resume=auto"],
        capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = checkpoint.latest_checkpoint(out)
    assert final is not None
    assert checkpoint.load_state(final).trainer.step == state.trainer.step + 1
