"""Each actor owns its state: snapshot() / restore() / statistics() round-trips, and counts that
continue after a restore; a checkpoint of format 1 (what earlier versions wrote) still loads."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from asyncpolicy import checkpoint
from asyncpolicy.actors.rollouter import InFlight, RolloutCounters
from asyncpolicy.actors.synchronizer import ParameterSynchronizer, SyncCounters
from asyncpolicy.actors.trainer import StepReport, Trainer, TrainerSnapshot
from asyncpolicy.channels import VersionedChannel
from asyncpolicy.config import Config
from asyncpolicy.engines.generation.replicas import ReplicaCounters, ReplicatedGeneration
from asyncpolicy.engines.simulated import SimulatedGenerationEngine, SimulatedTrainEngine, SimulatedTransport
from asyncpolicy.samples import Sample
from asyncpolicy.tasks.registry import simulated_task

pytestmark = pytest.mark.anyio

Make = Callable[..., Any]


async def produce(rollouter: Any, channel: VersionedChannel[Sample], made: int, *, uids: frozenset[str] = frozenset()) -> None:
    """Run the rollouter until the channel has had `made` samples in all and holds those of `uids`,
    then stop it mid-flight."""
    async with anyio.create_task_group() as tg:
        await tg.start(rollouter.run)
        with anyio.fail_after(10):
            while channel.statistics().produced < made or not uids <= {s.prompt.uid for s, _ in channel.snapshot().items}:
                await anyio.sleep(0.002)
        tg.cancel_scope.cancel()


async def test_a_restored_rollouter_has_equal_statistics_and_makes_its_in_flight_groups(
    sim_config: Make, rollouter_for: Make
) -> None:
    cfg = sim_config("async_training.staleness_threshold=3", "data.train_batch_size=8", "async_training.max_queue_size=32", "rollout.n=2",
                     "rollout.simulated.failure_rate=0.2", "rollout.max_retries=50")
    rollouter, engine, channel = rollouter_for(cfg)
    await engine.start()
    await produce(rollouter, channel, 5)
    snap = rollouter.snapshot()
    assert snap.in_flight, "nothing was in flight at the cut: the test would prove nothing"
    assert snap.counters.admitted == channel.statistics().produced + len(snap.in_flight)

    task = simulated_task(cfg)
    for _ in range(snap.counters.admitted):  # the prompt source continues where the first one stopped
        task.train.next()
    fresh_channel: VersionedChannel[Sample] = VersionedChannel(32, 3)
    fresh_channel.restore(channel.snapshot())
    restored = type(rollouter)(cfg, engine, fresh_channel, task.train, task.scorer)
    restored.restore(snap)
    assert restored.snapshot() == snap
    before, after = rollouter.statistics(), restored.statistics()
    assert (after.counters, after.in_flight, after.running) == (before.counters, before.in_flight, 0)

    replayed = frozenset(g.prompt.uid for g in snap.in_flight)
    await produce(restored, fresh_channel, channel.statistics().produced + len(snap.in_flight) + 2, uids=replayed)
    made = [s.prompt.uid for s, _ in fresh_channel.snapshot().items]
    assert len(made) == len(set(made)), "a group was made twice"
    counts = restored.statistics().counters
    new_groups = counts.admitted - snap.counters.admitted
    assert new_groups >= 2, "a replayed group was counted as admitted again, or nothing new was admitted"
    assert counts.admitted == fresh_channel.statistics().produced + restored.statistics().in_flight
    assert counts.completed > snap.counters.completed and counts.generations > snap.counters.generations
    assert counts.retried >= snap.counters.retried and counts.tokens > snap.counters.tokens


async def test_restore_refuses_an_actor_that_has_run(sim_config: Make, rollouter_for: Make) -> None:
    cfg = sim_config("async_training.max_queue_size=32")
    rollouter, engine, channel = rollouter_for(cfg)
    await engine.start()
    await produce(rollouter, channel, 1)
    with pytest.raises(RuntimeError, match="needs a fresh rollouter"):
        rollouter.restore(rollouter.snapshot())
    replicas = ReplicatedGeneration([SimulatedGenerationEngine(cfg.rollout.simulated, random.Random(0))], max_restarts=0)
    replicas.restore(ReplicaCounters(failovers=2))
    with pytest.raises(RuntimeError, match="needs a fresh replica set"):
        replicas.restore(ReplicaCounters())


def trainer_parts(cfg: Config, rollouter_for: Make, engine: Any) -> tuple[Any, VersionedChannel[Sample], ParameterSynchronizer, Any]:
    rollouter, _, channel = rollouter_for(cfg, engine=engine)
    sync = ParameterSynchronizer(cfg.async_training, rollouter, SimulatedTransport(engine, cfg.trainer.simulated))
    return rollouter, channel, sync, SimulatedTrainEngine(cfg.trainer.simulated)


async def train(cfg: Config, trainer: Trainer, rollouter: Any) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(rollouter.run)
        with anyio.fail_after(10):
            await trainer.run()
        tg.cancel_scope.cancel()


async def test_trainer_and_synchronizer_restored_continue_their_counts(sim_config: Make, rollouter_for: Make) -> None:
    cfg = sim_config("trainer.total_training_steps=3", "async_training.max_queue_size=32")
    reports: list[StepReport] = []
    engine = SimulatedGenerationEngine(cfg.rollout.simulated, random.Random(cfg.seed))
    await engine.start()
    rollouter, channel, sync, train_engine = trainer_parts(cfg, rollouter_for, engine)
    trainer = Trainer(cfg, train_engine, channel, sync, reports.append)
    await train(cfg, trainer, rollouter)
    t_snap, s_snap = trainer.snapshot(), sync.snapshot()
    assert (t_snap.step, t_snap.version, s_snap.syncs) == (3, 3, 3) and t_snap.idle_s > 0

    more = sim_config("trainer.total_training_steps=5", "async_training.max_queue_size=32")
    # the same generation engine: it serves version 3 already, as after a resume's forced sync
    rollouter2, channel2, sync2, train_engine2 = trainer_parts(more, rollouter_for, engine)
    trainer2 = Trainer(more, train_engine2, channel2, sync2, reports.append)
    trainer2.restore(t_snap)
    sync2.restore(s_snap)
    restored_t, restored_s = trainer2.statistics(), sync2.statistics()
    original_t = trainer.statistics()
    assert (restored_t.step, restored_t.version, restored_t.idle_s) == (original_t.step, original_t.version, original_t.idle_s)
    assert restored_s == sync.statistics()
    assert trainer2.snapshot() == t_snap and sync2.snapshot() == s_snap

    await train(more, trainer2, rollouter2)
    assert [r.step for r in reports] == [1, 2, 3, 4, 5] and [r.version for r in reports] == [1, 2, 3, 4, 5]
    after = sync2.statistics().counters
    assert after.syncs == 5 and after.total_latency_s > s_snap.total_latency_s
    assert trainer2.statistics().idle_s >= t_snap.idle_s
    with pytest.raises(RuntimeError, match="needs a fresh trainer"):
        trainer2.restore(t_snap)
    with pytest.raises(RuntimeError, match="needs a fresh synchronizer"):
        sync2.restore(s_snap)


def test_statistics_and_snapshots_are_frozen_values(sim_config: Make, rollouter_for: Make) -> None:
    """Nothing outside an actor can write its state, and a view taken earlier never changes."""
    rollouter, _, _ = rollouter_for(sim_config())
    for value in (rollouter.snapshot(), rollouter.statistics(), rollouter.statistics().counters):
        field = msgspec.structs.fields(value)[0].name
        with pytest.raises(AttributeError):
            setattr(value, field, 1)


async def one_sample(cfg: Config, rollouter_for: Make) -> Sample:
    rollouter, engine, channel = rollouter_for(cfg)
    await engine.start()
    await produce(rollouter, channel, 1)
    sample = channel.get_nowait(0)
    assert sample is not None
    return sample


def format_1_state(sample: Sample) -> dict[str, Any]:
    """A state.msgpack as format 1 lays it out (field by field, as earlier versions wrote it)."""
    return {
        "format_version": 1,
        "trainer": {"step": 7, "version": 7, "staleness_max": 1, "idle_s": 0.5},
        "rollout": {"admitted": 40, "completed": 38, "generations": 80, "interrupted": 3, "retried": 1,
                    "timeouts": 0, "reward_errors": 2, "tokens": 900},
        "sync": {"syncs": 7, "failed_attempts": 1, "last_latency_s": 0.01, "total_latency_s": 0.07,
                 "last_stage_s": 0.001, "last_rollout_pause_s": 0.002, "last_push_s": 0.003, "last_pause_s": 0.005},
        "cursor": {"seed": 0, "epoch": 1, "position": 4},
        "channel": {"items": [[msgspec.to_builtins(sample), 6]], "produced": 38, "consumed": 28, "dropped_stale": 9,
                    "consumer_version": 7, "age_sum": 20.0, "age_min": 0.0, "age_max": 1.0},
        "in_flight": [{"prompt": msgspec.to_builtins(sample.prompt), "start_version": 7}],
        "rng_state": [3, [1, 2, 3], None],
        "reason": "stop",
        "replicas": {"failovers": 4, "restarts": 1, "downs": 1},
    }


async def test_a_format_1_checkpoint_loads_into_every_actors_snapshot(tmp_path: Path, sim_config: Make, rollouter_for: Make) -> None:
    sample = await one_sample(sim_config("async_training.max_queue_size=32"), rollouter_for)
    written = format_1_state(sample)
    fields = {f.name for f in msgspec.structs.fields(checkpoint.CursorState)}
    assert set(written["cursor"]) == fields, "the test's cursor layout is not the one checkpoints use"
    (tmp_path / checkpoint.STATE_FILE).write_bytes(msgspec.msgpack.encode(written))
    (tmp_path / checkpoint.COMPLETE_MARKER).write_text("7\n")
    state = checkpoint.load_state(tmp_path)
    assert state.trainer == TrainerSnapshot(step=7, version=7, idle_s=0.5)
    assert state.rollouter.counters == RolloutCounters(**written["rollout"])
    assert state.rollouter.in_flight == (InFlight(prompt=sample.prompt, start_version=7),)
    assert state.sync == SyncCounters(**written["sync"]) and state.replicas == ReplicaCounters(**written["replicas"])
    assert state.channel.items[0][0].prompt.uid == sample.prompt.uid
    assert state.channel.age_max == 1.0  # the run's staleness_max continues from the channel's
    # what this version writes: format 1's layout, less the staleness fields that were not the channel's
    again = checkpoint.RunState.of(
        trainer=state.trainer, rollouter=state.rollouter, sync=state.sync, cursor=state.cursor, channel=state.channel,
        rng_state=state.rng_state, reason=state.reason, replicas=state.replicas,
    )
    now = msgspec.msgpack.decode(checkpoint.encode_state(again))
    # autotune's controller state and the validator's history are new fields with defaults (None: autotune
    # off, no validator given; an older checkpoint loads with None): format 2 still
    assert now["format_version"] == checkpoint.FORMAT_VERSION == 2 and set(now) == set(written) | {"autotune", "validator"}
    assert now["autotune"] is None and now["validator"] is None and state.validator is None
    assert set(now["trainer"]) == set(written["trainer"]) - {"staleness_max"}
    assert set(now["channel"]) == set(written["channel"]) - {"age_sum", "age_min"} | {"sample_age_mean", "sample_age_max"}
    # the rollout counts gained the agentic episodes' (format 2 still: a new field has a default)
    new = {"episodes", "turns", "env_tokens", "env_calls", "env_seconds", "tool_calls", "env_errors", "requeued"}
    assert set(now["rollout"]) == set(written["rollout"]) | new and all(now["rollout"][k] == 0 for k in new)
    assert {k: v for k, v in now["rollout"].items() if k not in new} == written["rollout"]
    # the sync counts gained the generations running at the last sync (a default: format 2 still)
    assert now["sync"] == {**written["sync"], "last_in_flight": 0}
    for key in ("cursor", "in_flight", "rng_state", "reason", "replicas"):
        assert now[key] == written[key], key


async def test_a_checkpoint_of_a_newer_format_is_refused_naming_it(tmp_path: Path, sim_config: Make, rollouter_for: Make) -> None:
    sample = await one_sample(sim_config("async_training.max_queue_size=32"), rollouter_for)
    newer = {**format_1_state(sample), "format_version": checkpoint.FORMAT_VERSION + 1}
    (tmp_path / checkpoint.STATE_FILE).write_bytes(msgspec.msgpack.encode(newer))
    (tmp_path / checkpoint.COMPLETE_MARKER).write_text("1\n")
    with pytest.raises(checkpoint.ConfigError, match=f"checkpoint format {checkpoint.FORMAT_VERSION + 1}; this asyncpolicy reads formats 1 to {checkpoint.FORMAT_VERSION}"):
        checkpoint.load_state(tmp_path)
