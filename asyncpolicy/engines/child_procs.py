"""Engine child processes that the terminal's signals do not reach, and that still die with us.

A Ctrl-C in a terminal, `timeout`, or `kill -- -PGID` sends SIGINT/SIGTERM to EVERY process of
the job's process group. Only the supervisor may act on it: it finishes the step, writes a stop
checkpoint, then stops its engines in order. An engine process (an FSDP rank, vLLM's engine core)
that dies from the signal first turns that graceful stop into a failed run.

`children_shielded()` wraps the start of engine processes; what a child inherits from it:

* SIG_IGN for SIGINT/SIGTERM (`ignore=True`): kept across fork AND exec, so multiprocessing's
  spawn children (the FSDP ranks) ignore the signals from their first instruction, before their
  own code can say so; they call `ignore_terminal_signals()` first thing as well. Set only for
  the milliseconds the children take to start: a signal that lands on another thread of the
  parent meanwhile is dropped (the user presses Ctrl-C again).
* The calling thread's blocked-signal mask (always): kept by fork, which is how vLLM starts its
  engine core when the parent has not touched CUDA (ours never does). vLLM's engine core installs
  its own SIGINT/SIGTERM handlers once it is up, replacing an inherited SIG_IGN, but a blocked
  mask still holds the signals back. spawn and forkserver children start with an empty mask
  (CPython's fork_exec resets it), so under `VLLM_WORKER_MULTIPROC_METHOD=spawn` vLLM's engine
  core is not shielded. The parent loses nothing: another thread takes the signal meanwhile, or
  this one gets it as soon as the block ends.

A separate session or process group would hide children from the terminal too, but
multiprocessing cannot start a child in one and an exec'd child can no longer be moved.

The cost: a child deaf to SIGTERM stops by its own protocol (a Stop command) or SIGKILL, so owners
fall back to `kill()`, never `terminate()`. vLLM's own shutdown sends SIGTERM, waits 5 s, then
kills the engine core's process tree. And a child must notice that its parent died (kill -9 of
the supervisor alone): `exit_with_parent()` ends it when multiprocessing's parent sentinel closes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

TERMINAL_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
PARENT_GONE_EXIT_CODE = 70  # EX_SOFTWARE: distinguishable from a crash (1) or a signal (< 0)


@contextlib.contextmanager
def children_shielded(*, ignore: bool = True) -> Iterator[None]:
    """Processes started inside the block are shielded from SIGINT/SIGTERM (see the module notes).

    `ignore=False` only blocks them (fork children; the parent's handlers stay in place): for a
    block that lasts long, such as vLLM's start.
    """
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
    old_handlers: dict[int, Any] = {}
    try:
        if ignore and threading.current_thread() is threading.main_thread():  # signal.signal's rule
            for sig in TERMINAL_SIGNALS:
                old_handlers[sig] = signal.signal(sig, signal.SIG_IGN)
        yield
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a signal held back meanwhile arrives now


def ignore_terminal_signals() -> None:
    """In a child process: SIGINT/SIGTERM are ignored (the parent stops us by command)."""
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, TERMINAL_SIGNALS)  # SIG_IGN discards what was pending


def exit_with_parent(name: str) -> None:
    """In a multiprocessing child: exit at once when the parent process is gone.

    A watcher thread waits on the parent's sentinel (readable when the parent's end closes, which
    the kernel does when the parent dies, however it dies), then exits this process even while
    its main thread is busy in a long step or a collective.
    """
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        raise RuntimeError("exit_with_parent must run in a multiprocessing child process")
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        print(f"{name}: parent process {parent.pid} is gone; exiting", file=sys.stderr, flush=True)
        os._exit(PARENT_GONE_EXIT_CODE)

    threading.Thread(target=watch, name=f"{name}-parent-watch", daemon=True).start()
