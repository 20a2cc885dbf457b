"""VersionedChannel under real concurrency: producers, consumers, a version bumper and a closer racing.

Hypothesis chooses each task's script (how many checkpoints before each operation, the versions,
batch sizes, timeouts, when a get is cancelled, when the channel closes) and, through
`st.random_module()`, the seed of trio's scheduler (trio registers its scheduling RNG with
Hypothesis), so interleavings are explored and failing ones replay. The promises checked are the
module invariants of channels/versioned.py, at every operation and at the end:

* no handed-out item is older than max_staleness for the version its consumer presented;
* never more than `capacity` items queued; produced == consumed + dropped_stale + queued;
* by identity: every accepted item is handed out exactly once, dropped once, or still queued —
  so a cancelled or timed-out get/get_batch loses nothing; hand-outs keep put order;
* only items stale for the newest presented version are dropped;
* close wakes every waiter and the whole scenario finishes under a deadline (no deadlock).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncpolicy.channels import ChannelClosed, EndOfStream, VersionedChannel

DEADLINE_S = 3.0  # a scenario takes milliseconds; a deadlock fails here


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@dataclass(frozen=True)
class PutOp:
    pause: int  # checkpoints before the operation
    lag: int  # the item's version is the current version minus lag (a slow producer)


@dataclass(frozen=True)
class GetOp:
    pause: int
    kind: str  # "get", "batch" or "nowait"
    n: int
    lag: int  # the consumer presents current version minus lag
    timeout: float | None
    cancel_after: int | None  # checkpoints after which a sibling cancels the get


put_ops = st.builds(PutOp, pause=st.integers(0, 3), lag=st.integers(-1, 4))
get_ops = st.builds(
    GetOp,
    pause=st.integers(0, 3),
    kind=st.sampled_from(["get", "batch", "nowait"]),
    n=st.integers(1, 4),
    lag=st.integers(0, 2),
    timeout=st.sampled_from([None, None, 0.0, 0.001, 0.01]),
    cancel_after=st.one_of(st.none(), st.integers(0, 4)),
)


@dataclass
class Ledger:
    """What the test saw, independently of the channel's own counters."""

    max_staleness: int
    capacity: int
    version: int = 0
    max_presented: int = -1
    accepted: dict[int, int] = field(default_factory=dict)  # item -> acceptance order
    handed: list[int] = field(default_factory=list)
    dropped: set[int] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)

    def on_drop(self, item: tuple[int, int], version: int) -> None:
        if not self.max_presented - version > self.max_staleness:
            self.violations.append(f"fresh item {item} dropped at newest consumer version {self.max_presented}")
        self.dropped.add(item[0])

    def hand_out(self, items: list[tuple[int, int]], presented: int) -> None:
        for ident, version in items:
            if presented - version > self.max_staleness:
                self.violations.append(f"item {ident} of version {version} handed out at {presented}")
            self.handed.append(ident)

    def check(self, ch: VersionedChannel[tuple[int, int]]) -> None:
        s = ch.statistics()
        if s.size > s.capacity:
            self.violations.append(f"size {s.size} > capacity {s.capacity}")
        if s.produced != s.consumed + s.dropped_stale + s.size:
            self.violations.append(f"not conserved: {s}")


async def _checkpoints(n: int) -> None:
    for _ in range(n):
        await anyio.lowlevel.checkpoint()


async def run_scenario(
    capacity: int,
    max_staleness: int,
    producers: list[list[PutOp]],
    consumers: list[list[GetOp]],
    bumps: list[int],
    early_close: int | None,
) -> tuple[Ledger, VersionedChannel[tuple[int, int]]]:
    led = Ledger(max_staleness=max_staleness, capacity=capacity)
    ch: VersionedChannel[tuple[int, int]] = VersionedChannel(capacity, max_staleness, on_drop=led.on_drop)
    ids, order = itertools.count(), itertools.count()
    producers_done, consumers_done = anyio.Event(), anyio.Event()
    remaining = {"producers": len(producers), "consumers": len(consumers)}

    def finished(group: str, event: anyio.Event) -> None:
        remaining[group] -= 1
        if remaining[group] == 0:
            event.set()

    async def producer(script: list[PutOp]) -> None:
        try:
            for op in script:
                await _checkpoints(op.pause)
                ident = next(ids)
                try:
                    await ch.put((ident, max(0, led.version - op.lag)), max(0, led.version - op.lag))
                except ChannelClosed:
                    return
                led.accepted[ident] = next(order)
                led.check(ch)
        finally:
            finished("producers", producers_done)

    async def consume_one(op: GetOp) -> bool:
        """One operation; False once the channel reported end-of-stream."""
        presented = max(0, led.version - op.lag)
        led.max_presented = max(led.max_presented, presented)
        if op.kind == "nowait":
            item = ch.get_nowait(presented)
            led.hand_out([item] if item is not None else [], presented)
            return True
        n = 1 if op.kind == "get" else min(op.n, capacity)
        async with anyio.create_task_group() as tg:
            if op.cancel_after is not None:
                tg.start_soon(_cancel_after, tg.cancel_scope, op.cancel_after)
            try:
                if op.kind == "get":
                    items = [await ch.get(presented)]
                else:
                    items = await ch.get_batch(n, presented, timeout=op.timeout)
            except EndOfStream:
                tg.cancel_scope.cancel()
                return False
            except TimeoutError:
                items = []
            led.hand_out(items, presented)
            tg.cancel_scope.cancel()
        return True

    async def consumer(script: list[GetOp]) -> None:
        try:
            for op in script:
                await _checkpoints(op.pause)
                if not await consume_one(op):
                    return
                led.check(ch)
        finally:
            finished("consumers", consumers_done)

    async def bumper() -> None:
        for pause in bumps:
            await _checkpoints(pause)
            led.version += 1

    async def closer() -> None:
        async with anyio.create_task_group() as tg:
            for event in (producers_done, consumers_done):
                tg.start_soon(_cancel_when, tg.cancel_scope, event)
            if early_close is not None:
                tg.start_soon(_cancel_after, tg.cancel_scope, early_close)
        ch.close()

    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for script in producers:
                tg.start_soon(producer, script)
            for cscript in consumers:
                tg.start_soon(consumer, cscript)
            tg.start_soon(bumper)
            tg.start_soon(closer)
    return led, ch


async def _cancel_after(scope: anyio.CancelScope, checkpoints: int) -> None:
    await _checkpoints(checkpoints)
    scope.cancel()


async def _cancel_when(scope: anyio.CancelScope, event: anyio.Event) -> None:
    await event.wait()
    scope.cancel()


@pytest.mark.anyio
@settings(max_examples=8 * settings().max_examples)  # cheap: ~20 ms per example
@given(
    capacity=st.integers(1, 4),
    max_staleness=st.integers(0, 3),
    producers=st.lists(st.lists(put_ops, max_size=6), min_size=1, max_size=3),
    consumers=st.lists(st.lists(get_ops, max_size=6), min_size=1, max_size=3),
    bumps=st.lists(st.integers(0, 6), max_size=5),
    early_close=st.one_of(st.none(), st.integers(0, 30)),
    _scheduler=st.random_module(),
)
async def test_concurrent_tasks_keep_every_channel_promise(
    capacity: int,
    max_staleness: int,
    producers: list[list[PutOp]],
    consumers: list[list[GetOp]],
    bumps: list[int],
    early_close: int | None,
    _scheduler: object,
) -> None:
    """Staleness bound, capacity, conservation by identity, FIFO, close wakes all, no deadlock."""
    led, ch = await run_scenario(capacity, max_staleness, producers, consumers, bumps, early_close)
    assert not led.violations, led.violations
    stats = ch.statistics()
    queued = [item[0] for item, _ in ch.snapshot().items]
    assert stats.closed and stats.tasks_waiting_get == 0 and stats.tasks_waiting_put == 0
    assert stats.size <= capacity
    assert (stats.produced, stats.consumed, stats.dropped_stale) == (len(led.accepted), len(led.handed), len(led.dropped))
    assert stats.produced == stats.consumed + stats.dropped_stale + stats.size
    assert len(set(led.handed)) == len(led.handed), "an item was handed out twice"
    assert not (set(led.handed) & led.dropped) and not (set(queued) & (set(led.handed) | led.dropped))
    assert set(led.accepted) == set(led.handed) | led.dropped | set(queued), "an item was lost"
    put_order = [led.accepted[i] for i in led.handed]
    assert put_order == sorted(put_order), "items were handed out out of put order"
