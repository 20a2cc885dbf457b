"""loop_gc: long-lived objects frozen while a Supervisor runs, handed back after; the run's thresholds (no
automatic full collection unless the heap grew) set and the host's given back; a host's own gc policy kept."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from asyncpolicy import loop_gc
from asyncpolicy.config import Config
from asyncpolicy.supervisor import Supervisor

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    gc.unfreeze()
    gc.enable()
    yield
    gc.unfreeze()
    gc.enable()
    gc.set_threshold(*thresholds)


async def test_objects_alive_after_start_up_are_frozen_during_the_run_and_released_after(
    sim_config: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = sim_config("trainer.total_training_steps=3", output_dir=tmp_path)
    gc.set_threshold(500, 7, 9)  # the host's own
    during: list[tuple[int, bool, tuple[int, int, int]]] = []
    async with Supervisor.open(cfg) as sup:
        during.append((gc.get_freeze_count(), gc.isenabled(), gc.get_threshold()))
        await sup.wait()
    assert during[0][0] > 0 and during[0][1], "start-up ended without a freeze, or left collection off"
    assert during[0][2] == (500, loop_gc.YOUNG_EVERY, loop_gc.NEVER)
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    assert gc.get_threshold() == (500, 7, 9) and loop_gc._after_collection not in gc.callbacks


async def test_a_failed_start_up_freezes_nothing_and_turns_collection_back_on(
    sim_config: Callable[..., Config], tmp_path: Path
) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # an earlier run: start-up refuses it
    cfg = sim_config(output_dir=tmp_path)
    with pytest.raises(Exception, match="already holds a run"):
        async with Supervisor.open(cfg):
            pass
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_a_host_that_froze_or_disabled_collection_itself_is_left_alone() -> None:
    gc.disable()
    gc.freeze()
    with loop_gc.quiet_start_up():
        assert not gc.isenabled()
    loop_gc.run_ended()
    assert not gc.isenabled()
    assert gc.get_freeze_count() > 0  # the host's freeze was not undone


def test_a_host_without_automatic_collection_keeps_its_thresholds() -> None:
    gc.disable()
    thresholds = gc.get_threshold()
    with loop_gc.quiet_start_up():
        pass
    assert gc.get_threshold() == thresholds and loop_gc._after_collection not in gc.callbacks
    loop_gc.run_ended()


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


def test_a_run_whose_heap_does_not_grow_pays_no_full_collection() -> None:
    with loop_gc.quiet_start_up():
        pass
    try:
        before = _full_collections()
        # long-lived containers promoted through generation 1 (what triggers full collections by
        # default: Python's rule would run several here), far fewer blocks than the heap already holds
        kept = [[i] for i in range(min(300_000, sys.getallocatedblocks() // 4))]
        assert _full_collections() == before
        assert gc.get_stats()[1]["collections"] > 0 and len(kept) > 0
    finally:
        loop_gc.run_ended()


def test_a_heap_grown_past_the_factor_gets_a_full_collection_then_the_baseline_moves() -> None:
    with loop_gc.quiet_start_up():
        pass
    try:
        before = _full_collections()
        start_blocks = sys.getallocatedblocks()
        kept: list[list[int]] = []
        while _full_collections() == before and len(kept) < 20_000_000:
            kept.append([len(kept)])  # grows the heap: blocks in use pass GROWTH x the baseline
        assert _full_collections() > before, "the heap grew past GROWTH times without a full collection"
        assert sys.getallocatedblocks() >= loop_gc.GROWTH * start_blocks * 0.9
        assert gc.get_threshold()[2] == loop_gc.NEVER  # after the full one: no automatic full collection again
        assert loop_gc._blocks_after_full >= start_blocks
    finally:
        loop_gc.run_ended()


async def test_two_supervisors_at_once_unfreeze_only_when_the_last_ends(
    sim_config: Callable[..., Config], tmp_path: Path
) -> None:
    first = sim_config("trainer.total_training_steps=2", output_dir=tmp_path / "a")
    second = sim_config("trainer.total_training_steps=2", output_dir=tmp_path / "b")
    async with Supervisor.open(first) as a:
        async with Supervisor.open(second) as b:
            await b.wait()
        assert gc.get_freeze_count() > 0  # `a` still runs
        await a.wait()
    assert gc.get_freeze_count() == 0
