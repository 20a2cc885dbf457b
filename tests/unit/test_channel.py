"""VersionedChannel, one promise per test (the property suites check them in combination)."""

from __future__ import annotations

import math

import anyio
import pytest

from asyncpolicy.channels import ChannelClosed, EndOfStream, VersionedChannel, WouldBlock
from asyncpolicy.errors import AsyncPolicyError

pytestmark = pytest.mark.anyio


def chan(capacity: int = 4, max_staleness: int = 1, **kw: object) -> VersionedChannel[str]:
    return VersionedChannel(capacity, max_staleness, **kw)  # type: ignore[arg-type]


# -- construction -------------------------------------------------------------------------------


def test_capacity_below_one_is_refused() -> None:
    """A channel that could hold nothing would deadlock every producer."""
    with pytest.raises(ValueError, match=r"^channel 'samples': capacity must be >= 1, got 0$"):
        chan(capacity=0)


def test_negative_staleness_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^channel 'samples': max_staleness must be >= 0, got -1$"):
        chan(max_staleness=-1)


# -- backpressure -------------------------------------------------------------------------------


def test_put_nowait_on_full_channel_raises_would_block_and_keeps_contents() -> None:
    """Full means backpressure, never a silent drop."""
    ch = chan(capacity=1)
    ch.put_nowait("a", 0)
    with pytest.raises(WouldBlock):
        ch.put_nowait("b", 0)
    assert ch.statistics().produced == 1 and ch.get_nowait(0) == "a"


async def test_put_waits_while_full_then_completes_when_space_frees() -> None:
    ch = chan(capacity=1)
    ch.put_nowait("a", 0)
    done = anyio.Event()

    async def producer() -> None:
        await ch.put("b", 0)
        done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await anyio.wait_all_tasks_blocked()
            assert not done.is_set() and ch.statistics().tasks_waiting_put == 1
            assert ch.get_nowait(0) == "a"
            await done.wait()
    assert ch.get_nowait(0) == "b"


# -- staleness ----------------------------------------------------------------------------------


def test_get_nowait_drops_stale_items_and_hands_out_the_oldest_fresh_one() -> None:
    dropped: list[tuple[str, int]] = []
    ch = chan(max_staleness=1, on_drop=lambda item, v: dropped.append((item, v)))
    ch.put_nowait("v0", 0)
    ch.put_nowait("v1", 1)
    ch.put_nowait("v2", 2)
    assert ch.get_nowait(current_version=2) == "v1"
    assert dropped == [("v0", 0)]
    stats = ch.statistics()
    assert (stats.produced, stats.consumed, stats.dropped_stale, stats.size) == (3, 1, 1, 1)


def test_item_exactly_at_the_bound_is_handed_out() -> None:
    """Age == max_staleness is allowed; only age > max_staleness is stale."""
    ch = chan(max_staleness=2)
    ch.put_nowait("x", 3)
    assert ch.get_nowait(current_version=5) == "x"


def test_put_of_an_already_stale_item_counts_it_as_made_and_dropped() -> None:
    """Once a consumer presented version 5, a version-1 item (bound 3) is dropped on put: conserved."""
    dropped: list[tuple[str, int]] = []
    ch = chan(max_staleness=3, on_drop=lambda item, v: dropped.append((item, v)))
    assert ch.get_nowait(5) is None
    ch.put_nowait("old", 1)
    stats = ch.statistics()
    assert dropped == [("old", 1)]
    assert (stats.produced, stats.dropped_stale, stats.size) == (1, 1, 0)


async def test_get_batch_never_returns_items_older_than_the_bound() -> None:
    ch = chan(capacity=4, max_staleness=0)
    ch.put_nowait("v0", 0)
    ch.put_nowait("v1a", 1)
    ch.put_nowait("v1b", 1)
    with anyio.fail_after(5):
        assert await ch.get_batch(2, current_version=1) == ["v1a", "v1b"]
    assert ch.statistics().dropped_stale == 1


# -- batches and timeouts ---------------------------------------------------------------------


async def test_get_batch_waits_for_n_items_and_takes_them_at_once_oldest_first() -> None:
    ch = chan(capacity=4)
    got: list[str] = []

    async def consumer() -> None:
        got.extend(await ch.get_batch(3, 0))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            for item in ("a", "b"):
                ch.put_nowait(item, 0)
                await anyio.wait_all_tasks_blocked()
            assert got == [] and len(ch) == 2
            ch.put_nowait("c", 0)
    assert got == ["a", "b", "c"] and len(ch) == 0


async def test_get_batch_timeout_raises_and_takes_nothing() -> None:
    ch = chan(capacity=4)
    ch.put_nowait("a", 0)
    with pytest.raises(TimeoutError):
        await ch.get_batch(2, 0, timeout=0.01)
    assert len(ch) == 1 and ch.statistics().consumed == 0 and ch.statistics().tasks_waiting_get == 0


async def test_get_batch_larger_than_capacity_is_refused() -> None:
    """A batch the channel can never hold would wait forever: refused with the numbers."""
    with pytest.raises(ValueError, match=r"^channel 'samples': batch of 5 cannot be served by capacity 4$"):
        await chan(capacity=4).get_batch(5, 0)


# -- close --------------------------------------------------------------------------------------


def test_put_after_close_raises_channel_closed() -> None:
    ch = chan()
    ch.close()
    ch.close()  # idempotent
    with pytest.raises(ChannelClosed, match=r"^channel 'samples' is closed$"):
        ch.put_nowait("x", 0)


async def test_close_wakes_a_waiting_putter_with_channel_closed() -> None:
    ch = chan(capacity=1)
    ch.put_nowait("a", 0)
    outcome: list[str] = []

    async def producer() -> None:
        try:
            await ch.put("b", 0)
        except ChannelClosed:
            outcome.append("closed")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            await anyio.wait_all_tasks_blocked()
            ch.close()
    assert outcome == ["closed"] and ch.statistics().produced == 1


async def test_close_wakes_a_waiting_getter_with_end_of_stream() -> None:
    ch = chan()
    outcome: list[str] = []

    async def consumer() -> None:
        try:
            await ch.get(0)
        except EndOfStream:
            outcome.append("eos")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(consumer)
            await anyio.wait_all_tasks_blocked()
            assert ch.statistics().tasks_waiting_get == 3
            ch.close()
    assert outcome == ["eos"] * 3


async def test_queued_items_stay_readable_after_close_then_end_of_stream() -> None:
    ch = chan()
    ch.put_nowait("a", 0)
    ch.close()
    with anyio.fail_after(5):
        assert await ch.get(0) == "a"
        with pytest.raises(EndOfStream):
            await ch.get(0)


async def test_closed_channel_with_fewer_than_a_batch_raises_and_keeps_them() -> None:
    ch = chan(capacity=4)
    ch.put_nowait("a", 0)
    ch.close()
    with pytest.raises(EndOfStream, match=r"^channel 'samples' closed with 1 fresh item\(s\) < 2$"):
        await ch.get_batch(2, 0)
    assert len(ch) == 1


def test_end_of_stream_cannot_be_mistaken_for_a_failure() -> None:
    """A clean finish is neither the project's error type nor the put-side closed error."""
    assert not issubclass(EndOfStream, (AsyncPolicyError, ChannelClosed, TimeoutError))
    assert not issubclass(ChannelClosed, EndOfStream)


# -- cancellation -------------------------------------------------------------------------------


@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel-then-put", "put-then-cancel"])
async def test_cancelling_a_get_loses_no_item_even_when_the_item_arrives_at_the_same_moment(cancel_first: bool) -> None:
    """Wake-up and cancellation race: the item is either returned to the getter or still queued."""
    ch = chan()
    returned: list[str] = []

    async def getter() -> None:
        returned.append(await ch.get(0))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(getter)
            await anyio.wait_all_tasks_blocked()
            if cancel_first:
                tg.cancel_scope.cancel()
                ch.put_nowait("a", 0)
            else:
                ch.put_nowait("a", 0)
                tg.cancel_scope.cancel()
    queued = [item for item, _ in ch.snapshot().items]
    assert sorted(returned + queued) == ["a"]
    assert ch.statistics().consumed == len(returned) and ch.statistics().tasks_waiting_get == 0
    if cancel_first:
        assert queued == ["a"]


async def test_cancelling_a_get_batch_takes_nothing_of_a_partial_batch() -> None:
    ch = chan(capacity=4)
    ch.put_nowait("a", 0)
    with anyio.move_on_after(0.01):
        await ch.get_batch(2, 0)
    assert (len(ch), ch.statistics().consumed) == (1, 0)


@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel-then-space", "space-then-cancel"])
async def test_cancelling_a_put_adds_nothing_unless_it_returned(cancel_first: bool) -> None:
    """A cancelled put leaves no item behind; a put that returned has queued its item exactly once."""
    ch = chan(capacity=1)
    ch.put_nowait("a", 0)
    returned: list[str] = []

    async def putter() -> None:
        await ch.put("b", 0)
        returned.append("b")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(putter)
            await anyio.wait_all_tasks_blocked()
            if cancel_first:
                tg.cancel_scope.cancel()
                assert ch.get_nowait(0) == "a"
            else:
                assert ch.get_nowait(0) == "a"
                tg.cancel_scope.cancel()
    queued = [item for item, _ in ch.snapshot().items]
    assert queued == returned
    assert (ch.statistics().produced, ch.statistics().tasks_waiting_put) == (1 + len(returned), 0)
    if cancel_first:
        assert queued == []


async def test_an_already_cancelled_get_does_not_take_an_available_item() -> None:
    """Cancellation is checked before taking: a cancelled scope never receives an item."""
    ch = chan()
    ch.put_nowait("a", 0)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await ch.get(0)
    assert len(ch) == 1


# -- statistics, snapshot, restore --------------------------------------------------------------


def test_statistics_before_any_consume_report_nan_ages() -> None:
    stats = chan().statistics()
    assert math.isnan(stats.sample_age_mean) and math.isnan(stats.sample_age_max) and math.isnan(stats.staleness_max)
    assert (stats.oldest_version, stats.newest_version, stats.version_diversity) == (-1, -1, 0)


def test_statistics_ages_and_versions() -> None:
    ch = chan(capacity=4, max_staleness=3)
    for item, v in (("a", 1), ("b", 2), ("c", 2), ("d", 3)):
        ch.put_nowait(item, v)
    assert ch.get_nowait(3) == "a"  # age 2
    assert ch.get_nowait(3) == "b"  # age 1
    stats = ch.statistics()
    assert (stats.sample_age_mean, stats.sample_age_max, stats.staleness_max) == (1, 1, 2)  # the latest take; the run
    assert (stats.size, stats.utilization, stats.version_diversity) == (2, 0.5, 2)
    assert (stats.oldest_version, stats.newest_version) == (2, 3)


def test_statistics_is_a_frozen_snapshot() -> None:
    ch = chan()
    stats = ch.statistics()
    ch.put_nowait("a", 0)
    assert stats.size == 0
    with pytest.raises(AttributeError):
        stats.size = 3  # type: ignore[misc]


def test_snapshot_restore_reproduces_contents_and_counters() -> None:
    ch = chan(capacity=4, max_staleness=1)
    for item, v in (("a", 0), ("b", 1), ("c", 2)):
        ch.put_nowait(item, v)
    assert ch.get_nowait(2) == "b"  # drops "a"
    copy = chan(capacity=4, max_staleness=1)
    copy.restore(ch.snapshot())
    assert copy.statistics() == ch.statistics()
    assert copy.get_nowait(2) == ch.get_nowait(2) == "c"


def test_restore_into_a_used_channel_is_refused() -> None:
    ch = chan()
    ch.put_nowait("a", 0)
    with pytest.raises(RuntimeError, match=r"^channel 'samples': restore\(\) needs a fresh channel$"):
        ch.restore(chan().snapshot())


def test_restore_of_more_items_than_capacity_names_the_key_to_raise() -> None:
    big = chan(capacity=3)
    for item in "abc":
        big.put_nowait(item, 0)
    with pytest.raises(ValueError, match=r"raise async_training.max_queue_size to at least 3$"):
        chan(capacity=2).restore(big.snapshot())
