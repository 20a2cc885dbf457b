"""Keep full garbage collections from stalling the event loop while a Supervisor runs.

A full (generation-2) collection walks every object the collector tracks, with the GIL held:
after torch and transformers are imported that is 190 000-400 000 objects and 150-250 ms during
which no task of the host's loop runs. Those objects (modules, the model, the tokenizer) live as
long as the run, and no per-step growth of long-lived objects was found; so once start-up is over
they are frozen (`gc.freeze()`): later collections walk only what the run allocates afterwards.
Start-up itself runs with automatic collection off, so the collections that imports would trigger
don't stall the loop either; nothing is collected by force (a forced collection would be the very
stall avoided).

The cost is bounded: cyclic garbage that exists at the freeze is kept until the last running
Supervisor ends, when `gc.unfreeze()` hands everything back to the collector. A host that froze
objects itself, or turned the collector off, is left as it is.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_starting = 0  # collection_off blocks open (supervisors building or starting)
_reenable = False  # automatic collection was on when the first of them began
_running = 0  # supervisors started and not yet ended
_frozen_by_us = False


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
    successful start-up is frozen. Pair each successful block with one `run_ended()`."""
    global _running, _frozen_by_us
    with collection_off():
        yield
        with _lock:
            _running += 1
            if _frozen_by_us or gc.get_freeze_count() == 0:
                gc.freeze()
                _frozen_by_us = True


def run_ended() -> None:
    """A Supervisor whose start-up succeeded has ended; the last one unfreezes."""
    global _running, _frozen_by_us
    with _lock:
        _running -= 1
        if _running == 0 and _frozen_by_us:
            gc.unfreeze()
            _frozen_by_us = False
