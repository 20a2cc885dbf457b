"""Agentic episodes under random turn counts, tool latencies and failures, weight syncs and pauses.

A Supervisor with simulated engines runs episodes of `episode_envs.RandomEnv` (or its plain-function
twin). Whatever Hypothesis draws, every trained episode must:

* keep its lists aligned: tokens, logprobs, versions and loss mask of one length; env tokens have
  logprob 0;
* never decrease its versions along the episode;
* hold exactly the tokens the engine sampled as its model tokens — the simulated tokenizer's
  decode→encode round trip is not the identity, so a re-encoded turn would differ;
* be trained within the staleness bound (measured over model tokens);
and the run must account for every sample: made = trained + dropped + queued (+ in flight, 0 at the end).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from episode_envs import RNG  # type: ignore[import-not-found]  # tests/property, on the path under pytest
from episode_runs import RecordingGeneration, assert_episodes_whole, episode_configs  # type: ignore[import-not-found]
from hypothesis import given, register_random
from hypothesis import strategies as st

from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.engines.simulated import SimulatedGenerationEngine, SimulatedTransport
from asyncpolicy.envs.loading import EpisodeSpec
from asyncpolicy.supervisor import Supervisor

register_random(RNG)
RUN_DEADLINE_S = 30.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


pauses = st.lists(st.tuples(st.sampled_from([0.0, 0.001, 0.003]), st.sampled_from(["pause", "resume"])), max_size=5)


async def drive(sup: Supervisor, script: list[tuple[float, str]]) -> None:
    for delay, action in script:
        await anyio.sleep(delay)
        await (sup.pause() if action == "pause" else sup.resume())
    await sup.resume()


@pytest.mark.anyio
@given(overrides=episode_configs(), script=pauses, _seed=st.random_module())
async def test_episodes_stay_token_exact_aligned_fresh_and_accounted_for(
    overrides: list[str], script: list[tuple[float, str]], _seed: object, sim_config: Callable[..., Config],
    hypothesis_random: random.Random, recording_trainer: Callable[[Config], Any],
) -> None:
    with tempfile.TemporaryDirectory() as out:
        cfg = sim_config(*overrides, output_dir=out)
        generation = RecordingGeneration(SimulatedGenerationEngine(cfg.rollout.simulated, hypothesis_random))
        trainer = recording_trainer(cfg)
        engines: Any = EngineSet(generation=generation, trainer=trainer, transport=SimulatedTransport(generation.inner, cfg.trainer.simulated))
        with anyio.fail_after(RUN_DEADLINE_S):
            sup = await Supervisor.build(cfg, engines=engines)
            async with sup, anyio.create_task_group() as tg:
                tg.start_soon(drive, sup, script)
                result = await sup.wait()
        counters = sup.rollouter.statistics().counters

    spec = sup.task.episodes
    assert isinstance(spec, EpisodeSpec)
    for (version, _), batch in zip(trainer.steps, trainer.batches, strict=True):
        assert_episodes_whole(batch, version, cfg, spec, lambda _: generation.sampled)
    assert result.finished
    assert result.made == result.trained + result.dropped_stale + result.queued
    assert counters.episodes >= result.trained * cfg.rollout.n
    trained_errors = sum(bool(t.reward_error) for b in trainer.batches for s in b for t in s.trajectories)
    assert counters.env_errors >= trained_errors  # every failed episode trained on was counted
