"""Agentic episodes on data-parallel replicas: an episode's turns all run on one replica (its prefix
cache), even when a tool call leaves its group with nothing running between turns; and every
trained episode stays whole (tests/property/episode_runs.py's checks) whatever Hypothesis draws."""

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
from asyncpolicy.engines.generation.replicas import ReplicatedGeneration
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.engines.simulated import SimulatedGenerationEngine, SimulatedTransport
from asyncpolicy.envs.loading import EpisodeSpec
from asyncpolicy.supervisor import Supervisor

register_random(RNG)
RUN_DEADLINE_S = 30.0


def episode_of(request_id: str) -> str:
    """`train/<uid>/<i>/t<k>` → `train/<uid>/<i>`: the episode a turn belongs to."""
    return request_id.rsplit("/t", 1)[0]


@pytest.mark.anyio
@given(overrides=episode_configs(), replicas=st.integers(2, 3), _seed=st.random_module())
async def test_an_episode_stays_on_one_replica_and_whole(
    overrides: list[str], replicas: int, _seed: object, sim_config: Callable[..., Config],
    hypothesis_random: random.Random, recording_trainer: Callable[[Config], Any],
) -> None:
    with tempfile.TemporaryDirectory() as out:
        cfg = sim_config(*overrides, f"rollout.replicas={replicas}", output_dir=out)
        recorders = [RecordingGeneration(SimulatedGenerationEngine(cfg.rollout.simulated, hypothesis_random)) for _ in range(replicas)]
        generation = ReplicatedGeneration.for_config(cfg, recorders)
        trainer = recording_trainer(cfg)
        engines: Any = EngineSet(generation=generation, trainer=trainer, transport=SimulatedTransport(generation, cfg.trainer.simulated))
        with anyio.fail_after(RUN_DEADLINE_S):
            async with Supervisor.open(cfg, engines=engines) as sup:
                result = await sup.wait()

    served: dict[str, set[int]] = {}
    for k, recorder in enumerate(recorders):
        for request_id in recorder.sampled:
            if request_id.startswith("train/"):
                served.setdefault(episode_of(request_id), set()).add(k)
    split = {episode: ks for episode, ks in served.items() if len(ks) > 1}
    assert not split, f"episodes whose turns ran on several replicas (prefix cache lost): {split}"
    assert generation.snapshot().failovers == 0  # no replica died: stickiness is the router's, not a failover's

    spec = sup.task.episodes
    assert isinstance(spec, EpisodeSpec)
    sampled = {rid: tokens for recorder in recorders for rid, tokens in recorder.sampled.items()}
    for (version, _), batch in zip(trainer.steps, trainer.batches, strict=True):
        assert_episodes_whole(batch, version, cfg, spec, lambda _: sampled)
    assert result.finished and result.made == result.trained + result.dropped_stale + result.queued
