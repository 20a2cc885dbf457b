"""Agentic episodes stopped at a random moment, checkpointed, and resumed to the end (issue 19, items 3 and 7).

A Supervisor with simulated engines runs episodes of `episode_envs.HangingEnv` (random turns, tool
latencies and failures; now and then a tool that never answers, ended by `task.env_timeout_s`) with
random weight syncs, and is stopped — `Supervisor.stop()`, the graceful stop — at a moment drawn
without a clock: as the k-th tool call starts (the call is then cancelled by the run's cancel scope),
as the k-th generation starts, or after the k-th trained step. A second Supervisor resumes from the
checkpoint (`resume=auto`) and trains to the end. Whatever Hypothesis draws:

* the checkpoint holds the first half exactly: its queued samples equal, field by field (tokens,
  loss masks, logprobs, per-token versions), the ones the first half made; its in-flight groups are
  the ones the first half had started; its counters are the first half's;
* every prompt drawn in either half is trained once, queued, in flight or dropped as stale — each
  exactly once, by identity, a group re-queued by the stop counted once (`requeued` counts its
  replay); made = trained + dropped + queued, admitted = made + in flight;
* every trained episode keeps its masks aligned with its tokens, never-decreasing versions, the
  hard staleness bound, and exactly the tokens the engine sampled (no token re-encoded), whichever
  half made it;
* an episode whose tool call was cancelled is never lost: the stop's call leaves its group in
  flight (re-queued on resume); a hung call that timed out scores 0 with its error recorded and
  counted, or its group is in flight.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from episode_envs import RNG, TRIPWIRE  # type: ignore[import-not-found]  # tests/property, on the path under pytest
from episode_runs import RecordingGeneration, assert_episodes_whole, episode_configs  # type: ignore[import-not-found]
from hypothesis import event, given, register_random, settings
from hypothesis import strategies as st

from asyncpolicy import checkpoint
from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import EngineSet, GenerationRequest
from asyncpolicy.engines.simulated import SimulatedGenerationEngine, SimulatedTransport
from asyncpolicy.envs.loading import EpisodeSpec
from asyncpolicy.samples import Prompt, Sample
from asyncpolicy.supervisor import RunResult, Supervisor
from asyncpolicy.tasks.registry import simulated_task

register_random(RNG)
RUN_DEADLINE_S = 30.0
Uid = tuple[int, int]  # (epoch, index) of a training prompt


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@st.composite
def stop_configs(draw: st.DrawFn) -> list[str]:
    """The episode properties' runs, with hanging tools, checkpoints every few steps, and room to stop."""
    return [
        *draw(episode_configs(envs=("HangingEnv",))),
        "task.env_timeout_s=0.05",  # a hung call always ends: the outcome never depends on speed
        f"trainer.save_freq={draw(st.sampled_from([0, 1, 2]))}",
        f"trainer.total_training_steps={draw(st.integers(2, 6))}",
    ]


# where the first half is stopped: as the k-th tool call or generation starts, or after the k-th step
triggers = st.tuples(st.sampled_from(["tool_call", "generation", "step"]), st.integers(1, 12))


class Half(msgspec.Struct, kw_only=True):
    """One Supervisor's run and what it left: the recordings, and its state as the run ended."""

    sup: Any  # Supervisor
    result: RunResult
    generation: Any  # RecordingGeneration
    trainer: Any  # RecordingTrainEngine
    dropped: list[Sample]  # dropped as stale while it ran
    hung: list[Prompt]  # training or validation prompts whose tool call hung
    stopped_by: Uid | None  # the training prompt whose tool call or generation started as the trigger stopped the run
    queued: list[tuple[Sample, int]]
    in_flight: list[Prompt]


class Stopper:
    """Calls `sup.stop()` once, the k-th time `tick` is called, remembering whose call it was (None: a
    validation prompt's)."""

    def __init__(self, sup: Supervisor, k: int) -> None:
        self.sup, self.left = sup, k
        self.by: Uid | None = None

    def tick(self, by: Uid | None) -> None:
        self.left -= 1
        if self.left == 0:
            self.by = by
            self.sup.stop()

    def on_tool_call(self, prompt: Prompt) -> None:
        self.tick(None if prompt in self.sup.task.val else uid(prompt))

    def on_generate(self, request: GenerationRequest) -> None:
        tag, key = request.group.split("/")
        epoch, index = key.split(":")
        self.tick((int(epoch), int(index)) if tag == "train" else None)


@contextmanager
def recording_drops(sup: Supervisor, dropped: list[Sample]) -> Iterator[None]:
    """Record each sample the channel drops as stale (a spy on its callback: the rollouter still hears of it)."""
    notify = sup.rollouter.notify_dropped

    def spy(sample: Sample, version: int) -> None:
        dropped.append(sample)
        notify(sample, version)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sup.rollouter, "notify_dropped", spy)
        yield


async def stop_after_step(sup: Supervisor, k: int) -> None:
    async for row in sup.events():
        if row["step"] >= k:
            sup.stop()
            return


async def play(
    cfg: Config, rng: random.Random, recording_trainer: Callable[[Config], Any], trigger: tuple[str, int] | None
) -> Half:
    """One Supervisor from build to end, stopped by `trigger` (None: run to the end)."""
    kind, k = trigger or ("", 0)
    generation = RecordingGeneration(SimulatedGenerationEngine(cfg.rollout.simulated, rng))
    trainer = recording_trainer(cfg)
    engines: Any = EngineSet(generation=generation, trainer=trainer, transport=SimulatedTransport(generation.inner, cfg.trainer.simulated))
    dropped: list[Sample] = []
    with anyio.fail_after(RUN_DEADLINE_S):
        sup = await Supervisor.build(cfg, engines=engines)
        stopper = Stopper(sup, k)
        if kind == "tool_call":
            TRIPWIRE.on_step = stopper.on_tool_call
        elif kind == "generation":
            generation.on_generate = stopper.on_generate
        try:
            with recording_drops(sup, dropped):
                async with sup, anyio.create_task_group() as tg:
                    if kind == "step":
                        tg.start_soon(stop_after_step, sup, k)
                    result = await sup.wait()
        finally:
            hung = TRIPWIRE.hung
            TRIPWIRE.disarm()
    return Half(
        sup=sup, result=result, generation=generation, trainer=trainer, dropped=dropped, hung=hung,
        stopped_by=stopper.by, queued=list(sup.channel.snapshot().items),
        in_flight=[g.prompt for g in sup.rollouter.snapshot().in_flight],
    )


def uid(p: Prompt) -> Uid:
    return (p.epoch, p.index)


def trained(half: Half) -> list[Sample]:
    return [s for b in half.trainer.batches for s in b]


@pytest.mark.anyio
@given(overrides=stop_configs(), trigger=triggers, _seed=st.random_module())
async def test_an_episode_run_stopped_anywhere_and_resumed_loses_changes_and_repeats_nothing(
    overrides: list[str], trigger: tuple[str, int], _seed: object, sim_config: Callable[..., Config],
    hypothesis_random: random.Random, recording_trainer: Callable[[Config], Any],
) -> None:
    await stop_and_resume(overrides, trigger, sim_config, hypothesis_random, recording_trainer)


@pytest.mark.slow
@pytest.mark.anyio
@settings(max_examples=10 * settings().max_examples)
@given(overrides=stop_configs(), trigger=triggers, _seed=st.random_module())
async def test_an_episode_run_stopped_anywhere_and_resumed_many_examples(
    overrides: list[str], trigger: tuple[str, int], _seed: object, sim_config: Callable[..., Config],
    hypothesis_random: random.Random, recording_trainer: Callable[[Config], Any],
) -> None:
    await stop_and_resume(overrides, trigger, sim_config, hypothesis_random, recording_trainer)


async def stop_and_resume(
    overrides: list[str], trigger: tuple[str, int], sim_config: Callable[..., Config],
    rng: random.Random, recording_trainer: Callable[[Config], Any],
) -> None:
    with tempfile.TemporaryDirectory() as out:
        cfg = sim_config(*overrides, output_dir=out)
        first = await play(cfg, rng, recording_trainer, trigger)
        path = checkpoint.latest_checkpoint(Path(out))
        assert path is not None, "the first half wrote no checkpoint"
        saved = checkpoint.load_state(path)
        second = await play(sim_config(*overrides, "resume=auto", output_dir=out), rng, recording_trainer, None)

    event(f"first half stopped={not first.result.finished}, groups in flight then: {min(3, len(first.in_flight))} (3: or more)")
    event(f"the stop cancelled a training episode's call: {first.stopped_by is not None}")
    event(f"hung tool calls: {min(3, len(first.hung) + len(second.hung))} (3: or more)")
    # the checkpoint is the first half as it ended, field by field
    assert saved.reason == ("finished" if first.result.finished else "stop")
    assert saved.channel.items == first.queued, "a queued episode's tokens, masks or versions changed in the checkpoint"
    assert [g.prompt for g in saved.in_flight] == first.in_flight
    assert saved.rollout == first.sup.rollouter.statistics().counters
    assert saved.trainer.step == first.result.steps

    # every trained episode is whole, whichever half made it
    spec = second.sup.task.episodes
    assert isinstance(spec, EpisodeSpec)
    made_first = {uid(s.prompt) for s, _ in first.queued}  # trained by the second half, made by the first

    def made_by(s: Sample) -> dict[str, list[int]]:  # the recording of the engine that made a sample
        return first.generation.sampled if uid(s.prompt) in made_first else second.generation.sampled

    for half, sampled in ((first, lambda _: first.generation.sampled), (second, made_by)):
        for (version, _), batch in zip(half.trainer.steps, half.trainer.batches, strict=True):
            assert_episodes_whole(batch, version, cfg, spec, sampled)

    # every prompt drawn in either half is in exactly one place; a re-queued group counted once
    result, stats = second.result, second.sup.rollouter.statistics()
    assert result.finished and result.steps == cfg.trainer.total_training_steps
    assert result.trained == cfg.trainer.total_training_steps * cfg.data.train_batch_size
    assert result.made == result.trained + result.dropped_stale + result.queued
    assert stats.counters.admitted == result.made + result.in_flight
    cursor = second.sup.task.train.state()
    source = simulated_task(cfg).train
    drawn = sorted(uid(source.next()) for _ in range(cursor.epoch * cfg.task.num_prompts + cursor.position))
    places = sorted(
        [uid(s.prompt) for s in (*trained(first), *trained(second), *first.dropped, *second.dropped)]
        + [uid(s.prompt) for s, _ in second.queued] + [uid(p) for p in second.in_flight]
    )
    assert places == drawn, "a drawn prompt was lost, or is in two places (trained, queued, in flight, dropped)"
    replayed = stats.counters.requeued - saved.rollout.requeued
    made_second = {uid(s.prompt) for s in (*trained(second), *second.dropped)} | {uid(s.prompt) for s, _ in second.queued}
    assert len(made_second & {uid(p) for p in first.in_flight}) <= replayed <= len(first.in_flight)

    # a cancelled tool call loses nothing: the stop's own call leaves its group in flight, a timed-out
    # one scores 0 with its error recorded and counted (or its group is still in flight)
    if first.stopped_by is not None:
        assert first.stopped_by in {uid(p) for p in first.in_flight}, "the group the stop cancelled was not kept"
    made = {
        uid(s.prompt): s
        for s in (*trained(first), *trained(second), *first.dropped, *second.dropped, *(s for s, _ in second.queued))
    }
    for half in (first, second):
        in_flight = {uid(p) for p in half.in_flight}
        for p in half.hung:
            if p in second.sup.task.val or uid(p) in in_flight:
                continue
            assert any("timed out" in t.reward_error for t in made[uid(p)].trajectories), "a hung tool call's episode was lost"
    errors = sum(bool(t.reward_error) for s in (*trained(first), *trained(second)) for t in s.trajectories)
    assert stats.counters.env_errors >= errors
