"""The autotune controller's rules (a pure function, tested alone) and the knobs it moves."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncpolicy.autotune.policy import (
    BAR_INTERVALS,
    CALM,
    LOSS,
    PERSIST,
    SETTLE,
    SPREAD_KL,
    Bounds,
    Limits,
    Memory,
    Observation,
    bounds_for,
    decide,
)
from asyncpolicy.channels import VersionedChannel
from asyncpolicy.config import Config

BOUNDS = Bounds(min_window=1, max_window=64, min_staleness=1, max_staleness=4)
ON_POLICY_OK = Bounds(min_window=1, max_window=64, min_staleness=0, max_staleness=4)  # a sync every step


def obs(**fields: object) -> Observation:
    """An interval in which nothing calls for a move (balanced: idle between FED and STARVED)."""
    base = dict(steps=4, seconds=1.0, trainer_idle=0.05, window_full=0.0, room_exhausted=0.0, queue_full=0.0,
                stale_drops=0, age_max=1.0, syncing=False, paused=False)
    return Observation(**{**base, **fields})  # type: ignore[arg-type]


def run(observations: list[Observation], limits: Limits, bounds: Bounds = BOUNDS) -> list[Limits]:
    memory, out = Memory(), []
    for o in observations:
        d = decide(o, limits, bounds, memory)
        limits, memory = d.limits, d.memory
        out.append(limits)
    return out


def test_no_move_during_a_sync_or_a_pause_and_the_memory_is_kept() -> None:
    limits, memory = Limits(window=8, staleness=1), Memory(interval=3, starved=5)
    for o in (obs(syncing=True, stale_drops=9, trainer_idle=0.9), obs(paused=True, stale_drops=9)):
        d = decide(o, limits, BOUNDS, memory)
        assert d.limits == limits and d.memory == memory


def test_stale_drops_raise_the_staleness_one_step_up_to_the_hard_bound() -> None:
    got = run([obs(stale_drops=3, trained=32)] * 5, Limits(window=8, staleness=1))
    # one notch an interval: each raise judged on the next interval (kept: same throughput), then raised again
    assert [lim.staleness for lim in got] == [2, 3, 4, 4, 4]
    assert run([obs(stale_drops=1, trained=32)] * 5, Limits(window=8, staleness=1))[-1].staleness == 1  # 3 %: tolerated


def test_a_raise_for_stale_drops_that_costs_throughput_is_undone_and_the_drops_are_tolerated() -> None:
    dropping = obs(stale_drops=3, trained=32, trainer_idle=0.0, steps=8)
    slower = obs(stale_drops=0, trained=32, trainer_idle=0.0, steps=6)  # -25 %: the work of more in flight
    seq = [dropping, slower] + [dropping] * (BAR_INTERVALS - 2)
    got = run(seq, Limits(window=8, staleness=1))
    assert got[0].staleness == 2 and all(lim.staleness == 1 for lim in got[1:])


def test_a_raise_for_stale_drops_survives_a_loss_within_one_interval_s_noise() -> None:
    dropping = obs(stale_drops=3, trained=32, trainer_idle=0.0, steps=8)
    a_bit_slower = obs(stale_drops=0, trained=32, trainer_idle=0.0, steps=7)  # -12.5 %: more than LOSS, less than DROPS_LOSS
    assert run([dropping, a_bit_slower, a_bit_slower], Limits(window=8, staleness=1))[-1].staleness == 2


def test_a_waiting_trainer_widens_a_full_window_only_after_persisting() -> None:
    starved = obs(trainer_idle=0.5, window_full=1.0)
    got = run([starved] * PERSIST, Limits(window=8, staleness=1))
    assert [lim.window for lim in got] == [8] * (PERSIST - 1) + [16]


def test_a_waiting_trainer_held_back_by_the_capacity_rule_gets_more_staleness() -> None:
    got = run([obs(trainer_idle=0.5, room_exhausted=0.9, window_full=1.0)] * PERSIST, Limits(window=8, staleness=1))
    assert got[-1] == Limits(window=8, staleness=2)


def test_a_wider_window_that_costs_throughput_is_reverted_and_not_tried_again_for_a_while() -> None:
    starved = obs(trainer_idle=0.5, window_full=1.0, steps=10)
    slower = obs(trainer_idle=0.5, window_full=1.0, steps=8)  # -20 %: past saturation, more in flight costs
    seq = [starved] * PERSIST + [slower] * (SETTLE + BAR_INTERVALS)
    got = run(seq, Limits(window=8, staleness=1))
    judged = PERSIST + SETTLE
    assert all(lim.window == 16 for lim in got[PERSIST - 1 : judged])  # probed, left to settle
    assert all(lim.window == 8 for lim in got[judged:])  # reverted, and barred: no creeping back up


def test_a_wider_window_within_the_noise_is_kept() -> None:
    starved = obs(trainer_idle=0.5, window_full=1.0, steps=10)
    got = run([starved] * PERSIST + [obs(trainer_idle=0.5, window_full=1.0, steps=95, seconds=10.0)] * (SETTLE + 1),
              Limits(window=8, staleness=1))
    assert got[-1].window >= 16


def test_a_wider_window_that_pays_is_kept() -> None:
    limits, memory = Limits(window=8, staleness=1), Memory()
    for _ in range(PERSIST):
        d = decide(obs(trainer_idle=0.5, window_full=1.0, steps=4), limits, BOUNDS, memory)
        limits, memory = d.limits, d.memory
    assert limits.window == 16
    for _ in range(SETTLE + 1):
        d = decide(obs(trainer_idle=0.3, window_full=1.0, steps=6), limits, BOUNDS, memory)  # 1.5x the rate
        limits, memory = d.limits, d.memory
        assert limits.window >= 16


def test_a_full_queue_and_a_fed_trainer_halve_the_window_and_a_costly_halving_is_undone() -> None:
    ahead = obs(trainer_idle=0.0, queue_full=1.0)
    got = run([ahead] * CALM, Limits(window=8, staleness=1))
    assert got[-1].window == 4
    limits, memory = Limits(window=8, staleness=1), Memory()
    for _ in range(CALM):
        d = decide(ahead, limits, BOUNDS, memory)
        limits, memory = d.limits, d.memory
    for _ in range(SETTLE + 1):
        d = decide(obs(trainer_idle=0.5, queue_full=0.0), limits, BOUNDS, memory)
        limits, memory = d.limits, d.memory
    assert d.limits.window == 8 and d.reason.startswith("reverted")


def test_balanced_intervals_never_move_anything() -> None:
    assert run([obs(trainer_idle=x) for x in (0.04, 0.09, 0.05, 0.08) * 10], Limits(window=8, staleness=2)) == [
        Limits(window=8, staleness=2)
    ] * 40


observations = st.builds(
    Observation,
    steps=st.integers(0, 8),
    seconds=st.floats(0.01, 10),
    trainer_idle=st.floats(0, 1),
    window_full=st.floats(0, 1),
    room_exhausted=st.floats(0, 1),
    queue_full=st.floats(0, 1),
    stale_drops=st.integers(0, 5),
    age_max=st.one_of(st.just(math.nan), st.floats(0, 6)),
    behaviour_kl=st.one_of(st.just(math.nan), st.floats(0, 0.1)),
    syncing=st.booleans(),
    paused=st.booleans(),
)


@given(
    seq=st.lists(observations, max_size=60),
    lo=st.integers(1, 8),
    span=st.integers(0, 40),
    s_lo=st.integers(0, 2),
    s_span=st.integers(0, 3),
)
def test_any_sequence_of_intervals_keeps_the_limits_within_bounds_moving_one_notch_at_a_time(
    seq: list[Observation], lo: int, span: int, s_lo: int, s_span: int
) -> None:
    bounds = Bounds(min_window=lo, max_window=lo + span, min_staleness=s_lo, max_staleness=s_lo + s_span)
    limits, memory = Limits(window=lo, staleness=s_lo), Memory()
    for o in seq:
        d = decide(o, limits, bounds, memory)
        new = d.limits
        assert bounds.min_window <= new.window <= bounds.max_window
        assert bounds.min_staleness <= new.staleness <= bounds.max_staleness
        assert abs(new.staleness - limits.staleness) <= 1
        assert limits.window // 2 <= new.window <= 2 * limits.window
        if o.syncing or o.paused:
            assert new == limits
        limits, memory = new, d.memory


def test_autotune_starts_where_the_defaults_are_and_never_below_the_sync_period() -> None:
    bounds, start = bounds_for(min_window=1, max_window=64, staleness_threshold=4, sync_every=1, initial_window=8)
    assert start == Limits(window=8, staleness=1) and bounds.max_staleness == 4
    assert bounds.min_staleness == 0  # a sync every step: on-policy is within reach
    bounds, start = bounds_for(min_window=1, max_window=4, staleness_threshold=4, sync_every=3, initial_window=8)
    assert start == Limits(window=4, staleness=2) and bounds.min_staleness == 2
    _, start = bounds_for(min_window=1, max_window=64, staleness_threshold=0, sync_every=1, initial_window=8)
    assert start.staleness == 0  # on-policy stays on-policy


def test_the_effective_staleness_limit_never_exceeds_the_hard_bound_and_lowering_it_drops_and_counts() -> None:
    chan: VersionedChannel[str] = VersionedChannel(capacity=8, max_staleness=3)
    with pytest.raises(ValueError, match="hard bound"):
        chan.set_staleness_limit(4)
    with pytest.raises(ValueError):
        chan.set_staleness_limit(-1)
    for v in (0, 1, 2, 3):
        chan.put_nowait(f"v{v}", v)
    assert chan.get_nowait(3) == "v0"  # age 3 <= 3
    chan.set_staleness_limit(1)
    assert chan.get_nowait(3) == "v2"  # v1 (age 2) is now stale: dropped, counted
    s = chan.statistics()
    assert (s.dropped_stale, s.staleness_limit) == (1, 1)
    assert s.produced == s.consumed + s.dropped_stale + s.size
    chan.set_staleness_limit(3)
    assert chan.statistics().staleness_limit == 3


def test_admission_follows_the_effective_staleness(rollouter_for: Callable[..., Any], sim_config: Callable[..., Config]) -> None:
    cfg = sim_config("async_training.staleness_threshold=3", "data.train_batch_size=2")
    rollouter, _engine, channel = rollouter_for(cfg)
    assert rollouter.statistics().admission_room == (3 + 1) * 2
    channel.set_staleness_limit(1)
    assert rollouter.statistics().admission_room == (1 + 1) * 2


def test_a_run_without_autotune_has_no_controller_and_no_autotune_metrics(sim_config: Callable[..., Config], tmp_path: Path) -> None:
    from asyncpolicy.supervisor import Supervisor

    async def main() -> tuple[object, list[dict[str, object]]]:
        cfg = sim_config("trainer.total_training_steps=3", output_dir=tmp_path / "off")
        async with Supervisor.open(cfg) as sup:
            await sup.wait()
        rows = [msgspec.json.decode(line) for line in (tmp_path / "off" / "metrics.jsonl").read_bytes().splitlines()]
        return sup.autotuner, rows

    tuner, rows = anyio.run(main)
    assert tuner is None
    assert rows and not any(k.startswith("autotune/") for r in rows for k in r)


def test_a_resumed_run_tunes_on_from_the_checkpointed_controller(
    sim_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller's limits and counts are in the checkpoint: the resumed run starts from them
    (within its bounds), not from the defaults, and its counts continue."""
    from asyncpolicy import checkpoint
    from asyncpolicy.autotune import tuner as tuner_module
    from asyncpolicy.supervisor import Supervisor

    monkeypatch.setattr(tuner_module, "MIN_INTERVAL_S", 0.0)  # decisions by step count alone, on any machine's speed

    keys = ("async_training.autotune=true", "async_training.staleness_threshold=4", "async_training.autotune_every_steps=2")

    async def first() -> Any:
        async with Supervisor.open(sim_config(*keys, "trainer.total_training_steps=16", output_dir=tmp_path)) as sup:
            await sup.wait()
        return sup.autotuner

    tuner = anyio.run(first)
    assert tuner is not None and tuner.statistics().decisions > 0
    path = checkpoint.latest_checkpoint(tmp_path)
    assert path is not None
    saved = checkpoint.load_state(path).autotune
    assert saved is not None and saved.limits == tuner.limits and saved.decisions == tuner.statistics().decisions

    restored: list[Any] = []

    async def resumed() -> None:
        cfg = sim_config(*keys, "trainer.total_training_steps=17", "resume=auto", output_dir=tmp_path)
        async with Supervisor.open(cfg) as sup:  # open restores the checkpoint; the actors start after
            assert sup.autotuner is not None
            restored.append((sup.autotuner.limits, sup.autotuner.statistics()))
            await sup.wait()

    anyio.run(resumed)
    ((limits, stats),) = restored
    assert limits == saved.limits  # within the same bounds: exactly the checkpoint's
    assert stats.decisions == saved.decisions and stats.moves == saved.moves


# -- on-policy: fresher samples when they cost no throughput --------------------------------------

FED_SPREAD = obs(trainer_idle=0.0, age_max=1.0, behaviour_kl=10 * SPREAD_KL)  # staleness 1 fully used, the policy moves
ON_POLICY_SAME_RATE = obs(trainer_idle=0.5, room_exhausted=0.9, window_full=0.0, age_max=0.0)  # waits by construction


def test_a_fed_trainer_with_spread_importance_weights_goes_on_policy_and_stays_while_throughput_holds() -> None:
    seq = [FED_SPREAD] * CALM + [ON_POLICY_SAME_RATE] * (SETTLE + BAR_INTERVALS)
    got = run(seq, Limits(window=8, staleness=1), ON_POLICY_OK)
    assert [lim.staleness for lim in got[: CALM - 1]] == [1] * (CALM - 1)
    assert all(lim.staleness == 0 for lim in got[CALM - 1 :])  # the trainer's waiting at 0 does not undo it


def test_without_importance_weight_spread_or_with_drops_the_used_bound_is_kept() -> None:
    for o in (obs(trainer_idle=0.0, age_max=1.0), obs(trainer_idle=0.0, age_max=1.0, behaviour_kl=SPREAD_KL / 2),
              obs(trainer_idle=0.0, age_max=1.0, behaviour_kl=10 * SPREAD_KL, stale_drops=1, trained=100)):
        assert run([o] * 3 * CALM, Limits(window=8, staleness=1), ON_POLICY_OK)[-1].staleness == 1, o


def test_the_floor_is_the_sync_period_s_need_on_policy_probes_stop_there() -> None:
    assert run([FED_SPREAD] * 4 * CALM, Limits(window=8, staleness=1), BOUNDS)[-1].staleness == 1  # min_staleness 1


def test_on_policy_that_costs_throughput_is_reverted_and_barred() -> None:
    slower = obs(trainer_idle=0.5, room_exhausted=0.9, age_max=0.0, steps=2)  # half the rate: the overlap paid
    seq = [FED_SPREAD] * CALM + [slower] * (SETTLE + 1) + [FED_SPREAD] * (BAR_INTERVALS - 2)
    limits, memory = Limits(window=8, staleness=1), Memory()
    reasons = []
    for o in seq:
        d = decide(o, limits, ON_POLICY_OK, memory)
        limits, memory = d.limits, d.memory
        reasons.append(d.reason)
    assert limits.staleness == 1
    assert sum(r.startswith("reverted: staleness 1 -> 0") for r in reasons) == 1  # not probed again while barred


def test_leaving_on_policy_must_gain_more_than_the_loss_margin() -> None:
    limits, memory = Limits(window=8, staleness=1), Memory()
    for o in [FED_SPREAD] * CALM + [ON_POLICY_SAME_RATE] * (SETTLE + 1):
        d = decide(o, limits, ON_POLICY_OK, memory)
        limits, memory = d.limits, d.memory
    assert limits.staleness == 0
    # once the bar expires, the waiting trainer and the held-back admission raise it to 1 (a probe) ...
    for o in [ON_POLICY_SAME_RATE] * (BAR_INTERVALS + PERSIST):
        d = decide(o, limits, ON_POLICY_OK, memory)
        limits, memory = d.limits, d.memory
        if limits.staleness:
            break
    assert limits.staleness == 1 and memory.probe == "loosen"
    raised = (limits, memory)
    # ... which no gain (the same rate) takes back, ...
    for o in [obs(trainer_idle=0.0, age_max=1.0)] * (SETTLE + 1):
        d = decide(o, limits, ON_POLICY_OK, memory)
        limits, memory = d.limits, d.memory
    assert limits.staleness == 0 and d.reason.startswith("reverted")
    # ... and a gain beyond the loss margin keeps
    limits, memory = raised
    faster = obs(trainer_idle=0.0, age_max=1.0, steps=round(4 * (1 + 2 * LOSS)) + 1)
    for o in [faster] * (SETTLE + 1):
        d = decide(o, limits, ON_POLICY_OK, memory)
        limits, memory = d.limits, d.memory
    assert limits.staleness == 1


def test_a_window_halved_for_stale_drops_that_keeps_throughput_is_not_widened_again_at_once() -> None:
    wasteful = obs(trainer_idle=0.0, stale_drops=8, trained=32)  # 25 % dropped at the hard bound
    waiting = obs(trainer_idle=0.3, window_full=1.0)  # the narrower window is full, the trainer waits a little
    seq = [wasteful] + [waiting] * (SETTLE + BAR_INTERVALS - 1)
    got = run(seq, Limits(window=16, staleness=4))
    assert [lim.window for lim in got] == [8] * len(seq)  # the drops were the wider window's cost
    later = run(seq + [waiting] * (PERSIST + 1), Limits(window=16, staleness=4))
    assert later[-1].window == 16  # the bar expires: the run may have changed


def test_a_window_halved_for_stale_drops_that_costs_throughput_is_undone() -> None:
    wasteful = obs(trainer_idle=0.0, stale_drops=8, trained=32, steps=8)
    slower = obs(trainer_idle=0.3, window_full=1.0, steps=6)  # -25 %
    got = run([wasteful] + [slower] * (SETTLE + 1), Limits(window=16, staleness=4))
    assert got[-1].window == 16
