"""The Supervisor: lifecycle, failure propagation naming the actor, embedding, accounting."""

from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from asyncpolicy.config import Config, load_config
from asyncpolicy.engines import registry
from asyncpolicy.engines.factory import import_engine_modules
from asyncpolicy.engines.simulated import SimulatedGenerationEngine
from asyncpolicy.errors import ActorFailed, ConfigError, GenerationFailed, RunFailed, SyncFailed
from asyncpolicy.samples import Prompt
from asyncpolicy.supervisor import RunResult, Supervisor
from asyncpolicy.tasks.registry import simulated_task

pytestmark = pytest.mark.anyio

Make = Callable[..., Any]

METRIC_KEYS = {
    "step", "param_version", "reward_mean", "samples_per_s", "steps_per_s", "sample_age_mean", "sample_age_max",
    "staleness_max", "dropped_stale_total", "queue_size", "queue_utilization", "sync_latency_s",
    "trainer_idle_ratio", "rollouter_idle_ratio", "rss_bytes",
}


def rows_of(cfg: Config) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]


async def run(cfg: Config, **kw: Any) -> RunResult:
    with anyio.fail_after(30):
        async with Supervisor.open(cfg, **kw) as sup:
            return await sup.wait()


async def test_a_run_trains_every_step_and_accounts_for_every_sample(sim_config: Make, tmp_path: Path) -> None:
    cfg = sim_config("trainer.total_training_steps=6", "data.train_batch_size=3", "async_training.staleness_threshold=1",
                     output_dir=tmp_path)
    result = await run(cfg)
    assert result.finished and (result.steps, result.param_version, result.rollout_version) == (6, 6, 6)
    assert result.trained == 18 and result.made == result.trained + result.dropped_stale + result.queued
    rows = rows_of(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert METRIC_KEYS <= set(rows[0])
    assert all(0.0 <= r["trainer_idle_ratio"] <= 1.0 and 0.0 <= r["rollouter_idle_ratio"] <= 1.0 for r in rows)
    assert max(r["staleness_max"] for r in rows) <= 1


async def test_the_staleness_metrics_are_the_ages_of_the_batches_trained(
    sim_config: Make, engines_for: Make, tmp_path: Path
) -> None:
    """sample_age_mean/max of each line are its batch's ages (trainer version − sample.min_version),
    staleness_max their running maximum, whoever computes them."""
    cfg = sim_config("trainer.total_training_steps=8", "async_training.staleness_threshold=2", "data.train_batch_size=3",
                     "async_training.trigger_parameter_sync_step=3", output_dir=tmp_path)
    engines, recorder = engines_for(cfg)
    with anyio.fail_after(30):
        async with Supervisor.open(cfg, engines=engines) as sup:
            await sup.wait()
    rows = rows_of(cfg)
    running_max = 0
    for row, (version, batch) in zip(rows, recorder.steps, strict=True):
        ages = [version - min_version for _, _, min_version, _, _ in batch]
        running_max = max(running_max, *ages)
        assert (row["sample_age_mean"], row["sample_age_max"], row["staleness_max"]) == (
            sum(ages) / len(ages), max(ages), running_max
        )
    assert running_max > 0, "every sample was fresh: the test would not tell the measures apart"


async def test_sync_retry_survives_transient_transfer_failures(sim_config: Make, tmp_path: Path) -> None:
    """sync_failures=2 with sync_retries=3: every sync succeeds on its third attempt; the run finishes."""
    cfg = sim_config("trainer.total_training_steps=3", "trainer.simulated.sync_failures=2", "async_training.sync_retries=3",
                     "async_training.sync_backoff_s=0.001", output_dir=tmp_path)
    result = await run(cfg)
    assert result.finished and result.rollout_version == 3
    assert result.sync_failed_attempts == 2 * 3


async def test_persistent_sync_failure_fails_the_run_as_the_trainer_with_sync_failed(sim_config: Make, tmp_path: Path) -> None:
    cfg = sim_config("trainer.total_training_steps=3", "trainer.simulated.sync_failures=4", "async_training.sync_retries=3",
                     "async_training.sync_backoff_s=0.001", output_dir=tmp_path)
    with pytest.raises(ActorFailed) as info:
        await run(cfg)
    assert info.value.actor == "trainer" and isinstance(info.value.cause, SyncFailed)
    assert str(info.value) == (
        "actor 'trainer' failed: SyncFailed: weight sync to version 1 failed after 4 attempt(s): "
        "SimulatedEngineError('simulated weight-transfer failure for version 1')"
    )


async def test_a_generation_hang_fails_the_run_as_the_rollouter(sim_config: Make, tmp_path: Path) -> None:
    """hang_rate=1: each request times out, is retried, then GenerationFailed names the rollouter."""
    cfg = sim_config("rollout.simulated.hang_rate=1.0", "async_training.generation_timeout=0.05", "rollout.max_retries=1",
                     "rollout.max_restarts=0", output_dir=tmp_path)
    with pytest.raises(ActorFailed) as info:
        await run(cfg)
    assert info.value.actor == "rollouter" and isinstance(info.value.cause, GenerationFailed)
    assert "timeout after 0.05s" in str(info.value)


async def test_a_failing_actor_cancels_the_others_and_the_run_names_it(
    sim_config: Make, engines_for: Make, tmp_path: Path
) -> None:
    """The trainer fails at step 2: the rollouter is cancelled, engines closed, the error names the trainer."""
    cfg = sim_config("trainer.total_training_steps=5", "trainer.simulated.fail_at_step=2",
                     "rollout.simulated.mean_latency_s=0.05", output_dir=tmp_path)
    engines, _ = engines_for(cfg)
    sup = await Supervisor.build(cfg, engines=engines)
    with anyio.fail_after(10), pytest.raises(ActorFailed) as info:
        async with sup:
            await sup.wait()
    assert info.value.actor == "trainer"
    assert str(info.value) == "actor 'trainer' failed: SimulatedEngineError: simulated training failure at step 2"
    assert sup.result is not None and sup.result.steps == 1 and not sup.result.finished
    assert sup.channel.closed
    assert [r["step"] for r in rows_of(cfg)] == [1]
    requests = engines.generation.requests
    await anyio.sleep(0.1)
    assert engines.generation.requests == requests, "the rollouter kept generating after the trainer failed"


class RaisingScorer:
    """A user reward that fails every other call, alternating an exception and NaN."""

    name = "tests:raising_scorer"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prompt: Prompt, response_tokens: list[int]) -> float:
        self.calls += 1
        if self.calls % 2:
            return math.nan if self.calls % 4 == 1 else float("x")  # the second raises ValueError
        return 1.0


async def test_admission_rule_holds_with_a_slow_trainer(sim_config: Make, engines_for: Make, tmp_path: Path) -> None:
    """Fast generation, slow training: in flight + queued + consumed <= (threshold + 1 + version) × batch
    whenever a generation starts, and the rollouter does fill that window."""
    cfg = sim_config("trainer.total_training_steps=4", "trainer.simulated.step_latency_s=0.05", "data.train_batch_size=2",
                     "async_training.staleness_threshold=2", "async_training.max_queue_size=32", "rollout.n=1",
                     output_dir=tmp_path)
    sup_box: list[Supervisor] = []
    seen: list[tuple[int, int]] = []

    def check(request: Any) -> None:
        chan = sup_box[0].channel.statistics()
        live = sup_box[0].rollouter.statistics().in_flight + chan.size + chan.consumed
        seen.append((live, (2 + 1 + sup_box[0].rollouter.version) * 2))

    engines, _ = engines_for(cfg, on_generate=check)
    sup = await Supervisor.build(cfg, engines=engines)
    sup_box.append(sup)
    with anyio.fail_after(30):
        async with sup:
            result = await sup.wait()
    assert result.finished
    assert all(live <= limit for live, limit in seen), [s for s in seen if s[0] > s[1]]
    assert any(live == limit for live, limit in seen), "the window was never filled: the test would prove nothing"


async def test_reward_errors_are_counted_and_never_crash_the_run(sim_config: Make, tmp_path: Path) -> None:
    cfg = sim_config("trainer.total_training_steps=4", "rollout.n=2", output_dir=tmp_path)
    task = msgspec.structs.replace(simulated_task(cfg), scorer=RaisingScorer())
    result = await run(cfg, task=task)
    assert result.finished and result.reward_errors > 0
    rows = rows_of(cfg)
    assert all(math.isfinite(r["reward_mean"]) for r in rows)
    assert rows[-1]["reward_errors_total"] <= result.reward_errors


async def test_the_supervisor_embeds_in_a_host_loop_without_blocking_it(sim_config: Make, tmp_path: Path) -> None:
    """`async with Supervisor.open(cfg)` beside another task: the host keeps ticking; events stream every step."""
    cfg = sim_config("trainer.total_training_steps=5", output_dir=tmp_path)
    ticks = 0

    async def host_task() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.001)
            ticks += 1

    steps: list[int] = []
    with anyio.fail_after(30):
        async with anyio.create_task_group() as host:
            host.start_soon(host_task)
            async with Supervisor.open(cfg) as sup:

                async def follow() -> None:
                    async for row in sup.events():
                        steps.append(row["step"])

                host.start_soon(follow)
                result = await sup.wait()
            host.cancel_scope.cancel()
    assert result.finished and ticks > 0
    assert steps == [1, 2, 3, 4, 5]


async def test_pause_and_resume_through_the_supervisor_return_true(sim_config: Make, tmp_path: Path) -> None:
    cfg = sim_config("trainer.total_training_steps=3", output_dir=tmp_path)
    with anyio.fail_after(30):
        async with Supervisor.open(cfg) as sup:
            assert await sup.pause() is True
            assert await sup.pause() is True
            assert await sup.resume() is True
            assert await sup.resume() is True
            result = await sup.wait()
    assert result.finished


async def test_stop_ends_the_run_early_and_gracefully(sim_config: Make, tmp_path: Path) -> None:
    cfg = sim_config("trainer.total_training_steps=1000", output_dir=tmp_path)
    with anyio.fail_after(30):
        async with Supervisor.open(cfg) as sup:
            async for row in sup.events():
                if row["step"] >= 2:
                    sup.stop()
                    break
            result = await sup.wait()
    assert not result.finished and 2 <= result.steps < 1000
    assert result.made == result.trained + result.dropped_stale + result.queued
    assert result.trained == result.steps * cfg.data.train_batch_size


async def test_validation_survives_a_generation_engine_restart(sim_config: Make, tmp_path: Path) -> None:
    """An engine that dies during validation does not fail the run: validation's failure is not
    fatal, and training generations restart the engine as always; the run finishes."""
    cfg = sim_config("trainer.total_training_steps=2", "trainer.test_freq=1", "rollout.simulated.die_after_requests=1",
                     "rollout.n=1", "rollout.max_concurrency=1", "data.train_batch_size=1", "async_training.max_queue_size=1",
                     "rollout.max_restarts=1000", "rollout.max_retries=0", "task.num_val_prompts=4", output_dir=tmp_path)
    with anyio.fail_after(30):
        async with Supervisor.open(cfg) as sup:
            result = await sup.wait()
    assert result.finished and result.steps == 2
    assert sup.validator.failures >= 1, "no validation met the dead engine: the test proved nothing"


@pytest.mark.parametrize("pair", registry.PAIRS, ids=lambda p: f"{p.rollout}-{p.trainer}")
def test_every_engine_pair_imports_what_its_build_needs(pair: registry.Pair) -> None:
    """Start-up imports each pair's modules ahead of building it; only the vLLM pair asks for vLLM."""
    overrides = [f"rollout.engine={pair.rollout}", f"trainer.engine={pair.trainer}"]
    if pair.cpu_fsdp:
        overrides.append("trainer.n_gpus_per_node=0")
    cfg = load_config(None, overrides)
    if not pair.ready:
        assert pair.rollout != "vllm"
        import_engine_modules(cfg)
        assert all(name in sys.modules for name in pair.modules)
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"asyncpolicy\[vllm\]"):
            import_engine_modules(cfg)
    else:
        import_engine_modules(cfg)


async def test_an_engine_that_never_starts_fails_the_run_naming_it(
    sim_config: Make, engines_for: Make, tmp_path: Path
) -> None:
    """A hung start is bounded (10 x generation_timeout per replica) and reported as a run failure, never a hang."""
    cfg = sim_config("async_training.generation_timeout=0.05", output_dir=tmp_path)
    engines, _ = engines_for(cfg)

    class HungStart(SimulatedGenerationEngine):
        async def start(self) -> None:
            await anyio.sleep_forever()

    engines = msgspec.structs.replace(engines, generation=HungStart(cfg.rollout.simulated, random.Random(0)))
    with anyio.fail_after(20), pytest.raises(RunFailed, match=r"the generation engine \(HungStart\) did not start within 0.5s"):
        async with Supervisor.open(cfg, engines=engines) as sup:
            await sup.wait()


async def test_validation_measures_the_starting_policy_and_ready_s_precedes_the_first_step(sim_config: Make, tmp_path: Path) -> None:
    """With trainer.test_freq > 0 the policy training starts from is validated (val_step 0) before any
    step asks for it; ready_s (start-up) is known once the block is entered and precedes every step."""
    cfg = sim_config("trainer.total_training_steps=1000", "trainer.test_freq=500", "task.num_val_prompts=3", output_dir=tmp_path)
    with anyio.fail_after(30):
        async with Supervisor.open(cfg) as sup:
            ready = sup.ready_s
            async for row in sup.events():
                if row["val_step"] is not None:
                    sup.stop()
                    break
            result = await sup.wait()
    rows = rows_of(cfg)
    assert result.steps < 500  # no step's request: the validation seen is the one at the start
    assert rows[-1]["val_step"] == 0 and rows[-1]["val/accuracy"] is not None and sup.validator.latest is not None
    assert sup.validator.latest.step == 0 and sup.validator.latest.prompts == 3
    assert ready is not None and 0 < ready <= rows[0]["elapsed_s"]


async def test_no_validation_without_test_freq(sim_config: Make, tmp_path: Path) -> None:
    cfg = sim_config("trainer.total_training_steps=4", "trainer.test_freq=0", output_dir=tmp_path)
    result = await run(cfg)
    assert result.finished and all(r["val_step"] is None and r["val/accuracy"] is None for r in rows_of(cfg))
