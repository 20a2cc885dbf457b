"""VersionedChannel as a state machine: any interleaving of puts, gets, version bumps, cancels and close.

The channel lives in an event loop on a blocking portal's thread, so blocking puts and gets can
stay parked across rules while other rules run. Timeouts are 0 (expires at the first wait) or far
away, so every example replays exactly; short real timeouts are exercised by the concurrent
property and the unit tests. After every rule the loop is allowed to settle
(`wait_all_tasks_blocked`, under a deadline: a task that never blocks fails the test), and then
every invariant of channels/versioned.py is checked against an independent model of the queue:

* nothing handed out is older than max_staleness for the version its getter presented;
* the channel never holds more than its capacity;
* conservation, by item identity: every accepted item is handed out once, dropped once, or queued;
* only stale items are dropped, and the queue keeps put order (FIFO among fresh items);
* liveness: no waiter stays parked while it could proceed (that would be a deadlock);
* close wakes every waiter: putters get ChannelClosed, getters their items or EndOfStream;
* a cancelled get/put takes or adds nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import anyio
from anyio.from_thread import start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from asyncpolicy.channels import ChannelClosed, EndOfStream, VersionedChannel, WouldBlock

SETTLE_DEADLINE_S = 5.0


@dataclass
class Waiter:
    kind: str  # "get" or "put"
    n: int = 1  # batch size of a get
    version: int = 0  # presented (get) or carried (put)
    item: int = -1  # the put's item
    scope: anyio.CancelScope | None = None  # made in the loop, by the waiter's task
    outcome: str = "pending"  # pending, items, put, eos, closed, timeout, cancelled, or "error: ..."


class ChannelMachine(RuleBasedStateMachine):
    backend = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = start_blocking_portal(self.backend)
        self.portal = self._portal_cm.__enter__()
        self.ch: VersionedChannel[int] | None = None
        self.version = 0
        self.max_presented = -1
        self.ids = itertools.count()
        self.model: list[tuple[int, int]] = []  # (item, version) queued, in put order
        self.accepted: set[int] = set()
        self.handed: list[int] = []
        self.dropped: set[int] = set()
        self.closed = False
        self.waiters: list[Waiter] = []
        self.violations: list[str] = []

    # -- helpers run in the loop thread ---------------------------------------------------------

    def _on_drop(self, item: int, version: int) -> None:
        if not self.max_presented - version > self.ch.max_staleness:  # type: ignore[union-attr]
            self.violations.append(
                f"fresh item {item} (version {version}) dropped; newest consumer version {self.max_presented}"
            )
        if item in self.dropped:
            self.violations.append(f"item {item} dropped twice")
        self.dropped.add(item)
        self.model = [(i, v) for i, v in self.model if i != item]

    def _accepted(self, item: int, version: int) -> None:
        self.accepted.add(item)
        if item not in self.dropped:  # dropped on put: already counted by the callback
            self.model.append((item, version))

    def _handed_out(self, items: list[int], version: int) -> None:
        head = [i for i, _ in self.model[: len(items)]]
        if items != head:
            self.violations.append(f"get at version {version} returned {items}, expected the oldest fresh {head}")
        versions = dict(self.model)
        for item in items:
            if item in versions and version - versions[item] > self.ch.max_staleness:  # type: ignore[union-attr]
                self.violations.append(
                    f"item {item} of version {versions[item]} handed out at version {version}: age "
                    f"{version - versions[item]} > max_staleness {self.ch.max_staleness}"  # type: ignore[union-attr]
                )
        self.handed.extend(items)
        taken = set(items)
        self.model = [(i, v) for i, v in self.model if i not in taken]

    async def _get(self, w: Waiter, timeout: float | None) -> None:
        w.scope = anyio.CancelScope()
        try:
            with w.scope:
                items = await self.ch.get_batch(w.n, w.version, timeout=timeout)  # type: ignore[union-attr]
                self._handed_out(items, w.version)
                w.outcome = "items"
                return
        except EndOfStream:
            w.outcome = "eos"
            return
        except TimeoutError:
            w.outcome = "timeout"
            return
        except Exception as e:  # anything else is a failure the invariant reports
            w.outcome = f"error: {e!r}"
            return
        w.outcome = "cancelled"

    async def _put(self, w: Waiter) -> None:
        w.scope = anyio.CancelScope()
        try:
            with w.scope:
                await self.ch.put(w.item, w.version)  # type: ignore[union-attr]
                self._accepted(w.item, w.version)
                w.outcome = "put"
                return
        except ChannelClosed:
            w.outcome = "closed"
            return
        except Exception as e:
            w.outcome = f"error: {e!r}"
            return
        w.outcome = "cancelled"

    async def _settle(self) -> None:
        with anyio.fail_after(SETTLE_DEADLINE_S):
            await anyio.wait_all_tasks_blocked()

    def settle(self) -> None:
        self.portal.call(self._settle)

    def pending(self, kind: str) -> list[Waiter]:
        return [w for w in self.waiters if w.kind == kind and w.outcome == "pending"]

    # -- rules ----------------------------------------------------------------------------------

    @initialize(capacity=st.integers(1, 5), max_staleness=st.integers(0, 3))
    def make_channel(self, capacity: int, max_staleness: int) -> None:
        self.ch = VersionedChannel(capacity, max_staleness, on_drop=self._on_drop)

    @rule(lag=st.integers(-2, 4))
    def put_nowait(self, lag: int) -> None:
        item, version = next(self.ids), max(0, self.version - lag)

        def put() -> str:
            try:
                self.ch.put_nowait(item, version)  # type: ignore[union-attr]
            except WouldBlock:
                return "would_block"
            except ChannelClosed:
                return "closed"
            self._accepted(item, version)
            return "put"

        full = len(self.model) >= self.ch.capacity  # type: ignore[union-attr]
        outcome = self.portal.call(put)
        expected = "closed" if self.closed else "would_block" if full else "put"
        assert outcome == expected, f"put_nowait: {outcome}, expected {expected}"
        self.settle()

    @rule(lag=st.integers(-2, 4))
    def start_put(self, lag: int) -> None:
        w = Waiter(kind="put", item=next(self.ids), version=max(0, self.version - lag))
        self.waiters.append(w)
        self.portal.start_task_soon(self._put, w)
        self.settle()

    @rule(lag=st.integers(0, 2))
    def get_nowait(self, lag: int) -> None:
        version = max(0, self.version - lag)
        fresh = [i for i, v in self.model if version - v <= self.ch.max_staleness]  # type: ignore[union-attr]
        expected = fresh[0] if fresh else None

        def get() -> int | None:
            self.max_presented = max(self.max_presented, version)
            item = self.ch.get_nowait(version)  # type: ignore[union-attr]
            if item is not None:
                self._handed_out([item], version)
            return item

        assert self.portal.call(get) == expected
        self.settle()

    @rule(data=st.data(), lag=st.integers(0, 2), timeout=st.sampled_from([None, 0.0, 60.0]))
    def start_get(self, data: st.DataObject, lag: int, timeout: float | None) -> None:
        n = data.draw(st.integers(1, self.ch.capacity), label="n")  # type: ignore[union-attr]
        w = Waiter(kind="get", n=n, version=max(0, self.version - lag))
        self.max_presented = max(self.max_presented, w.version)
        self.waiters.append(w)
        self.portal.start_task_soon(self._get, w, timeout)
        self.settle()

    @rule(k=st.integers(1, 2))
    def bump_version(self, k: int) -> None:
        self.version += k

    @precondition(lambda self: any(w.outcome == "pending" for w in self.waiters))
    @rule(data=st.data())
    def cancel_a_waiter(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from([w for w in self.waiters if w.outcome == "pending"]), label="waiter")
        self.portal.call(w.scope.cancel)  # type: ignore[union-attr]
        self.settle()
        assert w.outcome in ("cancelled", "items", "put", "eos", "closed", "timeout"), w.outcome

    @rule()
    def close(self) -> None:
        self.portal.call(self.ch.close)  # type: ignore[union-attr]
        self.closed = True
        self.settle()

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def no_violation_recorded(self) -> None:
        assert not self.violations, self.violations
        errors = [w.outcome for w in self.waiters if w.outcome.startswith("error")]
        assert not errors, errors

    @invariant()
    def within_capacity_and_conserved(self) -> None:
        if self.ch is None:
            return
        stats = self.portal.call(self.ch.statistics)
        queued = [item for item, _ in self.portal.call(self.ch.snapshot).items]
        assert stats.size <= stats.capacity
        assert stats.produced == stats.consumed + stats.dropped_stale + stats.size
        assert (stats.produced, stats.consumed, stats.dropped_stale) == (
            len(self.accepted),
            len(self.handed),
            len(self.dropped),
        )
        assert queued == [i for i, _ in self.model], "queue contents or order differ from the model"
        assert len(set(self.handed)) == len(self.handed), "an item was handed out twice"
        assert self.accepted == set(self.handed) | self.dropped | set(queued)

    @invariant()
    def no_waiter_parked_that_could_proceed(self) -> None:
        if self.ch is None:
            return
        stats = self.portal.call(self.ch.statistics)
        getters, putters = self.pending("get"), self.pending("put")
        if self.closed:
            assert not getters and not putters, "close() left waiters parked"
        for w in getters:
            fresh = sum(1 for _, v in self.model if w.version - v <= self.ch.max_staleness)
            assert fresh < w.n, f"getter for {w.n} at version {w.version} parked with {fresh} fresh items"
        if putters:
            assert len(self.model) == self.ch.capacity, f"putter parked with {len(self.model)} < capacity queued"
        assert (stats.tasks_waiting_get, stats.tasks_waiting_put) == (len(getters), len(putters))

    def teardown(self) -> None:
        try:
            if self.ch is not None:
                self.portal.call(self.ch.close)
                self.closed = True
                self.settle()
                self.no_waiter_parked_that_could_proceed()
                outcomes = {w.outcome for w in self.waiters}
                assert outcomes <= {"items", "put", "eos", "closed", "timeout", "cancelled"}, outcomes
        finally:
            self._portal_cm.__exit__(None, None, None)


class TrioChannelMachine(ChannelMachine):
    backend = "trio"


_settings = settings(max_examples=3 * settings().max_examples, stateful_step_count=30)
TestChannelStateMachineAsyncio = ChannelMachine.TestCase
TestChannelStateMachineAsyncio.settings = _settings
TestChannelStateMachineTrio = TrioChannelMachine.TestCase
TestChannelStateMachineTrio.settings = _settings

