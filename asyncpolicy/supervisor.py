"""The supervisor: one task group that owns the actors, their engines and their lifecycle.

    async with Supervisor.open(cfg) as sup: # engines started, every actor reported ready
        async for row in sup.events(): ...  # per-step metrics, live
        result = await sup.wait()           # the trainer finished its steps
    # leaving the block stops whatever still runs; engines are closed

If any actor fails, the others are cancelled and the block raises `ActorFailed` naming it (the
host's code inside the block is cancelled first, as in any task group). Engine work runs in
threads or processes, so the host's event loop stays free. Works under asyncio and trio.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import msgspec
import structlog

from asyncpolicy import checkpoint, loop_gc
from asyncpolicy.actors.rollouter import Rollouter
from asyncpolicy.agents.episode import AgentSpec
from asyncpolicy.actors.synchronizer import ParameterSynchronizer
from asyncpolicy.actors.trainer import StepReport, Trainer
from asyncpolicy.actors.validator import Validator
from asyncpolicy.autotune import Autotuner
from asyncpolicy.channels import VersionedChannel
from asyncpolicy.config import FSDP_START_TIMEOUT_S, Config, replica_count, to_dict
from asyncpolicy.engines.factory import build_engines, import_engine_modules
from asyncpolicy.engines.protocols import EngineSet, ModelExporter
from asyncpolicy.engines.generation.replicas import ReplicaCounters, ReplicatedGeneration
from asyncpolicy.errors import ActorFailed, ConfigError, GenerationFailed, RunFailed, first_failure
from asyncpolicy.logging import quiet_unless_configured
from asyncpolicy.metrics import episode_metrics, MetricsSink, StepMetrics, batch_reward_stats, rss_bytes
from asyncpolicy.samples import Sample
from asyncpolicy.tasks.base import TaskData
from asyncpolicy.tasks.registry import build_task

log = structlog.get_logger("asyncpolicy.supervisor")

ENGINE_CLOSE_TIMEOUT_S = 30.0
AGENT_SERVER_START_TIMEOUT_S = 30.0  # binding the agents' endpoint (task.agent)


class RunResult(msgspec.Struct, kw_only=True):
    """How a run ended, with the sample accounting: made = trained + dropped_stale + queued."""

    steps: int
    param_version: int
    rollout_version: int
    finished: bool  # all total_training_steps done (False after stop())
    made: int  # samples (prompt groups) completed and put into the channel
    trained: int
    dropped_stale: int
    queued: int
    in_flight: int  # groups still being generated when the run ended
    reward_errors: int
    generation_retries: int
    sync_failed_attempts: int
    elapsed_s: float
    output_dir: str


def output_path(cfg: Config) -> Path:
    """The run's directory as `output_dir` names it (a fresh timestamped one when empty); not created."""
    return Path(cfg.output_dir or time.strftime("outputs/run-%Y%m%d-%H%M%S"))


def check_output_dir(out: Path) -> None:
    """Refuse, without writing anything, a directory that cannot be created or written to."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a directory" if not existing.is_dir() else "permission denied"
        raise ConfigError(f"config key 'output_dir': {str(out)!r} is not writable ({str(existing)!r}: {why})", key="output_dir")


def prepare_output_dir(out: Path) -> Path:
    """The run's directory, created and checked writable; a clear ConfigError otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"config key 'output_dir': {str(out)!r} is not writable ({e.strerror or e})", key="output_dir") from None
    return out


class RunSetup(msgspec.Struct, kw_only=True):
    """What a Supervisor is built from: the heavy part of its construction (`prepare_run`)."""

    engines: EngineSet
    task: TaskData
    output_dir: Path  # checked, created, config.json written
    rng: random.Random  # the run's seeded RNG: the engines were built with it, checkpoints hold its state
    resume: checkpoint.Resume | None  # the checkpoint the run continues from
    sink: MetricsSink  # metrics.jsonl, opened (appended to on a resume)


def prepare_run(
    cfg: Config,
    *,
    engines: EngineSet | None = None,
    task: TaskData | None = None,
    on_output_dir: Callable[[Path], None] | None = None,
) -> RunSetup:
    """Check the output dir and resume state, build engines and task, write config.json (blocking:
    a worker thread's job; `Supervisor.build` runs it so)."""
    # Everything that can reject the input (config, output_dir, resume, model, data, reward) runs
    # before anything on disk is created or changed: a bad-input run leaves nothing behind.
    out = output_path(cfg)
    check_output_dir(out)
    resume = checkpoint.find_resume(out, cfg.resume)
    metrics_file = out / "metrics.jsonl"
    earlier_run = resume is None and metrics_file.exists() and metrics_file.stat().st_size > 0
    if earlier_run and cfg.resume != "auto":
        raise ConfigError(
            f"config key 'output_dir': {str(out)!r} already holds a run; "
            "pass resume=auto to continue it, or choose another output_dir",
            key="output_dir",
        )
    rng = random.Random(cfg.seed)
    engines = engines or build_engines(cfg, rng=rng)
    task = task or build_task(cfg, engines.tokenizer)
    output_dir = prepare_output_dir(out)
    if on_output_dir is not None:
        on_output_dir(output_dir)
    if earlier_run:  # resume=auto without a complete checkpoint: start over, keeping the old lines
        aside = metrics_file.with_name(time.strftime("metrics.before-%Y%m%d-%H%M%S.jsonl"))
        metrics_file.replace(aside)
        log.warning("no_checkpoint_to_resume", previous_metrics=str(aside))
    if resume is not None:
        _truncate_metrics(metrics_file, resume.state.trainer.step)
    checkpoint.remove_stale_temporaries(output_dir)
    (output_dir / "config.json").write_bytes(msgspec.json.format(msgspec.json.encode(to_dict(cfg))))
    sink = MetricsSink(output_dir, append=resume is not None)
    return RunSetup(engines=engines, task=task, output_dir=output_dir, rng=rng, resume=resume, sink=sink)


class Supervisor:
    """Runs rollouter, trainer and synchronizer as one structured unit.

    Complete once constructed (from a `RunSetup`); `async with` runs it. `Supervisor.open(cfg)`
    builds and runs in one step, `Supervisor.build(cfg)` only builds.
    """

    def __init__(self, cfg: Config, setup: RunSetup) -> None:
        self.cfg = cfg
        self.engines = setup.engines
        self.task = setup.task
        self.output_dir = setup.output_dir
        self.rng = setup.rng
        self.resume_from = setup.resume
        self.sink = setup.sink
        at = cfg.async_training
        self.channel: VersionedChannel[Sample] = VersionedChannel(
            at.max_queue_size, at.staleness_threshold, on_drop=self._on_drop
        )
        # black-box agents call the policy here; served as a task of the actors' group (`_main`)
        self.chat_server = self.task.episodes.server() if isinstance(self.task.episodes, AgentSpec) else None
        self.rollouter = Rollouter(
            cfg, self.engines.generation, self.channel, self.task.train, self.task.scorer, self.task.episodes,
            self.chat_server,
        )
        self.synchronizer = ParameterSynchronizer(at, self.rollouter, self.engines.transport)
        self.trainer = Trainer(
            cfg, self.engines.trainer, self.channel, self.synchronizer, self._on_step, self.save_checkpoint
        )
        # a run without autotune has no controller at all: it behaves exactly as before autotune existed
        self.autotuner = (
            Autotuner(cfg, self.rollouter, self.trainer, self.channel, self.synchronizer) if at.autotune else None
        )
        self.validator = Validator(self.rollouter, self.task.val, concurrency=max(1, cfg.rollout.max_concurrency // 4))
        self._validating = bool(cfg.trainer.test_freq and self.task.val)
        if cfg.trainer.test_freq and not self.task.val:
            log.warning("validation_off", reason="no held-out prompts (all too long for data.max_prompt_length?)")
        # the run's lifecycle: set while it runs
        self._outer: anyio.abc.TaskGroup | None = None
        self._actors: anyio.CancelScope | None = None
        self._starting: anyio.CancelScope | None = None  # engine start-up, restore, first sync
        self._stop_requested = False
        self._done = anyio.Event()
        self._started_at = time.monotonic()
        # seconds from the start to every actor running (engines started, state restored, first sync):
        # what the run paid before training; metrics' elapsed_s minus this is training time
        self.ready_s: float | None = None
        self._rate_base = (0, 0, 0)  # (produced, consumed, step) restored from a checkpoint: rates count this process's work
        self.result: RunResult | None = None
        self._gc_quieted = False  # a successful start-up froze long-lived objects (loop_gc)

    # -- building -------------------------------------------------------------------------------

    @classmethod
    async def build(
        cls,
        cfg: Config,
        *,
        engines: EngineSet | None = None,
        task: TaskData | None = None,
        on_output_dir: Callable[[Path], None] | None = None,
    ) -> Supervisor:
        """A complete Supervisor, not yet running. Everything heavy (imports, model files,
        tokenizer, disk) runs in worker threads, with automatic garbage collection off (loop_gc).

        `on_output_dir` is called with the run's directory once the inputs are checked and it
        exists, before anything is written there (the CLI opens its events file in it). Run the
        result with `async with`: leaving that block closes its metrics file.
        """
        quiet_unless_configured()
        with loop_gc.collection_off():
            if engines is None:
                # seconds of imports (torch, transformers, vllm); abandoning them on a cancel is harmless
                await anyio.to_thread.run_sync(import_engine_modules, cfg, abandon_on_cancel=True)
            # not abandoned: it writes into output_dir and builds engines that must have an owner
            setup = await anyio.to_thread.run_sync(
                functools.partial(prepare_run, cfg, engines=engines, task=task, on_output_dir=on_output_dir)
            )
        return cls(cfg, setup)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        cfg: Config,
        *,
        engines: EngineSet | None = None,
        task: TaskData | None = None,
        on_output_dir: Callable[[Path], None] | None = None,
    ) -> AsyncIterator[Supervisor]:
        """`build`, then run: inside the block engines are started and every actor reported ready."""
        sup = await cls.build(cfg, engines=engines, task=task, on_output_dir=on_output_dir)
        async with sup:
            yield sup

    def _on_drop(self, sample: Sample, version: int) -> None:
        self.rollouter.notify_dropped(sample, version)

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        quiet_unless_configured()
        with loop_gc.quiet_start_up():  # no full collection stalls the loop during or after start-up
            self._started_at = time.monotonic()
            self._outer = anyio.create_task_group()
            await self._outer.__aenter__()
            try:
                await self._outer.start(self._main)
            except BaseException as exc:
                await self._close_outer(type(exc), exc, exc.__traceback__)
                raise
        self._gc_quieted = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if self._actors is not None:
            self._actors.cancel()
        return await self._close_outer(exc_type, exc, tb)

    async def _close_outer(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._outer is not None
        try:
            return await self._outer.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            raise first_failure(group) from None
        finally:
            self.sink.close()
            if self._gc_quieted:
                self._gc_quieted = False
                loop_gc.run_ended()

    async def _main(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Start engines and actors; finish when the trainer does; close engines on every path."""
        try:
            with anyio.CancelScope() as self._starting:
                if not self._stop_requested:
                    await self._start_engines()
                    if self.resume_from is not None:
                        await self._restore(self.resume_from)
                    elif self.engines.sync_at_start:  # rollout servers may hold another run's weights and version
                        await self.synchronizer.sync(self.trainer.version, force=True)
            if self._stop_requested:  # stopped before anything was trained: no checkpoint to write
                log.warning("stopped_during_start_up")
                task_status.started()
                return
            reported = False  # task_status.started() called: `__aenter__` has returned
            try:
                # the agents' endpoint outlives the actors: it closes only after the rollouter's episodes
                # have ended, so an agent's last call never meets a closed port (a failure counted falsely)
                async with anyio.create_task_group() as endpoint:
                    if self.chat_server is not None:  # listening before the rollouter's agents call it
                        with anyio.fail_after(AGENT_SERVER_START_TIMEOUT_S):
                            await endpoint.start(self._run_actor, "agent_server", self.chat_server.serve)
                    with anyio.CancelScope() as self._actors:
                        if self._stop_requested:  # stop() came while the endpoint started: no actor starts
                            self._actors.cancel()
                        async with anyio.create_task_group() as actors:
                            await actors.start(self._run_actor, self.rollouter.name, self._rollout_with_restarts)
                            await actors.start(self._run_actor, self.trainer.name, self._train_then_stop)
                            if isinstance(self.engines.generation, ReplicatedGeneration):  # restarts dead replicas
                                await actors.start(self._run_actor, "replicas", self._serve_replicas)
                            if self.autotuner is not None:
                                await actors.start(self._run_actor, self.autotuner.name, self.autotuner.run)
                            if self._validating:
                                await actors.start(self._run_actor, self.validator.name, self.validator.run)
                                # the policy training starts from is measured too: the base of every learning curve
                                self.validator.request(self.trainer.statistics().step)
                            self.ready_s = time.monotonic() - self._started_at
                            task_status.started()
                            reported = True
                            log.info(
                                "run_started",
                                output_dir=str(self.output_dir),
                                steps=self.cfg.trainer.total_training_steps,
                                resumed_from=str(self.resume_from.path) if self.resume_from else None,
                            )
                    endpoint.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise first_failure(group) from None
            if not reported:  # stopped, or training already complete (a finished run resumed), while actors started:
                task_status.started()  # the run ended as it began, no failure: the checkpoint below is written
            # Reached on a finished run or a graceful stop, never after a failure: a failed run
            # keeps its last good checkpoint untouched.
            finished = self.trainer.statistics().step >= self.cfg.trainer.total_training_steps
            with anyio.CancelScope(shield=True):
                await self.save_checkpoint("finished" if finished else "stop")
        finally:
            self.channel.close()
            self.result = self._result()
            self.sink.close()  # the run is over: events() iterators end
            self._done.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(ENGINE_CLOSE_TIMEOUT_S):
                await self._close_engines()

    async def _train_then_stop(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        await self.trainer.run(task_status=task_status)
        assert self._actors is not None
        self._actors.cancel()  # training is complete: stop generating

    async def _run_actor(
        self,
        name: str,
        run: Callable[..., Awaitable[None]],
        *,
        task_status: anyio.abc.TaskStatus[None],
    ) -> None:
        try:
            await run(task_status=task_status)
        except ConfigError:  # bad input found only when an actor starts (a port in use): exit 2, not a failed actor
            raise
        except RunFailed as exc:
            log.error("actor_failed", actor=name, error=str(exc))
            raise ActorFailed(name, exc) from exc
        except Exception as exc:
            log.exception("actor_failed", actor=name, error=repr(exc))
            raise ActorFailed(name, exc) from exc

    async def _rollout_with_restarts(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Run the rollouter; when its engine keeps failing, restart the engine (bounded) and go on.

        Queued samples stay in the channel; the groups that were in flight are generated again.
        """
        restarts = 0
        status = task_status
        while True:
            try:
                await self.rollouter.run(task_status=status)
            except GenerationFailed as exc:
                if restarts >= self.cfg.rollout.max_restarts:
                    raise GenerationFailed(f"{exc} (generation engine restarted {restarts} time(s) already)") from exc
                restarts += 1
                requeued = self.rollouter.requeue_in_flight()
                log.error("generation_engine_restart", restart=restarts, error=str(exc), requeued_groups=requeued)
                await self._restart_generation_engine()
                status = anyio.TASK_STATUS_IGNORED

    async def _restart_generation_engine(self) -> None:
        gen = self.engines.generation
        with anyio.fail_after(self.cfg.async_training.generation_timeout * 10):
            await gen.aclose()
            await gen.start()
            await self._reload_weights()

    async def _reload_weights(self) -> None:
        """Push the trainer's current weights to a (re)started engine, whatever version it reports."""
        async with self.trainer.weights_lock:  # weights must not change while they are read
            await self.synchronizer.sync(self.trainer.version, force=True)

    async def _serve_replicas(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        assert isinstance(self.engines.generation, ReplicatedGeneration)
        await self.engines.generation.serve(self._reload_weights, task_status=task_status)

    async def _restore(self, resume: checkpoint.Resume) -> None:
        """Put every piece back as the checkpoint holds it, then serve the trainer's weights."""
        state = resume.state
        await self.engines.trainer.load_state(str(resume.path / checkpoint.ENGINE_DIR))
        self.trainer.restore(state.trainer)
        self.rollouter.restore(state.rollouter)
        self.synchronizer.restore(state.sync)
        if isinstance(self.engines.generation, ReplicatedGeneration):  # the metrics' replica counts continue
            self.engines.generation.restore(state.replicas)
        self.task.train.restore(state.cursor)
        self.channel.restore(state.channel)
        if self.autotuner is not None and state.autotune is not None:  # after the channel: it sets its limit
            self.autotuner.restore(state.autotune)
        if state.validator is not None:
            self.validator.restore(state.validator)
        self.rng.setstate(_rng_state(state.rng_state))
        await self.synchronizer.sync(self.trainer.version, force=True)
        self._rate_base = (state.channel.produced, state.channel.consumed, state.trainer.step)
        log.info("resumed", path=str(resume.path), step=state.trainer.step, queued=len(state.channel.items), in_flight=len(state.in_flight))

    async def save_checkpoint(self, reason: str) -> None:
        """Capture the run's state now (no await in between), then write it atomically."""
        gen = self.engines.generation
        state = checkpoint.RunState.of(
            trainer=self.trainer.snapshot(),
            rollouter=self.rollouter.snapshot(),
            sync=self.synchronizer.snapshot(),
            cursor=self.task.train.state(),
            channel=self.channel.snapshot(),
            rng_state=list(_rng_state_list(self.rng.getstate())),
            reason=reason,
            replicas=gen.snapshot() if isinstance(gen, ReplicatedGeneration) else ReplicaCounters(),
            autotune=self.autotuner.snapshot() if self.autotuner is not None else None,
            validator=self.validator.snapshot(),
        )
        encoded = checkpoint.encode_state(state)  # serialised before any await: a consistent cut
        step = state.trainer.step
        tmp = checkpoint.begin(self.output_dir, step)
        limit = self.cfg.trainer.step_timeout_s
        try:
            with anyio.fail_after(limit):
                async with self.trainer.weights_lock:
                    await self.engines.trainer.save_state(str(tmp / checkpoint.ENGINE_DIR))
                    if isinstance(self.engines.trainer, ModelExporter):  # every engine with a real model
                        await self.engines.trainer.save_model(str(tmp / checkpoint.MODEL_DIR))
                # fsync and rename off the event loop: seconds for a real model
                await anyio.to_thread.run_sync(
                    checkpoint.commit, self.output_dir, tmp, encoded, step, self.cfg.trainer.keep_checkpoints
                )
        except TimeoutError:
            raise RunFailed(f"checkpoint of step {step} took longer than trainer.step_timeout_s={limit}s") from None

    async def _start_engines(self) -> None:
        """Start each engine within its own bound; one that overruns fails the run, naming it.

        Generation: 10 x generation_timeout per replica (they start one after another). The
        trainer's outer bound is a backstop that must not cut off the FSDP engine's own, more
        precise ones (its start_timeout_s, and trainer.worker_timeout_s naming an absent node).
        """
        at, t = self.cfg.async_training, self.cfg.trainer
        gen_limit = at.generation_timeout * 10 * replica_count(self.cfg)
        train_limit = max(at.generation_timeout * 10, FSDP_START_TIMEOUT_S, t.worker_timeout_s) + 60.0
        for name, engine, limit in (
            ("generation", self.engines.generation, gen_limit),
            ("trainer", self.engines.trainer, train_limit),
        ):
            try:
                with anyio.fail_after(limit):
                    await engine.start()
            except TimeoutError:
                raise RunFailed(f"the {name} engine ({type(engine).__name__}) did not start within {limit:g}s") from None

    async def _close_engines(self) -> None:
        for engine in (self.engines.generation, self.engines.trainer):
            try:
                await engine.aclose()
            except Exception as exc:  # closing must not mask the run's own outcome
                log.warning("engine_close_failed", engine=type(engine).__name__, error=repr(exc))

    # -- control --------------------------------------------------------------------------------

    async def wait(self) -> RunResult:
        """Wait for the run to end (all steps, or stop()); returns its accounting."""
        await self._done.wait()
        assert self.result is not None
        return self.result

    async def pause(self) -> bool:
        """Pause generation (the trainer drains the queue, then waits)."""
        return await self.rollouter.pause("user")

    async def resume(self) -> bool:
        return await self.rollouter.resume("user")

    def stop(self) -> None:
        """End the run early and gracefully: the current step completes, a checkpoint is written,
        then `wait()` returns with finished=False. Before training starts (engines starting) it
        ends the start-up instead: nothing is trained, no checkpoint is written."""
        self._stop_requested = True
        if self._actors is not None:
            self._actors.cancel()
        elif self._starting is not None:
            self._starting.cancel()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every later step's metrics line; the iteration ends when the run does."""
        with self.sink.subscribe() as stream:
            async for row in stream:
                yield row

    # -- metrics and accounting ------------------------------------------------------------------

    def _on_step(self, report: StepReport) -> None:
        elapsed = time.monotonic() - self._started_at
        chan = self.channel.statistics()
        rewards = [r for s in report.batch for r in s.rewards]
        reward_mean, reward_std = batch_reward_stats(rewards)
        lengths = [len(t.response_tokens) for s in report.batch for t in s.trajectories]
        gen = self.engines.generation
        replicas = gen.statistics().counters if isinstance(gen, ReplicatedGeneration) else ReplicaCounters()
        trainer, rollout = self.trainer.statistics(), self.rollouter.statistics()
        metrics = StepMetrics(
            step=report.step,
            param_version=report.version,
            rollout_version=self.engines.generation.version,
            elapsed_s=elapsed,
            reward_mean=reward_mean,
            reward_std=reward_std,
            samples_per_s=(chan.produced - self._rate_base[0]) / elapsed,
            trained_samples_per_s=(chan.consumed - self._rate_base[1]) / elapsed,
            steps_per_s=(report.step - self._rate_base[2]) / elapsed,
            sample_age_mean=chan.sample_age_mean,  # the trainer is the channel's one consumer: its batch
            sample_age_max=chan.sample_age_max,
            staleness_max=int(chan.staleness_max),
            dropped_stale_total=chan.dropped_stale,
            queue_size=chan.size,
            queue_utilization=chan.utilization,
            sync_latency_s=report.sync_latency_s,
            sync_pause_s=report.sync_pause_s,
            sync_in_flight=report.sync_in_flight,
            trainer_idle_ratio=trainer.idle_ratio,
            rollouter_idle_ratio=rollout.idle_ratio,
            in_flight=rollout.in_flight,
            reward_errors_total=rollout.counters.reward_errors,
            response_length_mean=sum(lengths) / len(lengths) if lengths else math.nan,
            rss_bytes=rss_bytes(),
            val_reward_mean=self.validator.latest.reward_mean if self.validator.latest else None,
            val_accuracy=self.validator.latest.accuracy if self.validator.latest else None,
            val_step=self.validator.latest.step if self.validator.latest else None,
            val_failures_total=self.validator.failures,
            replica_failovers=replicas.failovers,
            replica_restarts=replicas.restarts,
        )
        row = msgspec.to_builtins(metrics)
        if self.task.episodes is not None:  # single-turn lines stay as they were
            row.update(episode_metrics(report.batch, rollout.counters))
            if self.validator.latest:  # share of held-out episodes that called a tool at least once
                row["val/tool_call_rate"] = self.validator.latest.tool_call_rate
        row.update(report.engine_metrics)
        if self.autotuner is not None:
            row.update(self.autotuner.metrics())
            self.autotuner.on_step(report.engine_metrics)
        self.sink.write(row)
        if self._validating and report.step % self.cfg.trainer.test_freq == 0:
            self.validator.request(report.step)
        log.debug("step", step=report.step, reward_mean=round(reward_mean, 4), age_max=chan.sample_age_max)

    def _result(self) -> RunResult:
        chan, trainer, rollout = self.channel.statistics(), self.trainer.statistics(), self.rollouter.statistics()
        return RunResult(
            steps=trainer.step,
            param_version=trainer.version,
            rollout_version=self.engines.generation.version,
            finished=trainer.step >= self.cfg.trainer.total_training_steps,
            made=chan.produced,
            trained=chan.consumed,
            dropped_stale=chan.dropped_stale,
            queued=chan.size,
            in_flight=rollout.in_flight,
            reward_errors=rollout.counters.reward_errors,
            generation_retries=rollout.counters.retried,
            sync_failed_attempts=self.synchronizer.statistics().counters.failed_attempts,
            elapsed_s=time.monotonic() - self._started_at,
            output_dir=str(self.output_dir),
        )


def _rng_state_list(state: tuple) -> list[object]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state(saved: list[object]) -> tuple:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)  # type: ignore[arg-type]


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to the checkpoint's step; later ones are trained again."""
    if not path.exists():
        return
    kept = [line for line in path.read_bytes().splitlines(keepends=True) if line.strip() and _step_of(line) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_bytes(b"".join(kept))
    tmp.replace(path)


def _step_of(line: bytes) -> int:
    try:
        return int(msgspec.json.decode(line).get("step", 0))
    except msgspec.DecodeError:  # a line torn by a kill: drop it
        return 1 << 62


async def run(cfg: Config) -> RunResult:
    """Run to completion (the CLI's entry point)."""
    async with Supervisor.open(cfg) as sup:
        return await sup.wait()
