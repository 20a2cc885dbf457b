"""`async_training.in_flight_updates`: a weight sync pauses the engine in place (vLLM's mode "keep")
instead of aborting; generations run on across it and their later tokens carry the new version."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest

from asyncpolicy.config import SimulatedRolloutConfig, load_config
from asyncpolicy.engines.protocols import GenerationRequest
from asyncpolicy.engines.simulated import SimulatedGenerationEngine
from asyncpolicy.errors import ConfigError
from asyncpolicy.samples import Sample
from asyncpolicy.supervisor import Supervisor

pytestmark = pytest.mark.anyio

SIM = ["rollout.engine=simulated", "trainer.engine=simulated", "data.train_batch_size=4", "rollout.n=2",
       "trainer.simulated.sync_latency_s=0.002", "async_training.in_flight_updates=true"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_config_refuses_in_flight_updates_where_they_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="async_training.in_flight_updates") as e:
        load_config(None, ["async_training.in_flight_updates=true"])  # the default hf engine
    assert e.value.key == "async_training.in_flight_updates"
    with pytest.raises(ConfigError, match="partial_rollout"):
        load_config(None, [*SIM, "async_training.partial_rollout=false"])
    assert load_config(None, SIM).async_training.in_flight_updates


async def test_a_paused_engine_keeps_its_generation_and_labels_later_tokens_with_the_new_version() -> None:
    """The simulated engine's in-place pause: the clock stops, nothing is aborted, the version set while
    paused labels only the tokens generated after it (one finished exactly at the change keeps the old)."""
    engine = SimulatedGenerationEngine(SimulatedRolloutConfig(mean_latency_s=0.4, latency_sigma=0.0), random.Random(1))
    await engine.start()
    request = GenerationRequest(request_id="r", prompt_tokens=[1, 2], max_tokens=64)
    results = []
    async with anyio.create_task_group() as tg:
        async def gen() -> None:
            results.append(await engine.generate(request))

        tg.start_soon(gen)
        await anyio.sleep(0.05)
        await engine.pause()
        await anyio.sleep(0.3)  # longer than the rest of the generation: it must not finish while paused
        assert not results
        engine.set_version(1)
        await engine.resume()
    (r,) = results
    assert r.finish_reason in ("stop", "length")
    versions = r.token_versions
    assert versions == sorted(versions) and set(versions) <= {0, 1}
    assert len(versions) == len(r.response_tokens) == len(r.behaviour_logprobs)
    if len(versions) > 8:  # tokens both sides of the change (a short draw may fall on one side)
        assert versions[0] == 0 and versions[-1] == 1


@pytest.mark.parametrize("staleness", [0, 1])
@pytest.mark.parametrize("latency", [0.0005, 0.05])
async def test_runs_with_in_flight_updates_finish_abort_nothing_and_keep_the_bound(tmp_path: Path, staleness: int, latency: float) -> None:
    """Fast generations (all done before each sync: admission must be woken by the version alone) and
    slow ones (running across syncs when the bound lets them start early): the run finishes, no generation is interrupted, samples spanning
    versions appear when generations outlive a sync, the bound holds and every sample is accounted for."""
    cfg = load_config(None, [
        *SIM, f"output_dir={tmp_path}", f"async_training.staleness_threshold={staleness}", "trainer.total_training_steps=8",
        f"rollout.simulated.mean_latency_s={latency}", "trainer.simulated.step_latency_s=0.02", "seed=3",
    ])
    trained: list[tuple[Sample, int]] = []
    async with Supervisor.open(cfg) as sup:
        engine_step = sup.trainer.engine.train_step

        async def watched(batch: list[Sample], version: int) -> dict[str, float]:
            trained.extend((s, version) for s in batch)
            return await engine_step(batch, version)

        sup.trainer.engine.train_step = watched  # type: ignore[method-assign]
        with anyio.fail_after(60):
            result = await sup.wait()
        stats = sup.rollouter.statistics()
    assert result.finished and result.steps == 8
    assert stats.counters.interrupted == 0  # nothing aborted at a sync
    assert result.made == result.trained + result.dropped_stale + result.queued
    assert all(version - s.min_version <= staleness for s, version in trained)
    for s, _ in trained:
        for t in s.trajectories:
            assert t.token_versions == sorted(t.token_versions)
    if latency >= 0.05 and staleness > 0:  # on-policy admits a batch per version: none can outlive a sync
        assert any(t.min_version != t.max_version for s, _ in trained for t in s.trajectories)
