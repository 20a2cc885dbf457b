"""A generation engine wrapper that records when generation really runs.

`Supervisor.pause()` promises that nothing runs on the engine once it returns; the only way to
check that from outside, for any engine, is to watch the engine's own `generate` calls. The
wrapper forwards everything to the wrapped engine (the transport still loads weights into it).
"""

from __future__ import annotations

import time

from asyncpolicy.channels.signal import StateSignal
from asyncpolicy.engines.protocols import (
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
)


class ProbedGeneration:
    """Counts `generate` calls started and running; remembers the first start after a mark."""

    def __init__(self, inner: GenerationEngine) -> None:
        self.inner = inner
        self.starts = 0
        self.active = 0
        self.changed = StateSignal()
        self._mark: float | None = None
        self.first_start_after_mark: float | None = None

    @property
    def version(self) -> int:
        return self.inner.version

    def set_version(self, version: int) -> None:
        self.inner.set_version(version)

    def mark(self) -> float:
        """From now on, remember the time of the next `generate` start."""
        self._mark = time.monotonic()
        self.first_start_after_mark = None
        return self._mark

    async def start(self) -> None:
        await self.inner.start()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        now = time.monotonic()
        self.starts += 1
        self.active += 1
        if self._mark is not None and self.first_start_after_mark is None:
            self.first_start_after_mark = now
        self.changed.notify()
        try:
            return await self.inner.generate(request)
        finally:
            self.active -= 1
            self.changed.notify()

    async def abort_all(self) -> None:
        await self.inner.abort_all()

    async def aclose(self) -> None:
        await self.inner.aclose()
