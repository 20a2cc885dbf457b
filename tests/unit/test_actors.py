"""Rollouter, trainer and synchronizer, each on its own with the simulated engines."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from asyncpolicy.actors import rollouter as rollouter_module
from asyncpolicy.actors.synchronizer import ParameterSynchronizer, SyncResult
from asyncpolicy.actors.trainer import Trainer
from asyncpolicy.channels import VersionedChannel
from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import GenerationRequest
from asyncpolicy.engines.simulated import SimulatedGenerationEngine, SimulatedTrainEngine, SimulatedTransport
from asyncpolicy.errors import GenerationFailed, RunFailed, SyncFailed
from asyncpolicy.samples import Prompt, Sample

pytestmark = pytest.mark.anyio

Make = Callable[..., Any]


class CountingGenerationEngine:
    """A fake GenerationEngine: the simulated one, counting the generate calls running right now."""

    def __init__(self, inner: SimulatedGenerationEngine) -> None:
        self.inner = inner
        self.active = 0
        self.max_active = 0
        self.aborts = 0
        self._started: anyio.Event | None = None

    @property
    def version(self) -> int:
        return self.inner.version

    async def start(self) -> None:
        await self.inner.start()

    async def generate(self, request: Any) -> Any:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        if self._started is not None:
            self._started.set()
        try:
            return await self.inner.generate(request)
        finally:
            self.active -= 1

    async def abort_all(self) -> None:
        self.aborts += 1
        await self.inner.abort_all()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def wait_running(self) -> None:
        """Until at least one generation runs."""
        while self.active == 0:
            self._started = anyio.Event()
            await self._started.wait()


def counting_engine(cfg: Config) -> CountingGenerationEngine:
    return CountingGenerationEngine(SimulatedGenerationEngine(cfg.rollout.simulated, random.Random(cfg.seed)))


async def take(channel: VersionedChannel[Sample], n: int, version: int) -> list[Sample]:
    with anyio.fail_after(5):
        return await channel.get_batch(n, version)


# -- rollouter: pause / resume -----------------------------------------------------------------


async def test_pause_returns_true_only_once_no_generation_runs(sim_config: Make, rollouter_for: Make) -> None:
    """pause() returns True within a bounded time and leaves nothing running on the engine."""
    cfg = sim_config("rollout.simulated.mean_latency_s=0.05", "rollout.simulated.latency_sigma=0")
    engine = counting_engine(cfg)
    rollouter, _, _ = rollouter_for(cfg, engine)
    await engine.start()
    async with anyio.create_task_group() as tg:
        await tg.start(rollouter.run)
        await engine.wait_running()
        with anyio.fail_after(2):
            assert await rollouter.pause() is True
        assert engine.active == 0 and rollouter.paused
        tg.cancel_scope.cancel()


async def test_pause_and_resume_are_idempotent(sim_config: Make, rollouter_for: Make) -> None:
    """Pausing twice and resuming twice each return True; one resume per reason restarts generation."""
    cfg = sim_config("async_training.staleness_threshold=3", "data.train_batch_size=2", "async_training.max_queue_size=16")
    engine = counting_engine(cfg)
    rollouter, _, channel = rollouter_for(cfg, engine)
    await engine.start()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(rollouter.run)
            assert await rollouter.pause() is True
            assert await rollouter.pause() is True
            made = channel.statistics().produced
            await anyio.sleep(0.02)
            assert channel.statistics().produced == made and engine.active == 0
            assert await rollouter.resume() is True
            assert await rollouter.resume() is True
            assert not rollouter.paused
            await take(channel, 1, 0)  # generation flows again
            tg.cancel_scope.cancel()


async def test_generation_stays_paused_while_any_reason_holds(sim_config: Make, rollouter_for: Make) -> None:
    """A user pause survives a sync's pause/resume: reasons are counted separately."""
    cfg = sim_config()
    rollouter, engine, _ = rollouter_for(cfg)
    await engine.start()
    assert await rollouter.pause("user") and await rollouter.pause("sync")
    assert await rollouter.resume("sync")
    assert rollouter.paused
    assert await rollouter.resume("user")
    assert not rollouter.paused


async def test_pause_with_partial_rollout_continues_generations_under_the_new_version(
    sim_config: Make, rollouter_for: Make
) -> None:
    """Interrupted generations continue from their tokens: some trajectory spans versions 0 and 1."""
    cfg = sim_config(
        "async_training.partial_rollout=true",
        "async_training.staleness_threshold=3",
        "async_training.max_queue_size=16",
        "data.train_batch_size=4",
        "data.max_response_length=64",
        "rollout.n=2",
        "rollout.simulated.mean_latency_s=0.2",
        "rollout.simulated.latency_sigma=0",
    )
    engine = counting_engine(cfg)
    rollouter, _, channel = rollouter_for(cfg, engine)
    await engine.start()
    async with anyio.create_task_group() as tg:
        await tg.start(rollouter.run)
        await engine.wait_running()
        await anyio.sleep(0.05)  # some tokens exist under version 0
        assert await rollouter.pause("sync") is True
        assert engine.aborts == 1 and rollouter.statistics().counters.interrupted > 0
        engine.inner.set_version(1)
        assert await rollouter.resume("sync") is True
        samples = await take(channel, 4, 1)
        tg.cancel_scope.cancel()
    spans = [(t.min_version, t.max_version) for s in samples for t in s.trajectories]
    assert (0, 1) in spans, spans
    assert any(s.min_version == 0 and s.max_version == 1 for s in samples)


async def test_without_partial_rollout_an_interrupted_generation_restarts_under_one_version(
    sim_config: Make, rollouter_for: Make
) -> None:
    """partial_rollout=false: aborted responses start again, so every trajectory has one version."""
    cfg = sim_config(
        "async_training.partial_rollout=false",
        "async_training.staleness_threshold=3",
        "async_training.max_queue_size=16",
        "data.train_batch_size=4",
        "data.max_response_length=64",
        "rollout.simulated.mean_latency_s=0.2",
        "rollout.simulated.latency_sigma=0",
    )
    assert cfg.async_training.partial_rollout is False
    engine = counting_engine(cfg)
    rollouter, _, channel = rollouter_for(cfg, engine)
    await engine.start()
    async with anyio.create_task_group() as tg:
        await tg.start(rollouter.run)
        await engine.wait_running()
        await anyio.sleep(0.05)
        assert await rollouter.pause("sync", drain=False) is True
        assert rollouter.statistics().counters.interrupted > 0
        engine.inner.set_version(1)
        await rollouter.resume("sync")
        samples = await take(channel, 4, 1)
        tg.cancel_scope.cancel()
    assert all(t.min_version == t.max_version for s in samples for t in s.trajectories)
    assert any(t.min_version == 1 for s in samples for t in s.trajectories)


async def test_pause_with_drain_lets_running_generations_finish(sim_config: Make, rollouter_for: Make) -> None:
    cfg = sim_config("rollout.simulated.mean_latency_s=0.05", "rollout.simulated.latency_sigma=0")
    engine = counting_engine(cfg)
    rollouter, _, _ = rollouter_for(cfg, engine)
    await engine.start()
    async with anyio.create_task_group() as tg:
        await tg.start(rollouter.run)
        await engine.wait_running()
        with anyio.fail_after(2):
            assert await rollouter.pause("sync", drain=True) is True
        assert engine.aborts == 0 and rollouter.statistics().counters.interrupted == 0 and engine.active == 0
        tg.cancel_scope.cancel()


# -- rollouter: admission, timeouts, rewards ----------------------------------------------------


async def test_admission_stops_at_the_capacity_rule_until_the_version_moves(sim_config: Make, rollouter_for: Make) -> None:
    """With no trainer, exactly (threshold + 1 + version) × batch groups are admitted."""
    cfg = sim_config(
        "async_training.staleness_threshold=2", "data.train_batch_size=3", "async_training.max_queue_size=32"
    )
    rollouter, engine, channel = rollouter_for(cfg)
    await engine.start()
    async with anyio.create_task_group() as tg:
        await tg.start(rollouter.run)
        with anyio.fail_after(5):
            while channel.statistics().produced < 9:
                await anyio.sleep(0.005)
        await anyio.sleep(0.05)  # time for any over-admission to show
        assert rollouter.statistics().counters.admitted == (2 + 1 + 0) * 3
        await take(channel, 3, 0)  # consuming frees nothing: consumed samples still count
        await anyio.sleep(0.05)
        assert rollouter.statistics().counters.admitted == 9
        sync = ParameterSynchronizer(cfg.async_training, rollouter, SimulatedTransport(engine, cfg.trainer.simulated))
        assert await sync.sync_weights(1)
        with anyio.fail_after(5):
            while rollouter.statistics().counters.admitted < 12:
                await anyio.sleep(0.005)
        await anyio.sleep(0.05)
        assert rollouter.statistics().counters.admitted == (2 + 1 + 1) * 3
        tg.cancel_scope.cancel()


async def _hog_the_loop(iterations: int, done: anyio.Event) -> None:
    """Block the loop for twice LOOP_BUSY_S in each of `iterations` loop iterations (a blocking sleep
    lasts at least that long on any machine), then stop."""
    for _ in range(iterations):
        time.sleep(2 * rollouter_module.LOOP_BUSY_S)
        await anyio.lowlevel.checkpoint()
    done.set()


ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a checkpoint's round trip is one loop
# iteration there; trio runs a batch of tasks in random order, so a round trip may miss the busy task


@ASYNCIO_ONLY
async def test_admission_waits_while_the_loop_is_busy_and_resumes_once_it_is_not(
    sim_config: Make, rollouter_for: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task that keeps every loop iteration long holds admission at the first group; once it stops,
    admission goes on to the capacity rule's 9 groups."""
    monkeypatch.setattr(rollouter_module, "LOOP_WAIT_MAX_S", 60.0)  # the bound is not what is tested here
    cfg = sim_config(
        "async_training.staleness_threshold=2", "data.train_batch_size=3", "async_training.max_queue_size=32"
    )
    rollouter, engine, _ = rollouter_for(cfg)
    await engine.start()
    hog_done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hog_the_loop, 20, hog_done)
        await tg.start(rollouter.run)
        while not hog_done.is_set():
            assert rollouter.statistics().counters.admitted == 1
            await anyio.lowlevel.checkpoint()
        with anyio.fail_after(5):
            while rollouter.statistics().counters.admitted < 9:
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()


@ASYNCIO_ONLY
async def test_a_loop_that_stays_busy_delays_admission_by_at_most_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rollouter_module, "LOOP_WAIT_MAX_S", 0.05)
    hog_done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hog_the_loop, 1_000_000, hog_done)
        waited = await rollouter_module.loop_caught_up()
        assert waited >= 0.05 and not hog_done.is_set()
        tg.cancel_scope.cancel()


async def test_the_admission_window_bounds_groups_generating_at_once_and_moves_at_run_time(
    sim_config: Make, rollouter_for: Make
) -> None:
    """rollout.n=1: engine calls running = groups generating. Window 2: at most 2, and 2 are reached;
    moved to 5 while running: 5 are reached, and never more."""
    cfg = sim_config("rollout.n=1", "rollout.max_concurrency=16", "async_training.staleness_threshold=3",
                     "data.train_batch_size=8", "async_training.max_queue_size=32",
                     "rollout.simulated.mean_latency_s=0.01", "rollout.simulated.latency_sigma=0")
    engine = counting_engine(cfg)
    rollouter, _, _ = rollouter_for(cfg, engine)
    assert rollouter.statistics().admission_window == 16
    rollouter.set_admission_window(2)
    await engine.start()
    async with anyio.create_task_group() as tg:
        await tg.start(rollouter.run)
        with anyio.fail_after(5):
            while rollouter.statistics().counters.completed < 6:
                await anyio.sleep(0.002)
        assert engine.max_active == 2
        rollouter.set_admission_window(5)
        with anyio.fail_after(5):
            while engine.max_active < 5:
                await anyio.sleep(0.002)
        stats = rollouter.statistics()
        assert stats.admission_window == 5 and stats.generating <= 5
        tg.cancel_scope.cancel()
    assert engine.max_active == 5 and rollouter.statistics().generating == 0
    with pytest.raises(ValueError, match="at least 1 group"):
        rollouter.set_admission_window(0)


async def test_a_hang_past_generation_timeout_is_retried_then_fails_naming_the_request(
    sim_config: Make, rollouter_for: Make
) -> None:
    cfg = sim_config(
        "rollout.simulated.hang_rate=1.0", "async_training.generation_timeout=0.05", "rollout.max_retries=1", "rollout.n=1"
    )
    rollouter, engine, _ = rollouter_for(cfg)
    await engine.start()
    with anyio.fail_after(5), pytest.raises(GenerationFailed) as info:
        await rollouter.run()
    assert str(info.value).endswith("failed 2 time(s); last: timeout after 0.05s")
    assert str(info.value).startswith("generation train/")
    assert rollouter.statistics().counters.timeouts >= 2 and rollouter.statistics().counters.retried >= 1


async def test_engine_errors_are_retried_then_fail_with_the_last_error(sim_config: Make, rollouter_for: Make) -> None:
    cfg = sim_config("rollout.simulated.failure_rate=1.0", "rollout.max_retries=2", "rollout.n=1")
    rollouter, engine, _ = rollouter_for(cfg)
    await engine.start()
    with anyio.fail_after(5), pytest.raises(GenerationFailed, match=r"failed 3 time\(s\); last: SimulatedEngineError"):
        await rollouter.run()


class FlakyScorer:
    """A user reward function that raises, returns NaN, returns inf, or scores 0.5, in turn."""

    name = "tests:flaky_scorer"
    cycle = ("raise", "nan", "inf", "ok")

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def __call__(self, prompt: Prompt, response_tokens: list[int]) -> float:
        kind = self.cycle[len(self.outcomes) % 4]
        self.outcomes.append(kind)
        if kind == "raise":
            raise ZeroDivisionError("boom")
        return {"nan": math.nan, "inf": math.inf, "ok": 0.5}[kind]


async def test_a_failing_or_non_finite_reward_is_counted_and_scored_zero(sim_config: Make, rollouter_for: Make) -> None:
    cfg = sim_config("rollout.n=4", "data.train_batch_size=2", "async_training.max_queue_size=8")
    scorer = FlakyScorer()
    rollouter, engine, channel = rollouter_for(cfg, scorer=scorer)
    await engine.start()
    async with anyio.create_task_group() as tg:
        await tg.start(rollouter.run)
        samples = await take(channel, 2, 0)
        tg.cancel_scope.cancel()
    trajectories = [t for s in samples for t in s.trajectories]
    bad = [t for t in trajectories if t.reward_error]
    assert bad and all(t.reward == 0.0 for t in bad)
    assert all(math.isfinite(t.reward) for t in trajectories)
    assert {t.reward_error for t in bad} <= {"ZeroDivisionError: boom", "non-finite reward nan", "non-finite reward inf"}
    assert rollouter.statistics().counters.reward_errors == sum(kind != "ok" for kind in scorer.outcomes)
    assert sorted(t.reward for t in trajectories if not t.reward_error) == [0.5] * (len(trajectories) - len(bad))


# -- synchronizer -------------------------------------------------------------------------------


def synchronizer(cfg: Config, rollouter_for: Make) -> tuple[ParameterSynchronizer, Any, SimulatedTransport]:
    rollouter, engine, _ = rollouter_for(cfg)
    transport = SimulatedTransport(engine, cfg.trainer.simulated)
    return ParameterSynchronizer(cfg.async_training, rollouter, transport), engine, transport


async def test_sync_retries_through_transient_failures(sim_config: Make, rollouter_for: Make) -> None:
    cfg = sim_config("trainer.simulated.sync_failures=2", "async_training.sync_retries=3", "async_training.sync_backoff_s=0.001")
    sync, engine, transport = synchronizer(cfg, rollouter_for)
    await engine.start()
    with anyio.fail_after(5):
        assert await sync.sync_weights(1) is True
    assert engine.version == 1 and transport.attempts == 3 and sync.statistics().counters.failed_attempts == 2


async def test_persistent_sync_failure_raises_sync_failed_naming_the_cause_and_resumes_rollout(
    sim_config: Make, rollouter_for: Make
) -> None:
    cfg = sim_config("trainer.simulated.sync_failures=4", "async_training.sync_retries=3", "async_training.sync_backoff_s=0.001")
    sync, engine, transport = synchronizer(cfg, rollouter_for)
    await engine.start()
    with anyio.fail_after(5), pytest.raises(SyncFailed) as info:
        await sync.sync(1)
    assert str(info.value) == (
        "weight sync to version 1 failed after 4 attempt(s): "
        "SimulatedEngineError('simulated weight-transfer failure for version 1')"
    )
    assert engine.version == 0 and transport.attempts == 4
    assert not sync.rollouter.paused, "a failed sync must not leave rollout paused"


async def test_a_sync_the_engine_has_overtaken_costs_nothing_and_reports_so(sim_config: Make, rollouter_for: Make) -> None:
    """The trainer records each call's own pause: a push of an older version does nothing and says 0, not the last sync's."""
    sync, engine, transport = synchronizer(sim_config(), rollouter_for)
    await engine.start()
    with anyio.fail_after(5):
        first = await sync.sync(2)
        again = await sync.sync(1)
    assert 0 < first.pause_s <= first.latency_s and engine.version == 2
    assert again == SyncResult() and sync.statistics().counters.syncs == 1 and transport.attempts == 1


async def test_a_sync_attempt_past_sync_timeout_counts_as_a_failure(sim_config: Make, rollouter_for: Make) -> None:
    cfg = sim_config(
        "trainer.simulated.sync_latency_s=1.0", "async_training.sync_timeout=0.02", "async_training.sync_retries=1",
        "async_training.sync_backoff_s=0.001",
    )
    sync, engine, _ = synchronizer(cfg, rollouter_for)
    await engine.start()
    with anyio.fail_after(5), pytest.raises(SyncFailed, match=r"failed after 2 attempt\(s\): timeout after 0.02s$"):
        await sync.sync(1)


# -- trainer ------------------------------------------------------------------------------------


def trainer_parts(cfg: Config, rollouter_for: Make) -> tuple[Trainer, VersionedChannel[Sample], Any, list[Any]]:
    rollouter, engine, channel = rollouter_for(cfg)
    sync = ParameterSynchronizer(cfg.async_training, rollouter, SimulatedTransport(engine, cfg.trainer.simulated))
    reports: list[Any] = []
    trainer = Trainer(cfg, SimulatedTrainEngine(cfg.trainer.simulated), channel, sync, reports.append)
    return trainer, channel, rollouter, reports


async def test_trainer_bumps_the_version_once_per_step_and_syncs_every_trigger_steps(
    sim_config: Make, rollouter_for: Make
) -> None:
    cfg = sim_config(
        "trainer.total_training_steps=6", "async_training.staleness_threshold=2",
        "async_training.trigger_parameter_sync_step=3", "data.train_batch_size=2",
    )
    trainer, _, rollouter, reports = trainer_parts(cfg, rollouter_for)
    await rollouter.engine.start()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(rollouter.run)
            await trainer.run()
            tg.cancel_scope.cancel()
    assert [r.version for r in reports] == [1, 2, 3, 4, 5, 6]
    assert [r.sync_latency_s is not None for r in reports] == [False, False, True, False, False, True]
    assert rollouter.version == 6
    assert all(len(r.batch) == 2 and r.version - 1 - min(s.min_version for s in r.batch) <= 2 for r in reports)


async def test_trainer_fails_clearly_when_the_channel_closes_early(sim_config: Make, rollouter_for: Make) -> None:
    cfg = sim_config("trainer.total_training_steps=3")
    trainer, channel, _, _ = trainer_parts(cfg, rollouter_for)
    channel.close()
    with anyio.fail_after(5), pytest.raises(RunFailed, match=r"^the sample channel closed after step 0 of 3; the rollouter stopped early$"):
        await trainer.run()


# -- validator ----------------------------------------------------------------------------------


async def test_a_failed_validation_raises_the_named_generation_failure(sim_config: Make, rollouter_for: Make) -> None:
    """Like the rollouter, the validator surfaces GenerationFailed itself, not a bare task-group
    ExceptionGroup (which would make the run's message 'ExceptionGroup: unhandled errors ...')."""
    from asyncpolicy.actors.validator import Validator
    from asyncpolicy.tasks.registry import simulated_task

    cfg = sim_config("rollout.simulated.failure_rate=1.0", "rollout.max_retries=0")
    rollouter, engine, _ = rollouter_for(cfg)
    validator = Validator(rollouter, simulated_task(cfg).val, concurrency=2)
    await engine.start()
    with anyio.fail_after(5), pytest.raises(GenerationFailed, match=r"^generation val/"):
        await validator.validate(1)


class _RecordingEngine:
    """The simulated engine, recording each request it is given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests: list[GenerationRequest] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, request: GenerationRequest) -> Any:
        self.requests.append(request)
        return await self.inner.generate(request)


@pytest.mark.parametrize("val_temperature", [None, 0.7])
async def test_validation_is_greedy_by_default_and_its_accuracy_is_the_share_scored_correct(
    sim_config: Make, rollouter_for: Make, val_temperature: float | None
) -> None:
    from asyncpolicy.actors.validator import Validator
    from asyncpolicy.tasks.registry import simulated_task

    overrides = [f"rollout.val_temperature={val_temperature}"] if val_temperature is not None else []
    cfg = sim_config("task.num_val_prompts=10", *overrides)
    rewards = [1.0, 0.3, 1.5, 0.0, 0.999]  # by prompt index: 1.0 and 1.5 count as correct

    def scorer(prompt: Any, response_tokens: list[int]) -> float:
        return rewards[prompt.index % len(rewards)]

    engine = _RecordingEngine(SimulatedGenerationEngine(cfg.rollout.simulated, random.Random(cfg.seed)))
    rollouter, _, _ = rollouter_for(cfg, engine=engine, scorer=scorer)
    prompts = simulated_task(cfg).val
    await engine.start()
    with anyio.fail_after(10):
        result = await Validator(rollouter, prompts, concurrency=3).validate(4)
    got = [rewards[p.index % len(rewards)] for p in prompts]
    assert result.prompts == len(prompts) == 10
    assert result.accuracy == sum(r >= 1.0 for r in got) / 10 and 0 < result.accuracy < 1
    assert result.reward_mean == pytest.approx(sum(got) / 10)
    assert len(engine.requests) == 10
    assert {r.temperature for r in engine.requests} == {0.0 if val_temperature is None else val_temperature}
