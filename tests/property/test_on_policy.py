"""On-policy equivalence: staleness_threshold=0 trains exactly what generate-then-train would.

The reference is the plain synchronous loop: step k draws the next train_batch_size prompts from
the prompt source, generates them with policy k-1, trains on them. The asynchronous run, whatever
the completion order (drawn from the Hypothesis-registered RNG), must train on the same prompts
(epoch, index) at every step, and every sample's tokens must all come from policy version k-1.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncpolicy.config import Config
from asyncpolicy.supervisor import Supervisor
from asyncpolicy.tasks.registry import simulated_task


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def generate_then_train_batches(cfg: Config) -> list[list[tuple[int, int]]]:
    """The (epoch, index) pairs a synchronous loop trains at each step, in the trainer's order."""
    source = simulated_task(cfg).train
    batch = cfg.data.train_batch_size
    steps = []
    for _ in range(cfg.trainer.total_training_steps):
        prompts = [source.next() for _ in range(batch)]
        steps.append(sorted((p.epoch, p.index) for p in prompts))
    return steps


@pytest.mark.anyio
@settings(max_examples=2 * settings().max_examples)  # 50 runs of ~0.1-0.3 s
@given(
    batch=st.integers(1, 4),
    n=st.integers(1, 3),
    concurrency=st.integers(1, 6),
    steps=st.integers(1, 6),
    partial=st.booleans(),
    num_prompts=st.integers(1, 7),
    latency=st.sampled_from([0.0, 0.001, 0.003]),
    seed=st.integers(0, 5),
    _seed=st.random_module(),
)
async def test_threshold_zero_trains_the_generate_then_train_batches(
    batch: int,
    n: int,
    concurrency: int,
    steps: int,
    partial: bool,
    num_prompts: int,
    latency: float,
    seed: int,
    _seed: object,
    sim_config: Callable[..., Config],
    engines_for: Callable[..., Any],
    hypothesis_random: random.Random,
) -> None:
    """Same prompts per step as the synchronous loop; every sample made wholly by version step-1."""
    with tempfile.TemporaryDirectory() as out:
        cfg = sim_config(
            "async_training.staleness_threshold=0",
            "async_training.trigger_parameter_sync_step=1",
            f"async_training.partial_rollout={partial}",
            f"async_training.max_queue_size={batch}",
            f"data.train_batch_size={batch}",
            f"rollout.n={n}",
            f"rollout.max_concurrency={concurrency}",
            f"trainer.total_training_steps={steps}",
            f"task.num_prompts={num_prompts}",
            f"rollout.simulated.mean_latency_s={latency}",
            "rollout.simulated.latency_sigma=1.0",
            f"seed={seed}",
            output_dir=out,
        )
        engines, recorder = engines_for(cfg, hypothesis_random)
        with anyio.fail_after(20):
            async with Supervisor.open(cfg, engines=engines) as sup:
                result = await sup.wait()

    expected = generate_then_train_batches(cfg)
    assert [version for version, _ in recorder.steps] == list(range(steps))
    assert [[(e, i) for e, i, *_ in b] for _, b in recorder.steps] == expected
    for version, rows in recorder.steps:
        for _e, _i, min_v, max_v, oldest_token in rows:
            assert min_v == max_v == oldest_token == version, (version, rows)
    assert result.dropped_stale == 0
