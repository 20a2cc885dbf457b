"""Wake-everyone-on-change: the one waiting primitive the channel and the actors share.

Waiters re-check their own predicate after each wake-up, so no state is passed through the
signal and a missed or spurious wake-up cannot corrupt anything. Waiting is cancellable and
leaves no registration behind.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio


class StateSignal:
    """Notify on every state change; `wait_until(pred)` blocks until `pred()` holds."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None  # created lazily: constructors may run outside a loop

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        """Wait for the next notify()."""
        if self._event is None:
            self._event = anyio.Event()
        await self._event.wait()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self.wait()
