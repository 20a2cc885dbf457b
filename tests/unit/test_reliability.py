"""Fault handling with the simulated engines: each failure mode of issue 5 and what it must preserve.

Every test checks the sample accounting (made = trained + dropped_stale + queued) besides the
failure's own outcome, because a fault that is "handled" by losing samples is not handled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import msgspec
import pytest

from asyncpolicy import checkpoint
from asyncpolicy.actors.rollouter import Rollouter
from asyncpolicy.actors.validator import ValidationResult
from asyncpolicy.config import Config, load_config
from asyncpolicy.errors import ActorFailed, ConfigError, GenerationFailed
from asyncpolicy.samples import Sample
from asyncpolicy.supervisor import RunResult, Supervisor

pytestmark = pytest.mark.anyio

FAST = [
    "rollout.engine=simulated",
    "trainer.engine=simulated",
    "rollout.simulated.mean_latency_s=0.002",
    "trainer.simulated.step_latency_s=0.002",
    "trainer.simulated.sync_latency_s=0.0",
    "data.train_batch_size=4",
    "rollout.n=2",
]


def cfg_for(tmp_path: Path, *overrides: str):
    return load_config(None, [*FAST, f"output_dir={tmp_path}", *overrides])


async def run(cfg) -> RunResult:
    async with Supervisor.open(cfg) as sup:
        return await sup.wait()


def latest_checkpoint(out: Path) -> Path:
    """The newest complete checkpoint under `out`; a run that wrote none fails here, by name."""
    path = checkpoint.latest_checkpoint(out)
    assert path is not None, f"no complete checkpoint under {out}"
    return path


def assert_accounted(result: RunResult, steps: int, batch: int = 4) -> None:
    assert result.made == result.trained + result.dropped_stale + result.queued
    assert result.trained == steps * batch
    assert result.steps == steps == result.param_version


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_transient_generation_errors_are_retried(tmp_path: Path) -> None:
    """A generation that raises is retried; the run completes with every sample accounted for."""
    cfg = cfg_for(tmp_path, "trainer.total_training_steps=15", "rollout.simulated.failure_rate=0.2", "rollout.max_retries=8")
    result = await run(cfg)
    assert result.generation_retries > 0
    assert_accounted(result, 15)


async def test_hung_generations_time_out_and_are_retried(tmp_path: Path) -> None:
    """A generation that hangs past generation_timeout is abandoned and retried, never waited on forever.

    Hangs are frequent enough (3 in 10) that the run cannot finish without timing some out, however
    fast the machine: most groups hold a hung response, and a group is made only when all are done.
    (At 1 in 20, an idle machine could finish the run before any hang reached its timeout.) 20
    retries make a generation that hangs every time (0.3^21) out of reach."""
    cfg = cfg_for(
        tmp_path,
        "trainer.total_training_steps=10",
        "rollout.simulated.hang_rate=0.3",
        "async_training.generation_timeout=0.2",
        "rollout.max_retries=20",
    )
    async with Supervisor.open(cfg) as sup:
        result = await sup.wait()
        assert sup.rollouter.statistics().counters.timeouts > 0
    assert_accounted(result, 10)


async def test_dead_generation_engine_is_restarted_without_losing_queued_samples(tmp_path: Path) -> None:
    """An engine that dies is restarted by the supervisor; queued samples survive, in-flight ones are regenerated."""
    cfg = cfg_for(
        tmp_path,
        "trainer.total_training_steps=20",
        "rollout.simulated.die_after_requests=40",
        "rollout.max_retries=1",
        "rollout.max_restarts=10",
    )
    async with Supervisor.open(cfg) as sup:
        result = await sup.wait()
        trained = sup.engines.trainer.trained_prompts
    assert result.finished
    assert_accounted(result, 20)
    assert len(trained) == len(set(trained)), "a prompt was trained twice after a restart"
    rows = [msgspec.json.decode(line) for line in (tmp_path / "metrics.jsonl").read_bytes().splitlines()]
    assert all(0 <= r["rollouter_idle_ratio"] <= 1 and 0 <= r["trainer_idle_ratio"] <= 1 for r in rows)


async def test_engine_that_stays_dead_fails_the_run_naming_the_rollouter(tmp_path: Path) -> None:
    cfg = cfg_for(
        tmp_path,
        "trainer.total_training_steps=50",
        "rollout.simulated.die_after_requests=10",
        "rollout.max_retries=0",
        "rollout.max_restarts=0",
    )
    with pytest.raises(ActorFailed) as info:
        await run(cfg)
    assert info.value.actor == "rollouter"
    assert isinstance(info.value.cause, GenerationFailed)
    assert "restarted 0 time(s)" in str(info.value)


async def test_trainer_failure_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """A failing train step stops the run (no checkpoint of the failed state); resume continues from the last good one."""
    cfg = cfg_for(tmp_path, "trainer.total_training_steps=20", "trainer.save_freq=5", "trainer.simulated.fail_at_step=12")
    with pytest.raises(ActorFailed) as info:
        await run(cfg)
    assert info.value.actor == "trainer"
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000005", "step-00000010"]

    resumed = cfg_for(tmp_path, "trainer.total_training_steps=20", "trainer.save_freq=5", "resume=auto")
    async with Supervisor.open(resumed) as sup:
        result = await sup.wait()
        trained = sup.engines.trainer.trained_prompts
    assert_accounted(result, 20)
    assert len(trained) == len(set(trained)) == 20 * 4
    rows = [msgspec.json.decode(line) for line in (tmp_path / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))


async def test_resume_restores_queue_in_flight_cursor_and_counters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped run's checkpoint holds queued samples and in-flight prompts; the resumed run loses none.

    A queued sample may age past the bound while it waits after resume: then it must be dropped as
    stale (counted, logged, reported to the rollouter), never lost. A spy on the rollouter's drop
    callback records which ones, so the check holds whatever the timing."""
    dropped: list[str] = []
    notify = Rollouter.notify_dropped

    def spy(self: Rollouter, sample: Sample, version: int) -> None:
        dropped.append(sample.prompt.uid)
        notify(self, sample, version)

    monkeypatch.setattr(Rollouter, "notify_dropped", spy)
    cfg = cfg_for(tmp_path, "trainer.total_training_steps=8", "async_training.staleness_threshold=3", "async_training.max_queue_size=16")
    first = await run(cfg)
    state = checkpoint.load_state(latest_checkpoint(tmp_path))
    assert state.trainer.step == 8
    assert len(state.channel.items) == first.queued > 0
    assert len(state.in_flight) == first.in_flight
    drawn = state.cursor.epoch * cfg.task.num_prompts + state.cursor.position
    assert drawn == state.rollout.completed + len(state.in_flight), "a drawn prompt is neither made nor in flight"

    more = cfg_for(tmp_path, "trainer.total_training_steps=16", "async_training.staleness_threshold=3", "async_training.max_queue_size=16", "resume=auto")
    async with Supervisor.open(more) as sup:
        result = await sup.wait()
        trained = sup.engines.trainer.trained_prompts
    assert_accounted(result, 16)
    assert len(trained) == len(set(trained)) == 16 * 4
    queued_then = {sample.prompt.uid for sample, _ in state.channel.items}
    assert len(dropped) == result.dropped_stale  # both runs' drops: the count is restored on resume
    assert queued_then <= set(trained[8 * 4 :]) | set(dropped), "a queued sample of the checkpoint was neither trained nor dropped as stale"


async def test_fresh_run_refuses_to_overwrite_an_existing_run(tmp_path: Path) -> None:
    await run(cfg_for(tmp_path, "trainer.total_training_steps=2"))
    with pytest.raises(ConfigError, match="already holds a run; pass resume=auto"):
        await run(cfg_for(tmp_path, "trainer.total_training_steps=2"))


async def test_resume_from_a_missing_path_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config key 'resume'"):
        await run(cfg_for(tmp_path, f"resume={tmp_path / 'nope'}"))


async def test_stop_checkpoints_and_reports_unfinished(tmp_path: Path) -> None:
    """Supervisor.stop() finishes the step in progress, writes a checkpoint, and says finished=False."""
    cfg = cfg_for(tmp_path, "trainer.total_training_steps=100000")
    async with Supervisor.open(cfg) as sup:
        async for row in sup.events():
            if row["step"] >= 5:
                sup.stop()
                break
        result = await sup.wait()
    assert not result.finished
    assert result.made == result.trained + result.dropped_stale + result.queued
    state = checkpoint.load_state(latest_checkpoint(tmp_path))
    assert state.reason == "stop" and state.trainer.step == result.steps


async def test_a_finished_run_resumed_with_validation_on_ends_at_once_as_finished(tmp_path: Path) -> None:
    """Training is complete as its actors start, so the trainer ends the run while the validator is
    still starting (as a stop at that moment does): the run ends finished, with no start-up error."""
    await run(cfg_for(tmp_path, "trainer.total_training_steps=2", "trainer.test_freq=1"))
    with anyio.fail_after(30):
        result = await run(cfg_for(tmp_path, "trainer.total_training_steps=2", "trainer.test_freq=1", "resume=auto"))
    assert result.finished
    assert_accounted(result, 2)
    assert checkpoint.load_state(latest_checkpoint(tmp_path)).reason == "finished"


async def test_a_resumed_run_keeps_its_validation_history(tmp_path: Path) -> None:
    """The learning curve goes on across a resume: the checkpoint holds every validation (and the
    failure count), so the resumed validator starts from them, not from nothing. Each half is stopped
    by what the validator has done, never by the clock."""

    async def run_until(cfg: Config, done: Callable[[Supervisor], bool]) -> tuple[ValidationResult, ...]:
        async with Supervisor.open(cfg) as sup:
            with anyio.fail_after(60):
                async for _ in sup.events():
                    if done(sup):
                        sup.stop()
                        break
                await sup.wait()
            return sup.validator.history()

    keys = ("trainer.total_training_steps=100000", "trainer.test_freq=2")
    first = await run_until(cfg_for(tmp_path, *keys), lambda sup: len(sup.validator.history()) >= 2)
    saved = checkpoint.load_state(latest_checkpoint(tmp_path)).validator
    assert saved is not None and tuple(saved.history) == first and saved.failures == 0
    last = first[-1].step
    history = await run_until(
        cfg_for(tmp_path, *keys, "resume=auto"), lambda sup: any(v.step > last for v in sup.validator.history())
    )
    assert history[: len(first)] == first and len(history) > len(first)  # kept as it was, then continued


async def test_events_iteration_ends_when_the_run_ends(tmp_path: Path) -> None:
    """A host that follows every event to the end is not left waiting after the last step."""
    cfg = cfg_for(tmp_path, "trainer.total_training_steps=6")
    with anyio.fail_after(30):
        async with Supervisor.open(cfg) as sup:
            steps = [row["step"] async for row in sup.events()]
            result = await sup.wait()
            late = [row async for row in sup.events()]  # subscribing after the end ends at once
    assert steps == list(range(1, 7)) and result.steps == 6 and late == []


async def test_every_admitted_group_is_made_or_in_flight_across_restarts_and_resume(tmp_path: Path) -> None:
    """admitted = made + in flight, through engine restarts, a checkpoint with requeued groups, and a resume."""
    cfg = cfg_for(
        tmp_path,
        "trainer.total_training_steps=12",
        "rollout.simulated.die_after_requests=30",
        "rollout.max_retries=0",
        "rollout.max_restarts=50",
        "trainer.save_freq=3",
    )
    async with Supervisor.open(cfg) as sup:
        result = await sup.wait()
        counters = sup.rollouter.statistics().counters
        assert counters.admitted == result.made + sup.rollouter.statistics().in_flight
    state = checkpoint.load_state(latest_checkpoint(tmp_path))
    assert state.rollout.admitted == state.channel.produced + len(state.in_flight)

    more = cfg_for(tmp_path, "trainer.total_training_steps=20", "rollout.simulated.die_after_requests=30",
                   "rollout.max_retries=0", "rollout.max_restarts=50", "resume=auto")
    async with Supervisor.open(more) as sup:
        result = await sup.wait()
        assert sup.rollouter.statistics().counters.admitted == result.made + sup.rollouter.statistics().in_flight
    assert_accounted(result, 20)


async def test_concurrent_syncs_end_on_the_newest_version_and_resume_generation(tmp_path: Path) -> None:
    """Two syncs at once (the trainer's and an engine restart's) are serialised: the engine ends on
    the newer version, never an older one, and generation is not resumed in the middle of a push."""
    cfg = cfg_for(tmp_path, "trainer.simulated.sync_latency_s=0.05")
    async with Supervisor.open(cfg) as sup:
        sup.stop()
        await sup.wait()
    from asyncpolicy.actors.synchronizer import ParameterSynchronizer
    from asyncpolicy.engines.simulated import SimulatedTransport

    rollouter = sup.rollouter
    paused_during_push: list[bool] = []

    class WatchedTransport(SimulatedTransport):  # the real simulated transport, recording pause state
        async def push(self, version: int) -> None:
            await super().push(version)
            paused_during_push.append(rollouter.paused)

    sync = ParameterSynchronizer(cfg.async_training, rollouter, WatchedTransport(sup.engines.generation, cfg.trainer.simulated))
    base = rollouter.version
    async with anyio.create_task_group() as tg:
        tg.start_soon(sync.sync, base + 2)
        await anyio.sleep(0.01)
        tg.start_soon(sync.sync, base + 1)
    assert rollouter.version == base + 2
    assert paused_during_push == [True]  # the older push was skipped; the newer one ran paused
    assert not rollouter.paused


async def test_weights_are_staged_while_rollout_runs_and_pushed_while_it_is_paused(tmp_path: Path) -> None:
    """Only the hand-over stops generation; the sync records how long it did (sync_pause_s in metrics)."""
    cfg = cfg_for(tmp_path, "trainer.total_training_steps=3")
    async with Supervisor.open(cfg) as sup:
        await sup.wait()
    from asyncpolicy.actors.synchronizer import ParameterSynchronizer
    from asyncpolicy.engines.simulated import SimulatedTransport

    rollouter = sup.rollouter
    seen: list[tuple[str, bool]] = []

    class WatchedTransport(SimulatedTransport):  # the real simulated transport, recording pause state
        async def stage(self, version: int) -> None:
            seen.append(("stage", rollouter.paused))
            await super().stage(version)

        async def push(self, version: int) -> None:
            seen.append(("push", rollouter.paused))
            await super().push(version)

    sync = ParameterSynchronizer(cfg.async_training, rollouter, WatchedTransport(sup.engines.generation, cfg.trainer.simulated))
    latency = (await sync.sync(rollouter.version + 1)).latency_s
    assert seen == [("stage", False), ("push", True)]
    c = sync.statistics().counters
    assert 0 < c.last_pause_s <= latency and c.last_stage_s + c.last_pause_s == pytest.approx(latency, abs=1e-3)

    rows = [msgspec.json.decode(line) for line in (tmp_path / "metrics.jsonl").read_bytes().splitlines()]
    assert len(rows) == 3 and all(r["sync_pause_s"] is not None and 0 <= r["sync_pause_s"] <= r["sync_latency_s"] for r in rows)


async def test_a_training_step_past_its_deadline_fails_the_run(tmp_path: Path) -> None:
    """A hung train step is not waited on forever: the run fails naming trainer.step_timeout_s."""
    cfg = cfg_for(tmp_path, "trainer.simulated.step_latency_s=30", "trainer.step_timeout_s=0.3")
    with anyio.fail_after(20):
        with pytest.raises(ActorFailed, match="trainer.step_timeout_s=0.3s") as info:
            await run(cfg)
    assert info.value.actor == "trainer"


def test_a_checkpoint_set_aside_for_replacement_survives_a_kill_between_the_renames(tmp_path: Path) -> None:
    """Killed after the old step-N was renamed aside but before the new one landed: it is put back."""
    root = checkpoint.checkpoint_root(tmp_path)
    aside = root / ".tmp-old-step-00000010-4242"
    aside.mkdir(parents=True)
    (aside / checkpoint.COMPLETE_MARKER).write_text("10\n")
    half = root / ".tmp-step-00000010-4242"
    half.mkdir()
    checkpoint.remove_stale_temporaries(tmp_path)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-00000010"]
    assert not half.exists()


async def test_throughput_after_resume_counts_only_the_resumed_process_work(tmp_path: Path) -> None:
    """Restored totals are not divided by the new process's short elapsed time."""
    await run(cfg_for(tmp_path, "trainer.total_training_steps=30"))
    async with Supervisor.open(cfg_for(tmp_path, "trainer.total_training_steps=32", "resume=auto")) as sup:
        await sup.wait()
    rows = [msgspec.json.decode(line) for line in (tmp_path / "metrics.jsonl").read_bytes().splitlines()]
    resumed = rows[-1]
    assert resumed["step"] == 32
    assert resumed["steps_per_s"] * resumed["elapsed_s"] == pytest.approx(2, abs=1e-6)
    assert 0 <= resumed["trainer_idle_ratio"] <= 1 and 0 <= resumed["rollouter_idle_ratio"] <= 1
