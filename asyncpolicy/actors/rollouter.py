"""The rollouter: keeps generations in flight and turns finished groups into samples.

Invariants:

* admission (AReaL's capacity rule): a group is started only while
  ``admitted - dropped_stale < (staleness_limit + 1 + version) * train_batch_size``,
  so it never starts work that the trainer could not consume within the staleness bound
  (the channel still enforces the bound per sample, should completion order defeat the rule).
  ``staleness_limit`` is the channel's effective bound, which autotune may move within
  0..staleness_threshold. The rule follows it rather than the hard threshold: the rule only
  exists to avoid starting work the channel would drop, so it must use the bound the channel
  applies now; and since the effective bound is never above the hard one, following it admits
  never more than the hard rule would (a lowered limit only admits less, a raised one at most
  up to the hard rule). Groups admitted before a limit was lowered may go stale: the channel
  drops and counts them, so the hard bound and the accounting hold whatever the moves;
* admission yields to a busy event loop: after starting a group it waits (`loop_caught_up`) for a
  loop iteration shorter than `LOOP_BUSY_S`, at most `LOOP_WAIT_MAX_S`: a sync or a taken batch
  frees room for dozens of groups (hundreds of episodes) at once, and starting them all while
  the loop is still busy with the running ones is what made its iterations (the lag of every
  other task in it, the host's included) long. Only the pace of admission changes, never what is admitted;
* at most `admission window` groups generate at once: each holds a token of an anyio
  CapacityLimiter from its start until its responses are done (default
  ``max(1, rollout.max_concurrency // rollout.n)``; `set_admission_window` moves it at run time).
  The window only bounds concurrency: whatever it is set to, the capacity rule above still holds;
* every admitted group ends exactly once: as a sample put into the channel, or — only when the
  run stops — as abandoned in flight (its prompt is in `snapshot().in_flight` for checkpoints);
* `pause()` returns only once no generation runs on the engine; `resume()` undoes it; both are
  idempotent per reason and return True (the seed's check);
* a generation error or a request past `generation_timeout` is retried `rollout.max_retries`
  times, then the run fails with `GenerationFailed` naming the request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import anyio
import msgspec
import structlog

from asyncpolicy import counters
from asyncpolicy.agents.episode import AgentSpec, run_agent_episode
from asyncpolicy.channels import VersionedChannel
from asyncpolicy.channels.signal import StateSignal
from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import GenerationEngine, GenerationRequest, GenerationResult
from asyncpolicy.envs.episode import run_episode
from asyncpolicy.envs.loading import EpisodeSpec
from asyncpolicy.errors import EngineTimeout, GenerationFailed, first_failure
from asyncpolicy.samples import Prompt, Sample, Trajectory, make_sample
from asyncpolicy.tasks.base import PromptSource, Scorer

if TYPE_CHECKING:  # starlette (the 'agents' extra) loads only when a run serves agents
    from asyncpolicy.agents.chat_server import ChatServer

log = structlog.get_logger("asyncpolicy.rollouter")

LOOP_BUSY_S = 0.005  # a loop iteration longer than this: the loop is busy, admission waits
LOOP_WAIT_MAX_S = 0.25  # the longest admission waits for a quiet iteration (a host that keeps its loop busy)


async def loop_caught_up() -> float:
    """Checkpoint until one comes back within `LOOP_BUSY_S`, or `LOOP_WAIT_MAX_S` has passed; return
    the seconds waited. On asyncio a checkpoint's round trip is one loop iteration (every callback
    ready before it runs first); on trio, a batch of tasks in random order: a rougher measure."""
    start = now = time.perf_counter()
    while True:
        await anyio.lowlevel.checkpoint()
        before, now = now, time.perf_counter()
        if now - before <= LOOP_BUSY_S or now - start >= LOOP_WAIT_MAX_S:
            return now - start


class RolloutCounters(msgspec.Struct, frozen=True, kw_only=True):
    """Monotone counts since the run began (a resumed run continues them); all go into checkpoints."""

    admitted: int = 0  # groups started; a group generated again (engine restart, resume) counts once
    completed: int = 0  # groups turned into samples and put into the channel
    generations: int = 0  # engine.generate calls that returned
    interrupted: int = 0  # generations aborted by a pause and continued (partial rollout) or restarted
    retried: int = 0  # failed or timed-out generations retried
    timeouts: int = 0
    reward_errors: int = 0  # scorer raised or returned a non-finite value; scored 0
    tokens: int = 0  # response tokens in completed samples
    # agentic episodes (task.env or task.agent; docs/agents.md). Plays, not prompts: the episodes of a group
    # replayed after a stop or a failure (`requeued`) count again, as the calls they made again do
    episodes: int = 0  # episodes finished (training and validation)
    turns: int = 0  # model turns of those episodes
    env_tokens: int = 0  # tokens the environment added to them (loss mask 0)
    env_calls: int = 0  # environment reset/step calls
    env_seconds: float = 0.0  # wall time inside those calls
    tool_calls: int = 0  # steps the environment marked as tool calls
    env_errors: int = 0  # episodes whose environment (or agent) raised, timed out or gave a non-finite reward; scored 0
    requeued: int = 0  # groups in flight at a stop (checkpoint) or a rollouter failure, generated again from their start


class InFlight(msgspec.Struct, frozen=True, kw_only=True):
    """A group being generated: what a checkpoint needs to generate it again."""

    prompt: Prompt
    start_version: int


class RolloutSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What a checkpoint needs to continue the rollouter: `restore` puts it into a fresh one."""

    counters: RolloutCounters
    in_flight: tuple[InFlight, ...]  # admitted, not yet queued: generated again, before new prompts


class RolloutStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A consistent view of the rollouter now; metrics and logs read these, never the internals."""

    counters: RolloutCounters
    in_flight: int  # groups admitted and not yet queued (replays of a restored or failed engine included)
    generating: int  # groups whose responses are being generated (each holds an admission token)
    admission_window: int  # most groups generating at once (the limiter's total_tokens)
    admission_room: int  # new groups the capacity rule would still admit now (<= 0: it holds admission back)
    running: int  # engine.generate calls active now (0 once pause() has returned)
    paused: bool
    idle_ratio: float  # share of this process's wall time no generation ran (0 before the first run())


class Rollouter:
    """Draws prompts, generates `rollout.n` responses each, scores them, queues samples."""

    name = "rollouter"

    def __init__(
        self,
        cfg: Config,
        engine: GenerationEngine,
        channel: VersionedChannel[Sample],
        prompts: PromptSource,
        scorer: Scorer,
        episodes: EpisodeSpec | AgentSpec | None = None,
        chat_server: ChatServer | None = None,
    ) -> None:
        if isinstance(episodes, AgentSpec) and chat_server is None:
            raise ValueError("rollouter: agent episodes (task.agent) need the ChatServer their agents call")
        self.cfg = cfg
        self.episodes = episodes  # responses are episodes of this environment or agent; None = single-turn
        self.chat_server = chat_server  # served by the owner (the Supervisor) while this rollouter runs
        self.engine = engine
        self.channel = channel
        self.prompts = prompts
        self.scorer = scorer
        self._counters = RolloutCounters()
        self._changed = StateSignal()  # version, pause state, running count, drops
        self._pause_reasons: set[str] = set()
        self._running = 0  # engine.generate calls now active: pause() waits for none (validation's included)
        # a token per group generating, borrowed by its prompt uid at admission, returned when its responses are done
        self._admission = anyio.CapacityLimiter(max(1, cfg.rollout.max_concurrency // cfg.rollout.n))
        self._in_flight: dict[str, InFlight] = {}
        self._replay: list[InFlight] = []  # restored from a checkpoint: generated first
        self._idle_since: float | None = None
        self._idle_total = 0.0
        self._started_at: float | None = None  # set by the first run(); a restart keeps counting from it

    # -- control (supervisor, synchronizer) ----------------------------------------------------

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def paused(self) -> bool:
        return bool(self._pause_reasons)

    async def pause(self, reason: str = "user", *, drain: bool = False) -> bool:
        """Stop generating; return True once nothing runs on the engine.

        drain=False interrupts running generations (partial rollout continues them after
        `resume`); drain=True lets them finish. Bounded by generation_timeout either way.
        """
        self._pause_reasons.add(reason)
        self._changed.notify()
        if not drain and self._running:
            await self.engine.abort_all()
        limit = self.cfg.async_training.generation_timeout + 5.0
        with anyio.move_on_after(limit) as scope:
            await self._changed.wait_until(lambda: self._running == 0)
        if scope.cancelled_caught:
            raise EngineTimeout(
                f"rollouter: {self._running} generation(s) still running {limit:.0f}s after pause({reason!r})"
            )
        log.debug("rollout_paused", reason=reason, drain=drain)
        return True

    async def resume(self, reason: str = "user") -> bool:
        """Undo `pause(reason)`; generation restarts when no other reason holds it."""
        self._pause_reasons.discard(reason)
        self._changed.notify()
        await anyio.lowlevel.checkpoint()
        return True

    def set_admission_window(self, groups: int) -> None:
        """Let at most `groups` groups generate at once, from now on. Shrinking never interrupts a
        group: admission waits until fewer than `groups` generate. The staleness rule is unaffected."""
        if groups < 1:
            raise ValueError(f"rollouter: the admission window must be at least 1 group, got {groups}")
        self._admission.total_tokens = groups
        self._changed.notify()
        log.debug("admission_window_set", groups=groups)

    def notify_version(self) -> None:
        """The engine serves a newer version: the staleness capacity grew (the synchronizer calls it after a
        push; with in-flight updates no pause/resume of this rollouter would otherwise wake admission)."""
        self._changed.notify()

    def notify_dropped(self, sample: Sample, version: int) -> None:
        """Channel callback: a stale drop frees admission capacity."""
        self._changed.notify()

    def requeue_in_flight(self) -> int:
        """After `run` failed: abandoned groups go back to the front, to be generated again. They
        stay counted in `admitted` from their first start: admitted = made + in flight."""
        groups = list(self._in_flight.values())
        self._in_flight.clear()
        self._replay = groups + self._replay
        return len(groups)

    # -- state ---------------------------------------------------------------------------------

    def _groups_in_flight(self) -> tuple[InFlight, ...]:
        return (*self._in_flight.values(), *self._replay)

    def snapshot(self) -> RolloutSnapshot:
        """The counts and the groups started but not yet queued (generated again on restore)."""
        return RolloutSnapshot(counters=self._counters, in_flight=self._groups_in_flight())

    def restore(self, snap: RolloutSnapshot) -> None:
        """Load a snapshot into this fresh rollouter: counts continue, its groups are generated first."""
        if self._in_flight or self._replay or self._counters != RolloutCounters():
            raise RuntimeError("rollouter: restore() needs a fresh rollouter")
        self._counters = snap.counters
        self._replay = list(snap.in_flight)

    def statistics(self) -> RolloutStatistics:
        idle_ratio = 0.0
        if self._started_at is not None:
            now = time.monotonic()
            idle = self._idle_total + (now - self._idle_since if self._idle_since is not None else 0.0)
            idle_ratio = idle / max(1e-9, now - self._started_at)
        return RolloutStatistics(
            counters=self._counters,
            in_flight=len(self._in_flight) + len(self._replay),
            generating=self._admission.borrowed_tokens,
            admission_window=int(self._admission.total_tokens),
            admission_room=self._capacity_left(),
            running=self._running,
            paused=self.paused,
            idle_ratio=idle_ratio,
        )

    # -- admission -----------------------------------------------------------------------------

    def _capacity_left(self) -> int:
        chan = self.channel.statistics()
        limit = (chan.staleness_limit + 1 + self.version) * self.cfg.data.train_batch_size
        live = self._counters.admitted - chan.dropped_stale
        return limit - live

    def _may_admit(self) -> bool:
        # A replayed group is inside the capacity count already: only new prompts wait for room.
        # One wait for all three conditions (the limiter's own wait would be a second one): the
        # token is then taken without waiting, and returning one notifies this wait.
        return (
            not self.paused
            and self._admission.available_tokens >= 1
            and (bool(self._replay) or self._capacity_left() > 0)
        )

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self._started_at is None:
            self._started_at = self._idle_since = time.monotonic()
        try:
            await self._admit_forever(task_status)
        except BaseExceptionGroup as group:  # a group's task failed: surface the named failure
            raise first_failure(group) from None

    async def _admit_forever(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                await self._changed.wait_until(self._may_admit)
                if self._replay:  # admitted already, when it first started; its episodes start again from their start
                    group = InFlight(prompt=self._replay.pop(0).prompt, start_version=self.version)
                    self._counters = counters.add(self._counters, requeued=1)
                else:
                    group = InFlight(prompt=self.prompts.next(), start_version=self.version)
                    self._counters = counters.add(self._counters, admitted=1)
                self._admission.acquire_on_behalf_of_nowait(group.prompt.uid)
                self._in_flight[group.prompt.uid] = group
                tg.start_soon(self._rollout_group, group)
                if self.cfg.rollout.interval_s:
                    await anyio.sleep(self.cfg.rollout.interval_s)
                await loop_caught_up()

    async def _rollout_group(self, group: InFlight) -> None:
        prompt = group.prompt
        n = self.cfg.rollout.n
        results: list[Trajectory | None] = [None] * n
        try:
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(self._generate_into, results, i, prompt)
        finally:
            self._admission.release_on_behalf_of(prompt.uid)
            self._changed.notify()
        trajectories = [t for t in results if t is not None]
        if self.episodes is None:  # an episode's reward is its environment's
            for t in trajectories:
                t.reward = self._score(prompt, t)
        sample = make_sample(prompt, trajectories, group.start_version)
        await self.channel.put(sample, sample.min_version)  # backpressure: waits while the queue is full
        del self._in_flight[prompt.uid]
        self._counters = counters.add(
            self._counters, completed=1, tokens=sum(len(t.response_tokens) for t in trajectories)
        )

    async def _generate_into(self, results: list[Trajectory | None], i: int, prompt: Prompt) -> None:
        results[i] = await self._respond(prompt, i)

    @contextmanager
    def _engine_call(self) -> Iterator[None]:
        """Count a running engine call; pause() waits for the count to reach zero."""
        if self._running == 0 and self._idle_since is not None:
            self._idle_total += time.monotonic() - self._idle_since
            self._idle_since = None
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle_since = time.monotonic()
            self._changed.notify()

    async def evaluate(self, prompt: Prompt) -> Trajectory:
        """One scored response to a held-out prompt at `rollout.val_temperature` (0: greedy), through
        the guarded path; never queued. The trajectory, not only its reward: validation also reports
        what the episode did (its tool calls)."""
        trajectory = await self._respond(prompt, 0, tag="val", temperature=self.cfg.rollout.val_temperature)
        if self.episodes is None:
            trajectory.reward = self._score(prompt, trajectory)
        return trajectory

    async def _respond(
        self, prompt: Prompt, i: int, *, tag: str = "train", temperature: float | None = None
    ) -> Trajectory:
        """Response `i` to `prompt`: one generation, or an episode (its reward set) with `task.env` or `task.agent`."""
        request = self._request(prompt, i, tag, temperature)
        if self.episodes is None:
            result = await self._generate(request)
            return Trajectory(
                response_tokens=result.response_tokens,
                behaviour_logprobs=result.behaviour_logprobs,
                token_versions=result.token_versions,
                finish_reason=result.finish_reason,
            )
        if isinstance(self.episodes, AgentSpec):
            assert self.chat_server is not None  # checked at construction
            episode = await run_agent_episode(self.episodes, self.chat_server, prompt, request, self._generate)
        else:
            episode = await run_episode(self.episodes, prompt, request, self._generate)
        t = episode.trajectory
        self._counters = counters.add(
            self._counters, episodes=1, turns=t.turns, env_tokens=t.env_tokens, env_calls=episode.env_calls,
            env_seconds=episode.env_seconds, tool_calls=t.tool_calls, env_errors=int(bool(episode.error)),
        )
        if episode.error:
            t.reward_error = episode.error
            log.error(
                "env_error", env=self.episodes.name, episode_id=request.request_id, prompt=prompt.text[:80],
                error=episode.error, env_errors_total=self._counters.env_errors,
            )
        return t

    def _request(self, prompt: Prompt, i: int, tag: str, temperature: float | None) -> GenerationRequest:
        cfg = self.cfg
        return GenerationRequest(
            request_id=f"{tag}/{prompt.uid}/{i}",
            group=f"{tag}/{prompt.uid}",
            prompt_tokens=prompt.tokens,
            max_tokens=cfg.data.max_response_length,
            temperature=cfg.rollout.temperature if temperature is None else temperature,
            top_p=cfg.rollout.top_p,
            seed=hash((cfg.seed, prompt.epoch, prompt.index, i)) & 0x7FFFFFFF,
        )

    async def _generate(self, request: GenerationRequest) -> GenerationResult:
        """`request` to its end: retried on failure or timeout, continued (partial rollout) or
        started again after a pause interrupted it."""
        cfg = self.cfg
        failures = 0
        while True:
            await self._changed.wait_until(lambda: not self.paused)
            try:
                with self._engine_call(), anyio.fail_after(cfg.async_training.generation_timeout):
                    result = await self.engine.generate(request)
            except Exception as exc:  # an engine failure, or TimeoutError from fail_after
                failures += 1
                timed_out = isinstance(exc, TimeoutError)
                self._counters = counters.add(self._counters, timeouts=int(timed_out))
                if failures > cfg.rollout.max_retries:
                    raise GenerationFailed(
                        f"generation {request.request_id} failed {failures} time(s); last: "
                        f"{'timeout after ' + str(cfg.async_training.generation_timeout) + 's' if timed_out else repr(exc)}"
                    ) from exc
                self._counters = counters.add(self._counters, retried=1)
                log.warning("generation_retry", request_id=request.request_id, attempt=failures, error=repr(exc))
                await anyio.sleep(min(2.0, 0.05 * 2 ** (failures - 1)))
                continue
            self._counters = counters.add(self._counters, generations=1)
            if result.finish_reason != "abort":
                return result
            self._counters = counters.add(self._counters, interrupted=1)
            if cfg.async_training.partial_rollout:  # continue from the tokens so far, under new weights
                request = msgspec.structs.replace(
                    request,
                    response_tokens=result.response_tokens,
                    behaviour_logprobs=result.behaviour_logprobs,
                    token_versions=result.token_versions,
                )
            # else: start the response again from scratch, so it has a single version

    def _score(self, prompt: Prompt, trajectory: Trajectory) -> float:
        """Run the task's scorer; an error or non-finite reward is logged, counted and scored 0."""
        try:
            reward = float(self.scorer(prompt, trajectory.response_tokens))
        except Exception as exc:  # user code: any failure is reported, never crashes the run
            reward, error = math.nan, f"{type(exc).__name__}: {exc}"
        else:
            error = "" if math.isfinite(reward) else f"non-finite reward {reward!r}"
        if error:
            self._counters = counters.add(self._counters, reward_errors=1)
            trajectory.reward_error = error
            log.error(
                "reward_error",
                reward_fn=self.scorer.name,
                prompt_uid=prompt.uid,
                prompt=prompt.text[:80],
                error=error,
                reward_errors_total=self._counters.reward_errors,
            )
            return 0.0
        return reward
