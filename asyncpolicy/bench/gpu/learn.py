"""`bench gpu --sections learn`: does a real model learn a real task faster with stale samples?

SmolLM2-135M-Instruct (`model.path=smollm2-135m-instruct`, or `--learn-model DIR`) on `arith`,
through the Supervisor as users run it, once per arm: on-policy (staleness 0) and with staleness
1 and 2 (`--learn-staleness`), or arms of the user's (`--learn-arm NAME:WORDS`: autotune, the
calculator task ...). Every arm has the same seed, settings (`LEARN_RUN` ← the user's key=value
words ← the arm's words) and training budget (`--learn-budget-s` of training time, counted from when every actor runs, after
the engines started; then,
once the policy has also been validated after training began, a graceful `Supervisor.stop()`: the
step in progress ends and a checkpoint is written). The curve is read from the validator's own
history (every validation), not from the metrics lines (which carry the latest only).

An arm is a hard bound: start-up allowance + budget + stop allowance, or it fails naming itself.
The held-out accuracy (greedy pass@1, at the start and every `trainer.test_freq` steps) is the
learning curve; the target is the first arm's final accuracy (on-policy's, by default), and each
arm's time to it is read by `bench/accuracy.py` (no interpolation: the first validation at or
above it). With agentic episodes (`task.name=calc`) each arm also reports how often it calls a
tool, held-out (greedy) and in training (sampled).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import structlog

from asyncpolicy.bench.accuracy import ValPoint, time_to_accuracy, validation_points
from asyncpolicy.bench.common import BenchContext, Host, ScenarioRun, percentile, run_supervised
from asyncpolicy.bench.gpu.engines import BenchEngines
from asyncpolicy.bench.gpu.settings import LEARN_RUN, GPUBenchSettings, LearnArmSpec
from asyncpolicy.config import Config, load_config
from asyncpolicy.supervisor import Supervisor

log = structlog.get_logger("asyncpolicy.bench.gpu")

JSON_NAME = "learn.json"


class LearnArm(msgspec.Struct, kw_only=True):
    """One arm's figures; times are seconds of training (from its first step), None where not measured."""

    name: str
    words: list[str]  # the config words the arm adds over the shared ones
    task: str
    staleness: int  # its async_training.staleness_threshold
    steps: int
    finished: bool  # every trainer.total_training_steps trained (normally False: the budget ended the arm)
    start_s: float  # start-up: engines, first weight sync (not part of the budget)
    train_s: float  # first step → the run's end: the budget, the step in progress, the checkpoint
    bound_s: float  # what train_s must stay within: budget + stop allowance
    points: list[ValPoint]  # the learning curve
    base_accuracy: float | None  # the validation at the start
    final_accuracy: float | None  # the last validation
    best_accuracy: float | None
    reached_s: float | None = None  # first validation at or above the target
    reached_step: int | None = None
    vs_first: float | None = None  # reached_s ÷ the first arm's (None when that is 0 or missing)
    steps_per_s: float  # steps ÷ the training time of the last step
    gen_tokens_per_s: float  # every generated token (training, validation, dropped) ÷ train_s
    sync_pause_mean_s: float  # rollout stopped by a weight sync (sync_pause_s), mean and p99 over steps
    sync_pause_p99_s: float
    dropped_stale: int
    # agentic tasks (None single-turn): share of episodes with a tool call, held-out (first and last
    # validation, greedy) and in training (mean of the first and of the last 5 steps' batches, sampled)
    val_tool_call_rate: tuple[float, float] | None = None
    train_tool_call_rate: tuple[float, float] | None = None
    autotune_end: dict[str, float] | None = None  # the `autotune/*` keys of the last step, when the arm tunes


class LearnResult(msgspec.Struct, kw_only=True):
    model: str
    task: str
    budget_s: float
    target: float | None  # the first arm's final accuracy
    arms: list[LearnArm]
    plot: str = ""  # PNG file name in the results dir; empty without matplotlib
    settings: list[str] = msgspec.field(default_factory=list)  # the config words every arm shares


def learn_arm(spec: LearnArmSpec, cfg: Config, run: ScenarioRun, generated_tokens: float, s: GPUBenchSettings, target: float | None) -> LearnArm:
    """One arm's figures from its run; times to `target` when there is one."""
    points = validation_points(run.rows, run.ready_s, run.validations or None)
    train_rates = [float(r["episode/tool_call_rate"]) for r in run.rows if r.get("episode/tool_call_rate") is not None]
    pauses = [r["sync_pause_s"] for r in run.rows if r.get("sync_pause_s") is not None]
    last = run.rows[-1] if run.rows else None
    last_t = float(last["elapsed_s"]) - run.ready_s if last else math.nan
    train_s = run.run_s - run.ready_s
    arm = LearnArm(
        name=spec.name, words=spec.words, task=cfg.task.name, staleness=cfg.async_training.staleness_threshold, steps=run.steps, finished=run.finished, start_s=run.ready_s, train_s=train_s,
        bound_s=s.learn_budget_s + s.learn_stop_s, points=points,
        base_accuracy=points[0].accuracy if points and points[0].step == 0 else None,
        final_accuracy=points[-1].accuracy if points else None,
        best_accuracy=max(p.accuracy for p in points) if points else None,
        steps_per_s=last["step"] / last_t if last and last_t > 0 else math.nan,
        gen_tokens_per_s=generated_tokens / train_s if train_s > 0 else math.nan,
        sync_pause_mean_s=statistics.fmean(pauses) if pauses else math.nan,
        sync_pause_p99_s=percentile(pauses, 99),
        dropped_stale=run.dropped_stale,
        val_tool_call_rate=(points[0].tool_call_rate, points[-1].tool_call_rate) if points and train_rates else None,
        train_tool_call_rate=(statistics.fmean(train_rates[:5]), statistics.fmean(train_rates[-5:])) if train_rates else None,
        autotune_end=({k: float(v) for k, v in last.items() if k.startswith("autotune/")} or None) if last else None,
    )
    if target is not None:
        hit = time_to_accuracy(run.rows, target, run.ready_s, run.validations or None)
        if hit is not None:
            arm.reached_s, arm.reached_step = hit.t_s, hit.step
    return arm


def learn_result(runs: list[tuple[LearnArmSpec, Config, ScenarioRun, float]], s: GPUBenchSettings, settings: list[str], cfg: Config) -> LearnResult:
    """Every arm's figures; the target is the first arm's final accuracy (None until it ran or without validations)."""
    first = runs[0][2] if runs else None
    finals = validation_points(first.rows, first.ready_s, first.validations or None) if first else []
    target = finals[-1].accuracy if finals else None
    arms = [learn_arm(spec, arm_cfg, run, tokens, s, target) for spec, arm_cfg, run, tokens in runs]
    base = arms[0].reached_s if arms else None
    for a in arms:
        if a.reached_s is not None and base:  # base 0: the target was met at the start, no ratio
            a.vs_first = a.reached_s / base
    return LearnResult(model=cfg.model.path, task=cfg.task.name, budget_s=s.learn_budget_s, target=target, arms=arms, settings=settings)


def _stop_at_budget(budget_s: float) -> Host:
    """A host that stops the arm once `budget_s` of training time have passed (the curve's clock:
    a metrics line's `elapsed_s` minus `Supervisor.ready_s`) AND the policy has been validated after
    training began, so every arm ends on a measured accuracy whatever the machine's speed (the arm's
    hard bound, in `_run_arm`, still caps it)."""

    async def host(sup: Supervisor) -> None:
        async for row in sup.events():  # one per trained step
            trained_s = float(row["elapsed_s"]) - (sup.ready_s or 0.0)
            if trained_s >= budget_s and any(v.step > 0 for v in sup.validator.history()):
                sup.stop()
                return

    return host


async def _run_arm(
    e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext, spec: LearnArmSpec, words: list[str]
) -> tuple[Config, ScenarioRun, float]:
    """One arm through the Supervisor, stopped at its budget; (its config, its run, tokens its generation engine made)."""
    name = f"gpu_learn_{spec.name}"
    cfg = ctx.config(words, spec.words, name=name)
    limit = s.learn_start_s + s.learn_budget_s + s.learn_stop_s
    try:
        with anyio.fail_after(limit):
            engines = await anyio.to_thread.run_sync(e.engine_set, cfg)  # reads the model's files: off the loop
            run = await run_supervised(
                ctx, name, cfg, engines=engines, host=_stop_at_budget(s.learn_budget_s),
                settings={"arm": spec.name, "words": spec.words, "budget_s": s.learn_budget_s},
            )
    except TimeoutError:
        raise RuntimeError(
            f"learn arm {spec.name} did not end within its bound of {limit:g} s "
            f"(start {s.learn_start_s:g} + budget {s.learn_budget_s:g} + stop {s.learn_stop_s:g})"
        ) from None
    # every engine the bench runs counts its tokens (vLLM's, the simulated one); not part of the protocol
    tokens = float(getattr(engines.generation, "generated_tokens", math.nan))
    log.info("bench_gpu_learn_arm", arm=spec.name, steps=run.steps, train_s=round(run.run_s - run.ready_s, 1))
    return cfg, run, tokens


async def section_learn(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    """The arms one after another on the same GPU(s), then the table's figures, the plot and learn.json."""
    await e.release()  # each arm starts (and closes) its own engines: free the GPUs first
    words = [*e.learn_overrides(), *LEARN_RUN, *s.learn_overrides]
    cfg = load_config(None, words)  # what every arm shares (each adds its own words and output_dir)
    runs: list[tuple[LearnArmSpec, Config, ScenarioRun, float]] = []
    path = ctx.out_dir / JSON_NAME
    for spec in s.learn_arms:
        arm_cfg, run, tokens = await _run_arm(e, s, ctx, spec, words)
        runs.append((spec, arm_cfg, run, tokens))
        path.write_bytes(msgspec.json.format(msgspec.json.encode(learn_result(runs, s, words, cfg))))  # a later failure keeps it
    result = learn_result(runs, s, words, cfg)
    result.plot = _plot(ctx, result)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(result)))
    return {**msgspec.to_builtins(result), "json": JSON_NAME}


def learn_label(arm: dict[str, Any]) -> str:
    """How a table row and a plot's legend name a learn arm (its JSON form)."""
    if arm["name"] == f"staleness_{arm['staleness']}":
        return "on-policy (staleness 0)" if arm["staleness"] == 0 else f"staleness {arm['staleness']}"
    return f"{arm['name']} (staleness {arm['staleness']})"


def _plot(ctx: BenchContext, result: LearnResult) -> str:
    """Held-out accuracy against training time and against steps, a line per arm; '' without matplotlib."""
    try:
        from asyncpolicy.bench.plots import new_figure, save
    except ModuleNotFoundError as missing:  # `bench gpu` runs without the bench extra; the figures do not need it
        if missing.name != "matplotlib":
            raise
        log.warning("bench_gpu_learn_no_plot", reason="matplotlib is missing: pip install -e '.[bench]'")
        return ""
    fig, axes = new_figure(1, 2, width=6.5)
    by_time, by_step = axes[0]
    for arm in result.arms:
        label = learn_label(msgspec.to_builtins(arm))
        acc = [p.accuracy for p in arm.points]
        by_time.plot([p.t_s for p in arm.points], acc, marker="o", markersize=3, label=label)
        by_step.plot([p.step for p in arm.points], acc, marker="o", markersize=3, label=label)
    for ax in (by_time, by_step):
        if result.target is not None:
            ax.axhline(result.target, color="grey", linestyle="--", alpha=0.7, label=f"target: {learn_label(msgspec.to_builtins(result.arms[0]))} final {result.target:.3f}")
        ax.set_ylabel("held-out accuracy (greedy pass@1)")
        ax.legend(fontsize=8)
    by_time.set_xlabel("training time (s, from the end of each arm's start-up)")
    by_step.set_xlabel("training step")
    by_time.set_title(f"{result.model}, {result.task}: accuracy against time (budget {result.budget_s:g} s per arm)")
    by_step.set_title("accuracy against steps")
    return save(fig, ctx.out_dir, "learn", ctx.caption())
