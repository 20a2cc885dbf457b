"""A bounded channel whose items carry the policy version that made them.

Invariants (checked by tests/property/test_channel_state_machine.py and test_channel_concurrency.py):

* it never holds more than `capacity` items: `put` waits while it is full (backpressure, no drop);
* it never hands out an item with `current_version - item_version > staleness_limit`: such an item
  is dropped, counted in `dropped_stale` and logged with its age. `staleness_limit` is the
  effective bound (a controller may move it with `set_staleness_limit`); it is never above
  `max_staleness`, the user's hard bound, so the hard bound always holds;
* conservation: produced == consumed + dropped_stale + size, at every moment;
* every wait is cancellable and cancellation loses nothing: a cancelled `get`/`get_batch`/`put`
  leaves the channel exactly as it would have been without the call;
* `close()` wakes every waiter: getters see `EndOfStream` once nothing fresh remains, putters
  see `ChannelClosed`.

Only anyio primitives are used, so it runs under asyncio and trio alike.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, deque
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel
import msgspec
import structlog

from asyncpolicy.channels.signal import StateSignal

log = structlog.get_logger("asyncpolicy.channel")

T = TypeVar("T")


class EndOfStream(Exception):
    """Clean finish: the channel is closed and holds nothing fresh. Not an error."""


class ChannelClosed(Exception):
    """`put` on a channel that was closed: the consumer side has finished."""


class WouldBlock(Exception):
    """`put_nowait` on a full channel."""


class ChannelStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A consistent snapshot of the channel; metrics and logs read these, never the internals."""

    produced: int  # items ever accepted by put (restored items included)
    consumed: int  # items handed out by get/get_nowait/get_batch
    dropped_stale: int  # items discarded because they exceeded the staleness limit
    staleness_limit: int  # the effective bound now (<= max_staleness, the hard one)
    size: int  # items queued now
    capacity: int
    utilization: float  # size / capacity
    # Sample age = consumer version - item version, as each item is handed out. The run's one
    # staleness metric family, computed here and nowhere else (metrics.jsonl keeps these names):
    sample_age_mean: float  # of the items the latest get/get_batch handed out (nan before the first)
    sample_age_max: float  # the oldest of those items
    staleness_max: float  # the largest age ever handed out, a restored channel's included (nan before the first)
    version_diversity: int  # distinct versions among queued items
    oldest_version: int  # of queued items; -1 when empty
    newest_version: int
    tasks_waiting_put: int
    tasks_waiting_get: int
    closed: bool


class ChannelSnapshot(msgspec.Struct, Generic[T], kw_only=True):
    """Contents and counters, for checkpoints: restoring it reproduces the channel exactly.

    Generic in the item type, so `msgspec.msgpack.decode(data, type=ChannelSnapshot[Sample])`
    gives back typed items.
    """

    items: list[tuple[T, int]]  # (item, version), oldest first
    produced: int
    consumed: int
    dropped_stale: int
    consumer_version: int
    age_max: float  # the largest age handed out (-inf before the first): staleness_max continues from it
    sample_age_mean: float = math.nan  # of the latest take (checkpoint format 1 has none)
    sample_age_max: float = math.nan


class VersionedChannel(Generic[T]):
    """The seed's MessageQueue, as a bounded, versioned, cancellation-safe anyio channel."""

    def __init__(
        self,
        capacity: int,
        max_staleness: int,
        *,
        name: str = "samples",
        on_drop: Callable[[T, int], None] | None = None,
    ) -> None:
        """`on_drop(item, version)` is called for each stale item dropped (producers re-plan on it)."""
        if capacity < 1:
            raise ValueError(f"channel {name!r}: capacity must be >= 1, got {capacity}")
        if max_staleness < 0:
            raise ValueError(f"channel {name!r}: max_staleness must be >= 0, got {max_staleness}")
        self.name = name
        self.capacity = capacity
        self.max_staleness = max_staleness  # the hard bound: nothing ever moves it
        self._limit = max_staleness  # the effective bound, in 0..max_staleness
        self._on_drop = on_drop
        self._items: deque[tuple[T, int]] = deque()
        self._versions: Counter[int] = Counter()  # version -> queued items of it; keeps the stale check O(versions)
        self._closed = False
        self._changed = StateSignal()
        self._waiting_put = 0
        self._waiting_get = 0
        self._produced = 0
        self._consumed = 0
        self._dropped = 0
        self._consumer_version = -1  # highest version a consumer has presented
        self._fresh_for = -1  # the version the queued items were last checked against
        self._age_max = -math.inf  # over every item handed out
        self._last_ages: tuple[float, float] = (math.nan, math.nan)  # (mean, max) of the latest take

    # -- producing ----------------------------------------------------------------------------

    @property
    def staleness_limit(self) -> int:
        """The effective bound: items older than this are dropped (equals max_staleness unless moved)."""
        return self._limit

    def set_staleness_limit(self, limit: int) -> None:
        """Move the effective bound within 0..max_staleness, from now on.

        Lowering it drops, at the next take, the queued items it makes stale (counted and logged
        like any stale drop: conservation holds); raising it never brings back an item dropped before.
        """
        if not 0 <= limit <= self.max_staleness:
            raise ValueError(
                f"channel {self.name!r}: staleness limit {limit} outside 0..{self.max_staleness} (the hard bound)"
            )
        if limit != self._limit:
            self._limit = limit
            self._fresh_for = -1  # queued items must be checked again against the new bound
            self._changed.notify()

    def _is_stale(self, version: int, current_version: int) -> bool:
        return current_version - version > self._limit

    def _drop(self, item: T, version: int, current_version: int, reason: str) -> None:
        self._dropped += 1
        if self._on_drop is not None:
            self._on_drop(item, version)
        log.warning(
            "sample_dropped_stale",
            channel=self.name,
            item_version=version,
            consumer_version=current_version,
            age=current_version - version,
            max_staleness=self._limit,
            reason=reason,
            dropped_total=self._dropped,
        )

    def put_nowait(self, item: T, version: int) -> None:
        """Queue `item` made by policy `version`, or raise WouldBlock when full."""
        if self._closed:
            raise ChannelClosed(f"channel {self.name!r} is closed")
        if len(self._items) >= self.capacity:
            raise WouldBlock
        self._produced += 1
        if self._consumer_version >= 0 and self._is_stale(version, self._consumer_version):
            # Already too old for the consumer: counting it as made-then-dropped keeps conservation.
            self._drop(item, version, self._consumer_version, reason="stale_on_put")
            return
        self._items.append((item, version))
        self._versions[version] += 1
        self._changed.notify()

    async def put(self, item: T, version: int) -> None:
        """Queue `item`, waiting while the channel is full (backpressure). Raises ChannelClosed."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                self.put_nowait(item, version)
                return
            except WouldBlock:
                pass
            self._waiting_put += 1
            try:
                await self._changed.wait()
            finally:
                self._waiting_put -= 1

    # -- consuming ----------------------------------------------------------------------------

    def _present(self, current_version: int) -> None:
        """Record the consumer's version and discard everything it may no longer train on."""
        if current_version == self._fresh_for:
            return  # scanned at this version; later puts were checked against a version >= it
        self._fresh_for = current_version
        if current_version > self._consumer_version:
            self._consumer_version = current_version
        if not self._versions or not self._is_stale(min(self._versions), current_version):
            return
        kept: deque[tuple[T, int]] = deque()
        for item, v in self._items:
            if self._is_stale(v, current_version):
                self._drop(item, v, current_version, reason="stale_on_get")
                self._forget_version(v)
            else:
                kept.append((item, v))
        self._items = kept
        self._changed.notify()  # space freed for putters

    def _forget_version(self, v: int) -> None:
        self._versions[v] -= 1
        if not self._versions[v]:
            del self._versions[v]

    def _take(self, n: int, current_version: int) -> list[T]:
        out: list[T] = []
        age_sum, age_max = 0, -1
        for _ in range(n):
            item, v = self._items.popleft()
            self._forget_version(v)
            age = current_version - v
            age_sum += age
            age_max = max(age_max, age)
            out.append(item)
        self._last_ages = (age_sum / n, float(age_max))
        self._age_max = max(self._age_max, age_max)
        self._consumed += n
        self._changed.notify()
        return out

    def get_nowait(self, current_version: int) -> T | None:
        """The oldest fresh item, or None when nothing fresh is queued (stale ones are dropped)."""
        self._present(current_version)
        if not self._items:
            return None
        return self._take(1, current_version)[0]

    async def get(self, current_version: int) -> T:
        """The oldest fresh item, waiting for one. Raises EndOfStream once closed and drained."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._present(current_version)
        if self._items:  # fast path: no wait, no cancel scope
            return self._take(1, current_version)[0]
        return (await self.get_batch(1, current_version))[0]

    async def get_batch(self, n: int, current_version: int, *, timeout: float | None = None) -> list[T]:
        """Exactly `n` fresh items, oldest first, taken at once.

        Waits until `n` fresh items are queued. Raises EndOfStream if the channel is closed with
        fewer than `n` left (they stay queued), TimeoutError after `timeout` seconds. Either way,
        and on cancellation, nothing is taken.
        """
        if n < 1 or n > self.capacity:
            raise ValueError(f"channel {self.name!r}: batch of {n} cannot be served by capacity {self.capacity}")
        await anyio.lowlevel.checkpoint_if_cancelled()
        self._present(current_version)
        if len(self._items) >= n:  # fast path: no wait, no cancel scope
            return self._take(n, current_version)
        with anyio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
            while True:
                self._present(current_version)
                if len(self._items) >= n:
                    return self._take(n, current_version)
                if self._closed:
                    raise EndOfStream(f"channel {self.name!r} closed with {len(self._items)} fresh item(s) < {n}")
                self._waiting_get += 1
                try:
                    await self._changed.wait()
                finally:
                    self._waiting_get -= 1

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """No more puts. Idempotent; wakes every waiter. Queued items stay readable."""
        if not self._closed:
            self._closed = True
            self._changed.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._items)

    def statistics(self) -> ChannelStatistics:
        versions = self._versions
        consumed = self._consumed
        return ChannelStatistics(
            produced=self._produced,
            consumed=consumed,
            dropped_stale=self._dropped,
            staleness_limit=self._limit,
            size=len(self._items),
            capacity=self.capacity,
            utilization=len(self._items) / self.capacity,
            sample_age_mean=self._last_ages[0],
            sample_age_max=self._last_ages[1],
            staleness_max=self._age_max if math.isfinite(self._age_max) else math.nan,
            version_diversity=len(set(versions)),
            oldest_version=min(versions) if versions else -1,
            newest_version=max(versions) if versions else -1,
            tasks_waiting_put=self._waiting_put,
            tasks_waiting_get=self._waiting_get,
            closed=self._closed,
        )

    def snapshot(self) -> ChannelSnapshot[T]:
        """Everything needed to rebuild this channel after a restart (items are not copied)."""
        return ChannelSnapshot(
            items=list(self._items),
            produced=self._produced,
            consumed=self._consumed,
            dropped_stale=self._dropped,
            consumer_version=self._consumer_version,
            age_max=self._age_max,
            sample_age_mean=self._last_ages[0],
            sample_age_max=self._last_ages[1],
        )

    def restore(self, snap: ChannelSnapshot[T]) -> None:
        """Load a snapshot into this fresh, empty channel."""
        if self._items or self._produced:
            raise RuntimeError(f"channel {self.name!r}: restore() needs a fresh channel")
        if len(snap.items) > self.capacity:
            raise ValueError(
                f"channel {self.name!r}: the snapshot holds {len(snap.items)} items but capacity is "
                f"{self.capacity}; raise async_training.max_queue_size to at least {len(snap.items)}"
            )
        self._items = deque((item, int(v)) for item, v in snap.items)
        self._versions = Counter(v for _, v in self._items)
        self._produced = snap.produced
        self._consumed = snap.consumed
        self._dropped = snap.dropped_stale
        self._consumer_version = snap.consumer_version
        self._fresh_for = -1
        self._age_max = snap.age_max
        self._last_ages = (snap.sample_age_mean, snap.sample_age_max)
