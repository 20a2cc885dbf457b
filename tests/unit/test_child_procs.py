"""Engine child processes: deaf to the terminal's SIGINT/SIGTERM, gone with their parent.

The children are plain multiprocessing children started as the engines start theirs: spawn for
the FSDP ranks, fork for vLLM's engine core, which installs its own SIGINT/SIGTERM handlers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from asyncpolicy.engines.child_procs import children_shielded, ignore_terminal_signals

HANDLER_EXIT = 3


def _serve(conn: Any) -> None:
    conn.send("ready")
    while True:
        conn.recv()
        conn.send("pong")


def like_vllm_engine_core(conn: Any) -> None:
    """Installs its own handlers (they would end the process), replacing any inherited SIG_IGN."""

    def bye(signum: int, frame: object) -> None:
        os._exit(HANDLER_EXIT)

    signal.signal(signal.SIGINT, bye)
    signal.signal(signal.SIGTERM, bye)
    _serve(conn)


def like_fsdp_worker(conn: Any) -> None:
    ignore_terminal_signals()
    _serve(conn)


def still_starting(conn: Any) -> None:
    """A child that has not run a line of its own signal set-up yet (Python's defaults)."""
    _serve(conn)


def _start(target: Any, method: str, shield: dict[str, bool] | None) -> tuple[Any, Any]:
    ctx: Any = multiprocessing.get_context(method)  # the Process of a fork, spawn or forkserver context
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child,), daemon=True)
    if shield is not None:
        with children_shielded(**shield):
            proc.start()
    else:
        proc.start()
    child.close()
    assert parent.recv() == "ready"
    return proc, parent


def _signal_then_ping(proc: Any, conn: Any) -> bool:
    """Send SIGINT and SIGTERM, then a ping: True if the child answered (it survived both)."""
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        conn.send("ping")
        return conn.recv() == "pong"  # a child killed by the signals closes the pipe: EOFError
    except (EOFError, OSError):
        return False


SHIELDED = [
    (like_vllm_engine_core, "fork", {"ignore": False}),  # vLLM's start: a long block, handlers kept
    (still_starting, "spawn", {"ignore": True}),  # an FSDP rank before worker_main's first line
    (like_fsdp_worker, "spawn", {"ignore": True}),
]


@pytest.mark.parametrize("target, method, shield", SHIELDED)
def test_children_started_shielded_survive_terminal_signals(target: Any, method: str, shield: dict[str, bool]) -> None:
    proc, conn = _start(target, method, shield)
    try:
        assert _signal_then_ping(proc, conn)
        assert proc.is_alive()
    finally:
        proc.kill()
        proc.join(30)


@pytest.mark.parametrize("target, method", [(like_vllm_engine_core, "fork"), (still_starting, "spawn")])
def test_unshielded_children_die_from_terminal_signals(target: Any, method: str) -> None:
    """The control: what vLLM's engine core and the FSDP ranks did before."""
    proc, conn = _start(target, method, None)
    try:
        assert not _signal_then_ping(proc, conn)
        proc.join(30)
        assert proc.exitcode != 0
    finally:
        proc.kill()
        proc.join(30)


def test_the_parent_still_gets_a_signal_sent_during_the_block() -> None:
    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        with children_shielded(ignore=False):
            os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:  # handlers run between bytecodes
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, old)
    assert got == [signal.SIGINT]


PARENT_SCRIPT = """
import multiprocessing, sys, time
from asyncpolicy.engines.child_procs import children_shielded, exit_with_parent, ignore_terminal_signals

def child(watch):
    ignore_terminal_signals()
    if watch:
        exit_with_parent("test-child")
    while True:
        time.sleep(1)  # busy elsewhere: only the watcher thread can notice the parent's death

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=child, args=(watch,), daemon=True) for watch in (True, False)]
    with children_shielded():
        for p in procs:
            p.start()
    print(*(p.pid for p in procs), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited


def test_a_child_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT_SCRIPT))
    repo = Path(__file__).resolve().parents[2]  # this checkout's asyncpolicy, not another install's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    assert parent.stdout is not None
    watched, unwatched = (int(x) for x in parent.stdout.readline().split())
    try:
        parent.kill()  # SIGKILL: no atexit, no daemon-child clean-up
        parent.wait(30)
        deadline = time.monotonic() + 60
        while _alive(watched) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(watched)
        assert _alive(unwatched)  # the control: without the watcher it would stay behind
    finally:
        for pid in (watched, unwatched):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
