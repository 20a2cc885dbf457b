"""benchmarks/gpu_verify.sh on the CPU: its plumbing, not the GPU. Step 2's run goes through the CPU
engines (RUN_ENGINES); the interpreter is a stand-in that passes every command to Python except the
one a test makes hang: it answers (prints its line), then never exits, deaf to SIGTERM, with a child
of its own — what vLLM's `LLM` loader did on an H200, where the script never printed its table.

The script must end, print its table with the hanging step as a row saying so, and leave nothing of
that step behind. Bounds are generous (the script's own budget, then minutes): nothing is timed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_verify.sh"
BUDGET_S = 900  # the script's own bound; the test waits that plus a margin
CPU_RUN = "rollout.engine=hf trainer.engine=torch"


def _hanging_python(tmp_path: Path) -> Path:
    """An interpreter whose commands run, except one with an argument matching $HANG_ON: it hangs."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
for a in "$@"; do
    if [[ -n "${{HANG_ON:-}}" && "$a" == *$HANG_ON* ]]; then
        trap '' TERM                    # deaf to SIGTERM, as vLLM's engine core in its grace period
        sleep 100000 &                  # a child that outlives nothing on its own: only a group kill gets it
        echo $! >"$HANG_PIDFILE"
        echo "vLLM generated 8 tokens"  # it answered
        while :; do sleep 1; done
    fi
done
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    return fake


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TMPDIR": str(tmp_path), "ASYNCPOLICY_CACHE": str(tmp_path / "cache"), "PYTHON": str(_hanging_python(tmp_path)),
        "HANG_PIDFILE": str(tmp_path / "hang.pid"), "SKIP_LEARN": "1", "BUDGET_S": str(BUDGET_S), "STOP_AFTER": "3",
        "RUN_ENGINES": CPU_RUN, "KILL_AFTER_S": "2", **extra,
    }


def _rows(stdout: str) -> dict[str, str]:
    """check → the rest of its table line, from the line after the header on."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("check ")) + 1
    return {line[:28].strip(): line[29:] for line in lines[start:] if line.strip() and not line.startswith("logs:")}


def _gone(pid: int, within_s: float = 60) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_a_loader_that_never_exits_is_a_timed_out_row_and_the_table_still_prints(tmp_path: Path) -> None:
    env = _env(tmp_path, HANG_ON="load_vllm.py", VLLM_LOAD_S="3")
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=BUDGET_S + 300)
    rows = _rows(r.stdout)
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]  # a step failed
    assert rows["load: vLLM"].startswith("TIMED OUT (3 s)") and "vLLM generated 8 tokens" in rows["load: vLLM"], rows
    ctrl_c = next(v for k, v in rows.items() if k.startswith("Ctrl-C at step"))
    assert ctrl_c.startswith("ok: rc=130") and "processes left: 0" in ctrl_c, r.stdout
    assert rows["export"].startswith("ok") and rows["load: transformers"].startswith("ok"), r.stdout
    assert "transformers loaded" in rows["load: transformers"]
    assert _gone(int((tmp_path / "hang.pid").read_text())), "the hanging loader's child outlived its step"


def test_a_script_stopped_mid_step_prints_its_table_and_kills_the_step(tmp_path: Path) -> None:
    env = _env(tmp_path, HANG_ON="asyncpolicy")  # step 2's run hangs (before any step: its rates say so)
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pidfile = tmp_path / "hang.pid"
    try:
        deadline = time.monotonic() + 300
        while not pidfile.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pidfile.exists(), "the run never started"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert _rows(out)["Ctrl-C"].startswith("interrupted"), out
    assert _gone(int(pidfile.read_text())), "the stopped step's process group outlived the script"


def test_steps_left_without_time_are_rows_saying_so(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(SCRIPT)], env=_env(tmp_path, BUDGET_S="1"), capture_output=True, text=True, timeout=300)
    rows = _rows(r.stdout)
    assert r.returncode == 1
    assert list(rows) == ["Ctrl-C", "export", "load: transformers", "load: vLLM"]
    assert all(v.startswith("SKIPPED (no time left)") for v in rows.values()), rows
