"""Keep garbage collections from stalling the event loop while a Supervisor runs.

A full (generation-2) collection walks every object the collector tracks, with the GIL held:
after torch and transformers are imported that is 190 000-400 000 objects and 150-250 ms during
which no task of the host's loop runs. Those objects (modules, the model, the tokenizer) live as
long as the run, and no per-step growth of long-lived objects was found; so once start-up is over
they are frozen (`gc.freeze()`): later collections walk only what the run allocates afterwards.
Start-up itself runs with automatic collection off, so the collections that imports would trigger
don't stall the loop either; nothing is collected by force (a forced collection would be the very
stall avoided).

What the run allocates afterwards can still be large: 2 500 live agentic episodes (tasks,
coroutines, token lists) are 70 000-170 000 tracked objects, and a full collection of them
stalled the loop 70-270 ms (`bench agentic`) while it freed nothing (collected 0 at every one:
the run's cyclic garbage dies young). So while a Supervisor runs, the collector's thresholds are
the run's (`run_thresholds`), and the host's are given back when the last one ends:

* generation 1 is collected every `YOUNG_EVERY` generation-0 collections instead of every 10th,
  so each young collection walks a few thousand objects (a few ms), not tens of thousands;
* no automatic full collection, except when the heap has grown: once the Python allocator's
  blocks in use are `GROWTH` times what they were after the last full collection (or the
  freeze), the next collection is a full one (as Go's default GOGC does: memory held by
  cyclic garbage stays below about what the live objects hold). A run that does not grow
  never pays one.

The cost is bounded: cyclic garbage that exists at the freeze is kept until the last running
Supervisor ends, when `gc.unfreeze()` hands everything back to the collector. A host that froze
objects itself, or turned the collector off, is left as it is (thresholds included).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator
from typing import Any

YOUNG_EVERY = 2  # generation-0 collections per generation-1 collection while a run runs (Python: 10)
GROWTH = 2.0  # a full collection once the allocator's blocks in use have grown this many times
NEVER = 2**31 - 1  # a generation-2 threshold (a C int) no count reaches: no automatic full collection

_lock = threading.Lock()
_starting = 0  # collection_off blocks open (supervisors building or starting)
_reenable = False  # automatic collection was on when the first of them began
_running = 0  # supervisors started and not yet ended
_frozen_by_us = False
_host_thresholds: tuple[int, int, int] | None = None  # gc's thresholds before the run's were set
_blocks_after_full = 0  # sys.getallocatedblocks() after the latest full collection (or the freeze)


def run_thresholds(host: tuple[int, int, int]) -> tuple[int, int, int]:
    """The thresholds while a run runs: the host's generation 0, generation 1 every `YOUNG_EVERY`, no automatic full."""
    return (host[0], min(host[1], YOUNG_EVERY), NEVER)


def _after_collection(phase: str, info: dict[str, Any]) -> None:
    """gc callback (any thread, GIL held; it must not take `_lock`): a full collection resets the
    growth baseline; a generation-1 one checks growth and, past `GROWTH`, makes the next one full."""
    global _blocks_after_full
    if phase != "stop" or _host_thresholds is None:
        return
    if info["generation"] == 2:
        _blocks_after_full = sys.getallocatedblocks()
        gc.set_threshold(*run_thresholds(_host_thresholds))
    elif info["generation"] == 1 and sys.getallocatedblocks() > GROWTH * _blocks_after_full:
        t0, t1, _ = gc.get_threshold()
        gc.set_threshold(t0, t1, 0)  # the next collection that reaches generation 1 is a full one


@contextlib.contextmanager
def collection_off() -> Iterator[None]:
    """No automatic collection inside (nested and concurrent blocks share one switch); the
    collector is turned back on when the last block ends, if it was on before the first."""
    global _starting, _reenable
    with _lock:
        if _starting == 0:
            _reenable = gc.isenabled()
            gc.disable()
        _starting += 1
    try:
        yield
    finally:
        with _lock:
            _starting -= 1
            if _starting == 0 and _reenable:
                gc.enable()


@contextlib.contextmanager
def quiet_start_up() -> Iterator[None]:
    """Around a Supervisor's start-up: no automatic collection inside; what is alive after a
    successful start-up is frozen and the run's thresholds are set. Pair each successful block
    with one `run_ended()`."""
    global _running, _frozen_by_us, _host_thresholds, _blocks_after_full
    with collection_off():
        yield
        with _lock:
            _running += 1
            if _frozen_by_us or gc.get_freeze_count() == 0:
                gc.freeze()
                if not _frozen_by_us and _reenable:  # the first run, and the host collects automatically
                    _host_thresholds = gc.get_threshold()
                    _blocks_after_full = sys.getallocatedblocks()
                    gc.set_threshold(*run_thresholds(_host_thresholds))
                    gc.callbacks.append(_after_collection)
                _frozen_by_us = True


def run_ended() -> None:
    """A Supervisor whose start-up succeeded has ended; the last one unfreezes and gives the host's thresholds back."""
    global _running, _frozen_by_us, _host_thresholds
    with _lock:
        _running -= 1
        if _running == 0 and _frozen_by_us:
            if _host_thresholds is not None:
                gc.callbacks.remove(_after_collection)
                gc.set_threshold(*_host_thresholds)
                _host_thresholds = None
            gc.unfreeze()
            _frozen_by_us = False
