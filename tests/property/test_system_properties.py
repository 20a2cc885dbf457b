"""Whole-system properties: a Supervisor with simulated engines, random small configs, random timing.

The simulated generation engine draws its latencies and token counts from a Random registered
with Hypothesis (`st.random_module()` seeds it per example, together with trio's scheduler), so
completion orders are explored and a failure replays. For any staleness threshold 0..3, batch,
queue, group size, concurrency, sync period and partial-rollout setting, and any sequence of user
pause()/resume() calls at random moments, a run must:

* train every batch within the staleness bound (metrics.jsonl and the batches themselves);
* account for every sample: made == trained + dropped_stale + queued; trained == steps × batch;
* bump the version once per step and sync weights every trigger_parameter_sync_step steps;
* never admit more than AReaL's capacity rule allows:
  in flight + queued + consumed <= (staleness_threshold + 1 + version) × batch;
* keep all of that while the admission window (groups generating at once) is moved at random
  moments, never deadlock, and return every admission token;
* keep the hard bound and the accounting while a controller moves the window and the effective
  staleness at random moments, and while the autotune controller itself runs on any small config;
* lose no prompt: each one drawn is trained, queued, in flight or counted as dropped — once;
* keep all of that when the generation engine keeps dying and is restarted (fault injection).
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncpolicy.config import Config
from asyncpolicy.supervisor import RunResult, Supervisor
from asyncpolicy.tasks.registry import simulated_task

RUN_DEADLINE_S = 20.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@st.composite
def small_configs(draw: st.DrawFn) -> list[str]:
    threshold = draw(st.integers(0, 3), label="staleness_threshold")
    batch = draw(st.integers(1, 4), label="train_batch_size")
    return [
        f"async_training.staleness_threshold={threshold}",
        f"data.train_batch_size={batch}",
        f"async_training.max_queue_size={draw(st.integers(batch, 3 * batch))}",
        f"rollout.n={draw(st.integers(1, 3))}",
        f"rollout.max_concurrency={draw(st.integers(1, 8))}",
        f"async_training.trigger_parameter_sync_step={draw(st.integers(1, threshold + 1))}",
        f"async_training.partial_rollout={draw(st.booleans())}",
        f"trainer.total_training_steps={draw(st.integers(1, 8))}",
        f"rollout.simulated.mean_latency_s={draw(st.sampled_from([0.0, 0.0005, 0.002, 0.004]))}",
        f"rollout.simulated.latency_sigma={draw(st.sampled_from([0.0, 0.5, 1.5]))}",
        f"trainer.simulated.step_latency_s={draw(st.sampled_from([0.0, 0.001, 0.004]))}",
        f"data.max_response_length={draw(st.integers(1, 8))}",
        f"seed={draw(st.integers(0, 3))}",
        f"trainer.test_freq={draw(st.sampled_from([0, 0, 1, 3]))}",
    ]


def admission_checker(sup_box: list[Supervisor], cfg: Config, violations: list[str]) -> Callable[[Any], None]:
    """Called as each generation starts: AReaL's capacity rule must hold at that moment."""

    def check(request: Any) -> None:
        sup = sup_box[0]
        chan = sup.channel.statistics()
        live = sup.rollouter.statistics().in_flight + chan.size + chan.consumed
        version = sup.rollouter.version
        limit = (cfg.async_training.staleness_threshold + 1 + version) * cfg.data.train_batch_size
        if live > limit:
            violations.append(f"{request.request_id}: in flight + queued + consumed = {live} > {limit} at version {version}")

    return check


def prompts_accounted_for(sup: Supervisor, cfg: Config, trained: list[tuple[int, int]]) -> None:
    """No data loss, by identity: every prompt drawn from the source is trained, queued, still in
    flight, or (exactly result.dropped_stale of them) dropped as stale; none is in two places."""
    cursor = sup.task.train.state()
    source = simulated_task(cfg).train
    drawn = [(p.epoch, p.index) for p in (source.next() for _ in range(cursor.epoch * cfg.task.num_prompts + cursor.position))]
    queued = [(s.prompt.epoch, s.prompt.index) for s, _ in sup.channel.snapshot().items]
    in_flight = [(g.prompt.epoch, g.prompt.index) for g in sup.rollouter.snapshot().in_flight]
    seen = trained + queued + in_flight
    assert len(set(seen)) == len(seen), "a prompt is in two places (trained, queued, in flight)"
    assert set(seen) <= set(drawn), "a prompt appeared that was never drawn"
    assert len(set(drawn) - set(seen)) == sup.channel.statistics().dropped_stale, "a drawn prompt was lost"


def assert_run_ended_whole(cfg: Config, result: RunResult, violations: list[str], sup: Supervisor, recorder: Any) -> None:
    """What every run here ends with: no violation seen while it ran, every step trained, every sample
    (made = trained + dropped + queued) and every drawn prompt accounted for."""
    assert not violations, violations[:3]
    assert result.finished and result.trained == cfg.trainer.total_training_steps * cfg.data.train_batch_size
    assert result.made == result.trained + result.dropped_stale + result.queued
    prompts_accounted_for(sup, cfg, trained_prompts(recorder))


controls = st.lists(st.tuples(st.sampled_from([0.0, 0.001, 0.004]), st.sampled_from(["pause", "resume"])), max_size=6)


Action = str | int | tuple[str, int]  # "pause"/"resume", a window in groups, ("staleness", limit)


async def drive(sup: Supervisor, script: list[tuple[float, Action]], answers: list[object]) -> None:
    """A user pausing and resuming (and moving the admission window to an int's groups, the
    effective staleness to a ("staleness", k)'s k) at random moments; always resumed at the end so
    the run can finish."""
    for delay, action in script:
        await anyio.sleep(delay)
        if isinstance(action, int):
            sup.rollouter.set_admission_window(action)
        elif isinstance(action, tuple):
            sup.channel.set_staleness_limit(action[1])
        else:
            answers.append(await (sup.pause() if action == "pause" else sup.resume()))
    answers.append(await sup.resume())


async def run_supervised(
    cfg: Config, engines: Any, sup_box: list[Supervisor], script: list[tuple[float, Action]], answers: list[object]
) -> tuple[RunResult, list[dict[str, Any]]]:
    with anyio.fail_after(RUN_DEADLINE_S):
        sup = await Supervisor.build(cfg, engines=engines)
        sup_box.append(sup)  # before entering: generations start inside __aenter__
        async with sup, anyio.create_task_group() as tg:
            tg.start_soon(drive, sup, script, answers)
            result = await sup.wait()
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def trained_prompts(recorder: Any) -> list[tuple[int, int]]:
    return [(e, i) for _, b in recorder.steps for e, i, *_ in b]


@pytest.mark.anyio
@settings(max_examples=2 * settings().max_examples)  # 50 runs of ~0.1-0.3 s
@given(overrides=small_configs(), script=controls, _seed=st.random_module())
async def test_any_small_run_keeps_staleness_accounting_and_admission(
    overrides: list[str],
    script: list[tuple[float, Action]],
    _seed: object,
    sim_config: Callable[..., Config],
    engines_for: Callable[..., Any],
    hypothesis_random: random.Random,
) -> None:
    """Every trained sample within the bound; conservation; one version per step; admission rule —
    with a user pausing and resuming at random moments (each call returns True)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = sim_config(*overrides, output_dir=out)
        violations: list[str] = []
        sup_box: list[Supervisor] = []
        engines, recorder = engines_for(cfg, hypothesis_random, on_generate=admission_checker(sup_box, cfg, violations))
        answers: list[object] = []
        result, rows = await run_supervised(cfg, engines, sup_box, script, answers)

    at, steps, batch = cfg.async_training, cfg.trainer.total_training_steps, cfg.data.train_batch_size
    assert not violations, violations[:3]
    assert answers == [True] * (len(script) + 1), "pause()/resume() must return True"
    # the staleness bound, as the metrics report it ...
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["param_version"] for r in rows] == list(range(1, steps + 1))
    assert all(r["sample_age_max"] <= at.staleness_threshold for r in rows), [r["sample_age_max"] for r in rows]
    assert all(r["staleness_max"] <= at.staleness_threshold for r in rows)
    # ... and as the trained batches show it, from the tokens' own versions
    assert [version for version, _ in recorder.steps] == list(range(steps))
    for version, batch_rows in recorder.steps:
        assert len(batch_rows) == batch
        for _epoch, _index, min_v, max_v, oldest_token in batch_rows:
            assert min_v <= oldest_token and min_v <= max_v
            assert version - min_v <= at.staleness_threshold
            assert version - oldest_token <= at.staleness_threshold
    prompts_accounted_for(sup_box[0], cfg, trained_prompts(recorder))
    # accounting
    assert result.finished and result.steps == steps
    assert result.made == result.trained + result.dropped_stale + result.queued
    assert result.trained == steps * batch
    assert result.param_version == steps
    assert result.rollout_version == steps - steps % at.trigger_parameter_sync_step


window_moves = st.lists(
    st.tuples(st.sampled_from([0.0, 0.001, 0.004]), st.one_of(st.integers(1, 6), st.sampled_from(["pause", "resume"]))),
    min_size=1,
    max_size=8,
).filter(lambda script: any(isinstance(action, int) for _, action in script))


def window_checker(sup_box: list[Supervisor], ceiling: int, violations: list[str], then: Callable[[Any], None]) -> Callable[[Any], None]:
    """As each generation starts: never more groups generating than the largest window ever set."""

    def check(request: Any) -> None:
        stats = sup_box[0].rollouter.statistics()
        if stats.generating > ceiling:
            violations.append(f"{request.request_id}: {stats.generating} groups generating > every window set ({ceiling})")
        then(request)

    return check


@pytest.mark.anyio
@given(overrides=small_configs(), script=window_moves, _seed=st.random_module())
async def test_moving_the_admission_window_at_random_moments_keeps_staleness_and_accounting(
    overrides: list[str],
    script: list[tuple[float, Action]],
    _seed: object,
    sim_config: Callable[..., Config],
    engines_for: Callable[..., Any],
    hypothesis_random: random.Random,
) -> None:
    """The window (groups generating at once) moved up and down while the run goes on: no deadlock
    (the run ends within its deadline), the staleness bound and the admission rule hold, every
    admitted group is made or in flight, and every admission token is returned at the end."""
    with tempfile.TemporaryDirectory() as out:
        cfg = sim_config(*overrides, output_dir=out)
        violations: list[str] = []
        sup_box: list[Supervisor] = []
        initial = max(1, cfg.rollout.max_concurrency // cfg.rollout.n)
        ceiling = max([initial, *(a for _, a in script if isinstance(a, int))])
        check = window_checker(sup_box, ceiling, violations, admission_checker(sup_box, cfg, violations))
        engines, recorder = engines_for(cfg, hypothesis_random, on_generate=check)
        answers: list[object] = []
        result, rows = await run_supervised(cfg, engines, sup_box, script, answers)

    at = cfg.async_training
    assert_run_ended_whole(cfg, result, violations, sup_box[0], recorder)
    assert all(answer is True for answer in answers)
    assert all(r["sample_age_max"] <= at.staleness_threshold for r in rows)
    assert all(version - min_v <= at.staleness_threshold for version, b in recorder.steps for _, _, min_v, _, _ in b)
    stats = sup_box[0].rollouter.statistics()
    assert stats.counters.admitted == result.made + result.in_flight
    assert stats.generating == 0, "an admission token was not returned"
    moves = [a for _, a in script if isinstance(a, int)]
    assert stats.admission_window == moves[-1]


@pytest.mark.anyio
@settings(max_examples=settings().max_examples)
@given(
    overrides=small_configs(),
    die_after=st.integers(12, 30),
    failure_rate=st.sampled_from([0.0, 0.1]),
    _seed=st.random_module(),
)
async def test_engine_failures_and_restarts_lose_no_prompt(
    overrides: list[str],
    die_after: int,
    failure_rate: float,
    _seed: object,
    sim_config: Callable[..., Config],
    engines_for: Callable[..., Any],
    hypothesis_random: random.Random,
) -> None:
    """A generation engine that fails requests and dies every few requests is retried and restarted;
    the run still finishes with every prompt accounted for and every batch within the bound."""
    with tempfile.TemporaryDirectory() as out:
        cfg = sim_config(
            *overrides,
            # Progress needs some group to finish within one engine lifetime: at most 4 + n - 1
            # trajectories run at once, each tried at most twice, so >= 12 requests per lifetime.
            "rollout.max_concurrency=4",
            f"rollout.simulated.die_after_requests={die_after}",
            f"rollout.simulated.failure_rate={failure_rate}",
            "rollout.max_retries=1",
            "rollout.max_restarts=10000",
            "trainer.test_freq=0",  # validation under a dying engine: tests/unit/test_supervisor.py
            output_dir=out,
        )
        violations: list[str] = []
        sup_box: list[Supervisor] = []
        engines, recorder = engines_for(cfg, hypothesis_random, on_generate=admission_checker(sup_box, cfg, violations))
        result, rows = await run_supervised(cfg, engines, sup_box, [], [])

    at, steps = cfg.async_training, cfg.trainer.total_training_steps
    assert_run_ended_whole(cfg, result, violations, sup_box[0], recorder)
    assert all(version - min_v <= at.staleness_threshold for version, b in recorder.steps for _, _, min_v, _, _ in b)
    assert len(rows) == steps


limit_moves = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.001, 0.004]),
        st.one_of(st.integers(1, 6), st.tuples(st.just("staleness"), st.integers(0, 3)), st.sampled_from(["pause", "resume"])),
    ),
    min_size=1,
    max_size=10,
)


def within_controller_bounds(script: list[tuple[float, Action]], cfg: Config) -> list[tuple[float, Action]]:
    """Staleness moves clipped to where a controller may put them: trigger_parameter_sync_step - 1
    (below it every sample goes stale between syncs) up to the hard staleness_threshold."""
    at = cfg.async_training
    low = at.trigger_parameter_sync_step - 1
    return [
        (d, ("staleness", min(at.staleness_threshold, max(low, a[1]))) if isinstance(a, tuple) else a) for d, a in script
    ]


@pytest.mark.anyio
@given(overrides=small_configs(), script=limit_moves, _seed=st.random_module())
async def test_a_controller_moving_window_and_staleness_at_random_moments_keeps_the_hard_bound(
    overrides: list[str],
    script: list[tuple[float, Action]],
    _seed: object,
    sim_config: Callable[..., Config],
    engines_for: Callable[..., Any],
    hypothesis_random: random.Random,
) -> None:
    """The window and the effective staleness moved up and down at random moments (as autotune
    moves them): the run ends within its deadline (no deadlock), no batch is older than the hard
    staleness_threshold, admission stays within the hard rule, the accounting holds, no prompt is
    lost and every admission token comes back."""
    with tempfile.TemporaryDirectory() as out:
        cfg = sim_config(*overrides, output_dir=out)
        script = within_controller_bounds(script, cfg)
        violations: list[str] = []
        sup_box: list[Supervisor] = []
        engines, recorder = engines_for(cfg, hypothesis_random, on_generate=admission_checker(sup_box, cfg, violations))
        answers: list[object] = []
        result, rows = await run_supervised(cfg, engines, sup_box, script, answers)

    at, sup = cfg.async_training, sup_box[0]
    assert_run_ended_whole(cfg, result, violations, sup, recorder)
    assert all(r["sample_age_max"] <= at.staleness_threshold for r in rows)
    assert all(version - oldest <= at.staleness_threshold for version, b in recorder.steps for *_, oldest in b)
    assert sup.rollouter.statistics().counters.admitted == result.made + result.in_flight
    assert sup.rollouter.statistics().generating == 0, "an admission token was not returned"
    limits = [a[1] for _, a in script if isinstance(a, tuple)]
    assert sup.channel.statistics().staleness_limit == (limits[-1] if limits else at.staleness_threshold)


@pytest.mark.anyio
@given(
    overrides=small_configs(),
    every=st.integers(1, 3),
    window_bounds=st.tuples(st.integers(1, 4), st.integers(1, 8)).map(sorted),
    _seed=st.random_module(),
)
async def test_the_autotune_controller_keeps_the_hard_bound_and_the_accounting(
    overrides: list[str],
    every: int,
    window_bounds: list[int],
    _seed: object,
    sim_config: Callable[..., Config],
    engines_for: Callable[..., Any],
    hypothesis_random: random.Random,
) -> None:
    """autotune=true on any small run: it finishes (no deadlock), trains nothing older than the hard
    bound, keeps admission within the hard rule and the accounting, and its limits stay in bounds."""
    low, high = window_bounds
    with tempfile.TemporaryDirectory() as out:
        cfg = sim_config(
            *overrides,
            "async_training.autotune=true",
            f"async_training.autotune_every_steps={every}",
            f"async_training.autotune_min_window={low}",
            f"async_training.autotune_max_window={high}",
            output_dir=out,
        )
        violations: list[str] = []
        sup_box: list[Supervisor] = []
        engines, recorder = engines_for(cfg, hypothesis_random, on_generate=admission_checker(sup_box, cfg, violations))
        result, rows = await run_supervised(cfg, engines, sup_box, [], [])

    at = cfg.async_training
    assert_run_ended_whole(cfg, result, violations, sup_box[0], recorder)
    assert all(version - oldest <= at.staleness_threshold for version, b in recorder.steps for *_, oldest in b)
    for r in rows:
        assert low <= r["autotune/window"] <= high
        assert min(at.staleness_threshold, at.trigger_parameter_sync_step - 1) <= r["autotune/staleness"] <= at.staleness_threshold
