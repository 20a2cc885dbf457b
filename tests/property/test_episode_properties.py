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
from hypothesis import given, register_random
from hypothesis import strategies as st

from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import EngineSet, GenerationRequest, GenerationResult
from asyncpolicy.engines.simulated import SimulatedGenerationEngine, SimulatedTransport
from asyncpolicy.samples import Sample
from asyncpolicy.supervisor import Supervisor

register_random(RNG)
RUN_DEADLINE_S = 30.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


class RecordingGeneration:
    """The simulated engine, recording each request's final tokens (the ones an episode must keep)."""

    def __init__(self, inner: SimulatedGenerationEngine) -> None:
        self.inner = inner
        self.sampled: dict[str, list[int]] = {}

    @property
    def version(self) -> int:
        return self.inner.version

    def set_version(self, version: int) -> None:
        self.inner.set_version(version)

    async def start(self) -> None:
        await self.inner.start()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        result = await self.inner.generate(request)
        if result.finish_reason != "abort":
            self.sampled[request.request_id] = list(result.response_tokens)
        return result

    async def abort_all(self) -> None:
        await self.inner.abort_all()

    async def aclose(self) -> None:
        await self.inner.aclose()


@st.composite
def episode_configs(draw: st.DrawFn) -> list[str]:
    threshold = draw(st.integers(0, 2))
    batch = draw(st.integers(1, 3))
    return [
        f"task.env=episode_envs:{draw(st.sampled_from(['RandomEnv', 'RandomEnv', 'PlainEnv']))}",
        f"task.max_turns={draw(st.integers(1, 5))}",
        f"task.max_turn_tokens={draw(st.integers(0, 4))}",
        f"async_training.staleness_threshold={threshold}",
        f"data.train_batch_size={batch}",
        f"async_training.max_queue_size={draw(st.integers(batch, 3 * batch))}",
        f"rollout.n={draw(st.integers(1, 3))}",
        f"async_training.trigger_parameter_sync_step={draw(st.integers(1, threshold + 1))}",
        f"async_training.partial_rollout={draw(st.booleans())}",
        f"trainer.total_training_steps={draw(st.integers(1, 5))}",
        f"rollout.simulated.mean_latency_s={draw(st.sampled_from([0.0, 0.0005, 0.002]))}",
        f"data.max_response_length={draw(st.integers(2, 24))}",
        f"trainer.test_freq={draw(st.sampled_from([0, 0, 2]))}",
    ]


pauses = st.lists(st.tuples(st.sampled_from([0.0, 0.001, 0.003]), st.sampled_from(["pause", "resume"])), max_size=5)


async def drive(sup: Supervisor, script: list[tuple[float, str]]) -> None:
    for delay, action in script:
        await anyio.sleep(delay)
        await (sup.pause() if action == "pause" else sup.resume())
    await sup.resume()


def model_tokens(sample: Sample, i: int) -> list[int]:
    t = sample.trajectories[i]
    return [tok for tok, m in zip(t.response_tokens, t.loss_mask, strict=True) if m]


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

    bound = cfg.async_training.staleness_threshold
    spec = sup.task.episodes
    assert spec is not None
    for (version, _), batch in zip(trainer.steps, trainer.batches, strict=True):
        for sample in batch:
            assert version - sample.min_version <= bound
            for i, t in enumerate(sample.trajectories):
                n = len(t.response_tokens)
                assert len(t.behaviour_logprobs) == len(t.token_versions) == len(t.loss_mask) == n
                assert all(lp == 0.0 for lp, m in zip(t.behaviour_logprobs, t.loss_mask, strict=True) if not m)
                assert all(a <= b for a, b in zip(t.token_versions, t.token_versions[1:], strict=False))
                assert 1 <= t.turns <= spec.max_turns and n <= cfg.data.max_response_length
                if not t.reward_error:  # a failed environment may end an episode before its turns are kept
                    request = f"train/{sample.prompt.uid}/{i}"
                    sampled = [tok for k in range(t.turns) for tok in generation.sampled[f"{request}/t{k}"]]
                    assert model_tokens(sample, i) == sampled, "a model turn's tokens changed (re-encoded?)"
    assert result.finished
    assert result.made == result.trained + result.dropped_stale + result.queued
    assert counters.episodes >= result.trained * cfg.rollout.n
    trained_errors = sum(bool(t.reward_error) for b in trainer.batches for s in b for t in s.trajectories)
    assert counters.env_errors >= trained_errors  # every failed episode trained on was counted
