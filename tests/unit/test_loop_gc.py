"""loop_gc: long-lived objects frozen while a Supervisor runs, handed back after; a host's own gc policy kept."""

from __future__ import annotations

import gc
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
    gc.unfreeze()
    gc.enable()
    yield
    gc.unfreeze()
    gc.enable()


async def test_objects_alive_after_start_up_are_frozen_during_the_run_and_released_after(
    sim_config: Callable[..., Config], tmp_path: Path
) -> None:
    cfg = sim_config("trainer.total_training_steps=3", output_dir=tmp_path)
    during: list[tuple[int, bool]] = []
    async with Supervisor.open(cfg) as sup:
        during.append((gc.get_freeze_count(), gc.isenabled()))
        await sup.wait()
    assert during[0][0] > 0 and during[0][1], "start-up ended without a freeze, or left collection off"
    assert gc.get_freeze_count() == 0 and gc.isenabled()


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
