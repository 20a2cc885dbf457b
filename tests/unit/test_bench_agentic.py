"""`bench agentic` plumbing at tiny sizes: episodes of the lognormal tool environment run under both
schedules, every figure the suite reports is measured (never its size: that is the benchmark's)."""

from __future__ import annotations

import math
from pathlib import Path

import anyio
import pytest

from asyncpolicy.bench import agentic
from asyncpolicy.bench.common import BenchContext, Machine
from asyncpolicy.bench.tool_env import TOOL_TURNS, LognormalTools
from asyncpolicy.samples import Prompt

TINY = ["data.train_batch_size=2", "rollout.n=2", "trainer.simulated.step_latency_s=0.01", "rollout.simulated.mean_latency_s=0.002"]


@pytest.mark.parametrize("staleness", [0, 1])
def test_scenario_runs_episodes_and_measures_the_loop(tmp_path: Path, staleness: int) -> None:
    machine = Machine(cores=2, cpu_model="Test CPU", gpu="none", python="3.11", torch="2.x", os="Linux")
    ctx = BenchContext(tmp_path, quick=True, overrides=TINY, machine=machine, command="pytest")
    sc = anyio.run(lambda: agentic._scenario(ctx, staleness, 3))
    assert sc.run.finished and sc.run.steps == 3 and sc.per_step == 4
    assert sc.peak >= sc.per_step  # a whole batch of episodes was live at once
    assert sc.tool_calls >= 3 * sc.per_step * TOOL_TURNS  # every consumed episode made its tool calls
    assert sc.run.sample_age_max <= staleness
    assert sc.episodes_per_s > 0 and math.isfinite(sc.episodes_per_s)
    assert sc.lags and all(lag >= -1e-3 for lag in sc.lags)
    assert (tmp_path / f"agentic_{'sync' if staleness == 0 else 'async_s1'}.log").exists()


def test_tool_env_calls_tools_then_answers() -> None:
    async def main() -> None:
        LognormalTools.reseed(0)
        env = LognormalTools()
        await env.reset(Prompt(index=0, epoch=0, text="x", tokens=[1]))
        assert LognormalTools.live == 1
        steps = [await env.step("call") for _ in range(TOOL_TURNS + 1)]
        assert [s.tool_call for s in steps] == [True] * TOOL_TURNS + [False]
        assert [s.done for s in steps] == [False] * TOOL_TURNS + [True]
        assert LognormalTools.live == 0 and LognormalTools.peak == 1 and LognormalTools.tool_calls == TOOL_TURNS

    anyio.run(main)
