"""Time to accuracy from metrics lines (bench/accuracy.py) and the learn section's per-arm figures
(bench/gpu/learn.py), on hand-made lines: reached, never reached, reached at the start."""

from __future__ import annotations

import math
from typing import Any

from asyncpolicy.bench.accuracy import ValPoint, time_to_accuracy, validation_points
from asyncpolicy.bench.common import ScenarioRun
from asyncpolicy.bench.gpu.learn import learn_result
from asyncpolicy.actors.validator import ValidationResult
from asyncpolicy.bench.gpu.settings import GPUBenchSettings, LearnArmSpec, staleness_arms
from asyncpolicy.config import Config, load_config

READY = 40.0  # start-up seconds: every line's elapsed_s includes them


def lines(results: dict[int, tuple[int, float]], steps: int = 8, step_s: float = 10.0) -> list[dict[str, Any]]:
    """Metrics lines of `steps` steps; results: the step whose line first carries a validation → (its val_step, accuracy).
    A validation stays the latest (carried by every later line) until the next one."""
    rows: list[dict[str, Any]] = []
    latest: tuple[int | None, float | None] = (None, None)
    for step in range(1, steps + 1):
        if step in results:
            latest = results[step]
        rows.append({"step": step, "elapsed_s": READY + step * step_s, "val_step": latest[0], "val/accuracy": latest[1],
                     "sync_pause_s": 0.01 * step})
    return rows


# the start's validation (0.25) shows on line 1, step 2's (0.5) on line 3, step 4's (0.75) on line 6, step 6's (0.5) on line 7
CURVE = {1: (0, 0.25), 3: (2, 0.5), 6: (4, 0.75), 7: (6, 0.5)}


def test_each_validation_counts_once_at_the_time_of_the_step_it_followed() -> None:
    assert validation_points(lines(CURVE), READY) == [
        ValPoint(step=0, t_s=0.0, accuracy=0.25), ValPoint(step=2, t_s=20.0, accuracy=0.5),
        ValPoint(step=4, t_s=40.0, accuracy=0.75), ValPoint(step=6, t_s=60.0, accuracy=0.5),
    ]
    assert validation_points(lines({}), READY) == []  # test_freq=0: no validation, no point


def test_a_target_is_reached_at_the_first_validation_at_or_above_it_without_interpolation() -> None:
    rows = lines(CURVE)
    assert time_to_accuracy(rows, 0.5, READY) == ValPoint(step=2, t_s=20.0, accuracy=0.5)  # equal counts as reached
    assert time_to_accuracy(rows, 0.6, READY) == ValPoint(step=4, t_s=40.0, accuracy=0.75)  # not 0.5→0.75's crossing at 28 s
    assert time_to_accuracy(rows, 0.6) == ValPoint(step=4, t_s=80.0, accuracy=0.75)  # without the start-up: elapsed_s as is


def test_a_target_never_reached_is_none() -> None:
    assert time_to_accuracy(lines(CURVE), 0.8, READY) is None
    assert time_to_accuracy(lines({}), 0.0, READY) is None  # no validation: not reached, even for a zero target


def test_a_target_the_starting_policy_meets_is_reached_at_step_0_time_0() -> None:
    assert time_to_accuracy(lines(CURVE), 0.25, READY) == ValPoint(step=0, t_s=0.0, accuracy=0.25)


def _run(rows: list[dict[str, Any]], steps: int = 8) -> ScenarioRun:
    return ScenarioRun(
        name="x", wall_s=200.0, steps=steps, made=0, samples_per_s=0.0, steps_per_s=0.0, sample_age_mean=0.0, sample_age_max=0.0,
        sync_latency_mean_s=0.0, sync_latency_max_s=0.0, queue_utilization_mean=0.0, trainer_idle_ratio=0.0, rollouter_idle_ratio=0.0,
        dropped_stale=3, peak_rss_mb=0.0, trainer_wait_s=0.0, sync_total_s=0.0, finished=False, rows=rows, ready_s=READY,
        run_s=READY + 100.0,
    )


def arm(staleness: int, run: ScenarioRun, tokens: float) -> tuple[LearnArmSpec, Config, ScenarioRun, float]:
    """A `--learn-staleness` arm as `section_learn` hands it to `learn_result`."""
    spec = staleness_arms([staleness])[0]
    return spec, load_config(None, ["task.name=arith", *spec.words]), run, tokens


def test_the_target_is_the_on_policy_final_and_each_arm_is_timed_against_it() -> None:
    on_policy = lines(CURVE)  # final 0.5, first reached at step 2 (20 s)
    faster = lines({1: (0, 0.25), 2: (1, 0.5)}, step_s=5.0)  # 0.5 at step 1: 5 s
    never = lines({1: (0, 0.25)})
    s = GPUBenchSettings(learn_budget_s=90.0, learn_stop_s=30.0)
    cfg = load_config(None, ["task.name=arith"])
    res = learn_result([arm(0, _run(on_policy), 1000.0), arm(1, _run(faster), 2000.0), arm(2, _run(never), 500.0)], s, ["w=1"], cfg)
    assert res.target == 0.5 and res.task == "arith"
    a0, a1, a2 = res.arms
    assert (a0.reached_s, a0.reached_step, a0.vs_first) == (20.0, 2, 1.0)
    assert (a1.reached_s, a1.reached_step, a1.vs_first) == (5.0, 1, 0.25)
    assert (a2.reached_s, a2.reached_step, a2.vs_first) == (None, None, None)
    assert (a0.base_accuracy, a0.final_accuracy, a0.best_accuracy) == (0.25, 0.5, 0.75)
    assert a0.train_s == 100.0 and a0.bound_s == 120.0 and a0.start_s == READY and a0.dropped_stale == 3
    assert a0.steps_per_s == 8 / 80.0 and a1.steps_per_s == 8 / 40.0  # steps ÷ training time of the last step
    assert a0.gen_tokens_per_s == 10.0 and a1.gen_tokens_per_s == 20.0
    assert math.isclose(a0.sync_pause_mean_s, 0.045) and a0.sync_pause_p99_s == 0.01 * 8


def test_no_ratio_when_the_on_policy_arm_meets_its_target_at_the_start() -> None:
    flat = lines({1: (0, 0.5), 3: (2, 0.25), 5: (4, 0.5)})  # final 0.5 = the start's
    s, cfg = GPUBenchSettings(), load_config(None, [])
    res = learn_result([arm(0, _run(flat), 1.0), arm(1, _run(lines(CURVE)), 1.0)], s, [], cfg)
    assert res.target == 0.5
    assert (res.arms[0].reached_s, res.arms[0].vs_first) == (0.0, None)  # reached at time 0: a ratio would divide by it
    assert (res.arms[1].reached_s, res.arms[1].vs_first) == (20.0, None)


def test_no_target_without_an_on_policy_validation() -> None:
    s, cfg = GPUBenchSettings(), load_config(None, [])
    res = learn_result([arm(0, _run(lines({})), 1.0), arm(1, _run(lines(CURVE)), 1.0)], s, [], cfg)
    assert res.target is None and all(a.reached_s is None and a.vs_first is None for a in res.arms)
    assert res.arms[0].base_accuracy is None and res.arms[1].base_accuracy == 0.25


def test_arms_of_ones_own_are_timed_against_the_first_and_report_tool_calls_and_autotune() -> None:
    """`--learn-arm`: the first arm sets the target whatever its staleness; an agentic arm reports its
    tool-call rates (held-out from the validator's history, training from its lines); a tuning arm
    the `autotune/*` keys of its last line."""
    tools = lines({1: (0, 0.25), 3: (2, 0.5)})
    for i, row in enumerate(tools):
        row["episode/tool_call_rate"] = i / 10  # 0.0 .. 0.7
    tools[-1].update({"autotune/window": 16, "autotune/staleness": 2, "autotune/moves": 3})
    validations = [ValidationResult(step=0, rollout_version=0, reward_mean=0.25, accuracy=0.25, prompts=4, tool_call_rate=0.0),
                   ValidationResult(step=2, rollout_version=2, reward_mean=0.5, accuracy=0.5, prompts=4, tool_call_rate=0.75)]
    calc, auto = _run(tools), _run(lines(CURVE))
    calc.validations = validations
    s = GPUBenchSettings(learn_budget_s=90.0, learn_stop_s=30.0)
    specs = [LearnArmSpec("calc", ["task.name=calc"]), LearnArmSpec("auto", ["async_training.autotune=true", "async_training.staleness_threshold=2"])]
    runs = [(specs[0], load_config(None, specs[0].words), calc, 1.0), (specs[1], load_config(None, specs[1].words), auto, 1.0)]
    res = learn_result(runs, s, [], load_config(None, []))
    first, second = res.arms
    assert res.target == 0.5 and (first.name, first.task, first.staleness) == ("calc", "calc", 1)
    assert (first.reached_s, first.vs_first, second.reached_s, second.vs_first) == (20.0, 1.0, 20.0, 1.0)
    assert first.val_tool_call_rate == (0.0, 0.75)
    assert first.train_tool_call_rate is not None
    assert math.isclose(first.train_tool_call_rate[0], 0.2) and math.isclose(first.train_tool_call_rate[1], 0.5)  # means of 0..0.4, 0.3..0.7
    assert first.autotune_end == {"autotune/window": 16.0, "autotune/staleness": 2.0, "autotune/moves": 3.0}
    assert (second.task, second.staleness, second.val_tool_call_rate, second.train_tool_call_rate) == ("reverse", 2, None, None)
