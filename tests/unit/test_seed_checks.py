"""The seed test guide's three feature checks, written against asyncpolicy's API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from asyncpolicy.actors.synchronizer import ParameterSynchronizer
from asyncpolicy.channels import VersionedChannel
from asyncpolicy.config import Config
from asyncpolicy.engines.simulated import SimulatedTransport

pytestmark = pytest.mark.anyio


async def test_rollouter_pause_and_resume_return_true(sim_config: Callable[..., Config], rollouter_for: Callable[..., Any]) -> None:
    """Seed: `assert pause_rollout() == True; assert resume_rollout() == True` on a running rollouter."""
    rollouter, engine, _ = rollouter_for(sim_config())
    await engine.start()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(rollouter.run)
            assert await rollouter.pause() is True
            assert await rollouter.resume() is True
            tg.cancel_scope.cancel()


def test_stale_get_returns_none() -> None:
    """Seed: max_staleness=3, put at version 1, get at version 5 → None (too stale: rejected)."""
    channel: VersionedChannel[str] = VersionedChannel(100, max_staleness=3)
    channel.put_nowait("sample", 1)
    assert channel.get_nowait(current_version=5) is None
    stats = channel.statistics()
    assert (stats.dropped_stale, stats.consumed, stats.size) == (1, 0, 0)


async def test_sync_weights_returns_true(sim_config: Callable[..., Config], rollouter_for: Callable[..., Any]) -> None:
    """Seed: `assert sync.sync_weights() == True`, and the rollout then serves that version."""
    cfg = sim_config()
    rollouter, engine, _ = rollouter_for(cfg)
    transport = SimulatedTransport(engine, cfg.trainer.simulated)
    sync = ParameterSynchronizer(cfg.async_training, rollouter, transport)
    await engine.start()
    with anyio.fail_after(5):
        assert await sync.sync_weights(1) is True
    assert engine.version == rollouter.version == 1
    assert not rollouter.paused
