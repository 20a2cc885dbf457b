"""Simulated engines: the real protocols, real version bookkeeping, seeded fake latencies.

Named as simulated everywhere they appear. Tests and benchmarks use them to exercise the actors'
scheduling, staleness and failure handling without a model: generation time is lognormal (the
long tail of real response lengths), a training step takes a fixed time, a weight transfer takes
a fixed time and can be told to fail. Two knobs make the workload change or saturate, as a real
one does: `slots` (at most that many responses generate at once, like a GPU's batch; the others
wait for a slot, abortable) and `latency_growth_per_version` (generation time grows linearly with
the policy version the engine serves: responses lengthen as RL proceeds). All randomness comes from one `random.Random`, which tests
register with Hypothesis so that completion orders are explored and replayed.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import msgspec

from asyncpolicy.config import SimulatedRolloutConfig, SimulatedTrainerConfig
from asyncpolicy.engines.protocols import GenerationRequest, GenerationResult
from asyncpolicy.engines.generation.replicas import ReplicatedGeneration
from asyncpolicy.samples import Sample

VOCAB = 64
EOS = 0


class SimulatedEngineError(RuntimeError):
    """An injected generation or transfer failure."""


class _Running:
    """One generation's clock: it advances only while the engine is not paused (vLLM's pause "keep")."""

    def __init__(self, version: int, now: float) -> None:
        self.active_s = 0.0  # generating time before `since`
        self.since: float | None = now  # None while paused
        self.changes = [(0.0, version)]  # (active time of a weights change, the version from then on)

    def elapsed(self, now: float) -> float:
        return self.active_s + (now - self.since if self.since is not None else 0.0)

    def stop_clock(self, now: float) -> None:
        self.active_s, self.since = self.elapsed(now), None

    def version_at(self, t: float) -> int:
        """The version of a token finished at active time t: one finished at the moment of a change is the older's."""
        version = self.changes[0][1]
        for at, v in self.changes[1:]:
            if at < t:
                version = v
        return version


class SimulatedGenerationEngine:
    """Produces random tokens at a steady rate over a lognormal duration; abortable at any time.

    `pause()` / `resume()` stop and restart every running generation's clock in place, as vLLM's
    pause mode "keep" does; a version set while they run labels their later tokens.
    """

    def __init__(self, cfg: SimulatedRolloutConfig, rng: random.Random) -> None:
        self.cfg = cfg
        self.rng = rng
        self._version = 0
        self._abort: anyio.Event | None = None  # created inside the event loop
        self._wake: anyio.Event | None = None  # set (and replaced) on every pause, resume and abort
        self._paused = False
        self._running: set[_Running] = set()
        self.generated_tokens = 0
        self.requests = 0
        self._requests_since_start = 0
        self._slots: anyio.Semaphore | None = None  # created inside the event loop, when slots > 0

    @property
    def version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        now = anyio.current_time() if self._running else 0.0
        for run in self._running:
            run.changes.append((run.elapsed(now), version))
        self._version = version

    @property
    def errored(self) -> bool:
        """Dead (die_after_requests reached): every call fails until `start` runs again."""
        limit = self.cfg.die_after_requests
        return bool(limit) and self._requests_since_start >= limit

    async def start(self) -> None:
        await anyio.sleep(self.cfg.start_latency_s)
        self._abort = anyio.Event()
        self._requests_since_start = 0

    def _check_alive(self, request: GenerationRequest) -> None:
        self._requests_since_start += 1
        limit = self.cfg.die_after_requests
        if limit and self._requests_since_start > limit:
            raise SimulatedEngineError(f"simulated engine is dead (request {request.request_id}); restart it")

    def _duration(self) -> float:
        if self.cfg.mean_latency_s == 0:
            return 0.0
        drift = 1.0 + self.cfg.latency_growth_per_version * self._version
        return drift * self.cfg.mean_latency_s * math.exp(self.rng.gauss(0.0, self.cfg.latency_sigma))

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()
        self._wake = anyio.Event()

    async def _run_clock(self, run: _Running, duration: float, abort: anyio.Event) -> bool:
        """Wait until `run` has generated for `duration` (paused time not counted); True if aborted first."""
        await anyio.lowlevel.checkpoint()
        while not abort.is_set():
            if self._wake is None:
                self._wake = anyio.Event()
            wake = self._wake
            if self._paused:
                await wake.wait()
                continue
            left = duration - run.elapsed(anyio.current_time())
            if left <= 0:
                return False
            with anyio.move_on_after(left):
                await wake.wait()
        return True

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests += 1
        self._check_alive(request)
        if self._abort is None:
            self._abort = anyio.Event()
        if self.rng.random() < self.cfg.failure_rate:
            await anyio.sleep(0)
            raise SimulatedEngineError(f"simulated generation failure (request {request.request_id})")
        if self.rng.random() < self.cfg.hang_rate:
            await anyio.sleep_forever()
        done = len(request.response_tokens)
        remaining = max(0, request.max_tokens - done)
        target = self.rng.randint(1, remaining) if remaining else 0
        duration = self._duration() * (target / max(1, request.max_tokens))
        abort = self._abort
        async with self._slot(abort) as got_slot:
            run = _Running(self._version, anyio.current_time())
            if self._paused:
                run.stop_clock(run.since or 0.0)
            self._running.add(run)
            try:
                aborted = (not got_slot) or await self._run_clock(run, duration, abort)
            finally:
                self._running.discard(run)
        elapsed = min(duration, run.elapsed(anyio.current_time()))
        per_token = duration / max(1, target)  # token i is finished at active time (i + 1) * per_token
        if aborted:
            target = min(target, int(target * elapsed / duration)) if duration > 0 else 0
        new_tokens = [self.rng.randrange(1, VOCAB) for _ in range(target)]
        finish = "abort" if aborted else ("length" if done + target >= request.max_tokens else "stop")
        if finish == "stop":
            new_tokens.append(EOS)
        versions = [run.version_at((i + 1) * per_token) for i in range(len(new_tokens))]
        self.generated_tokens += len(new_tokens)
        return GenerationResult(
            request_id=request.request_id,
            response_tokens=request.response_tokens + new_tokens,
            behaviour_logprobs=request.behaviour_logprobs + [-self.rng.random() * 3 for _ in new_tokens],
            token_versions=request.token_versions + versions,
            finish_reason=finish,
        )

    async def pause(self) -> None:
        """Stop every running generation's clock; they keep their state (vLLM's pause mode "keep")."""
        if not self._paused:
            now = anyio.current_time()
            for run in self._running:
                run.stop_clock(now)
            self._paused = True
            self._poke()
        await anyio.lowlevel.checkpoint()

    async def resume(self) -> None:
        if self._paused:
            now = anyio.current_time()
            for run in self._running:
                run.since = now
            self._paused = False
            self._poke()
        await anyio.lowlevel.checkpoint()

    @contextlib.asynccontextmanager
    async def _slot(self, abort: anyio.Event) -> AsyncIterator[bool]:
        """Hold one of `slots` while generating (yields True), or yield False when `abort` comes first."""
        if not self.cfg.slots:
            yield True
            return
        if self._slots is None:
            self._slots = anyio.Semaphore(self.cfg.slots)
        slots = self._slots
        got = False
        async with anyio.create_task_group() as tg:

            async def on_abort() -> None:
                await abort.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(on_abort)
            await slots.acquire()  # cancelled by on_abort: anyio's acquire takes nothing then
            got = True
            tg.cancel_scope.cancel()
        try:
            yield got
        finally:
            if got:
                slots.release()

    async def abort_all(self) -> None:
        if self._abort is not None:
            self._abort.set()
        self._abort = anyio.Event()
        self._poke()
        await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await self.abort_all()


class SimulatedTrainEngine:
    """A training step is a fixed sleep; its metrics are computed from the batch for real."""

    def __init__(self, cfg: SimulatedTrainerConfig) -> None:
        self.cfg = cfg
        self.steps = 0
        self.trained_versions: list[int] = []
        self.trained_prompts: list[str] = []  # prompt uids, in training order: "trained twice" is checkable

    async def start(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def train_step(self, batch: list[Sample], version: int) -> dict[str, float]:
        await anyio.sleep(self.cfg.step_latency_s)
        if self.cfg.fail_at_step and self.steps + 1 == self.cfg.fail_at_step:
            raise SimulatedEngineError(f"simulated training failure at step {self.cfg.fail_at_step}")
        self.steps += 1
        if self.cfg.record_prompts:
            self.trained_versions.append(version)
            self.trained_prompts.extend(s.prompt.uid for s in batch)
        rewards = [r for s in batch for r in s.rewards]
        tokens = sum(len(t.response_tokens) for s in batch for t in s.trajectories)
        return {"loss": -sum(rewards) / max(1, len(rewards)), "train_tokens": float(tokens)}

    async def save_state(self, directory: str) -> None:
        """A simulated 'model': its step count and the versions it trained at."""
        await anyio.Path(directory).mkdir(parents=True, exist_ok=True)
        await anyio.sleep(self.cfg.save_latency_s)
        state = {"steps": self.steps, "trained_versions": self.trained_versions, "trained_prompts": self.trained_prompts}
        await anyio.Path(directory, "simulated_trainer.json").write_bytes(msgspec.json.encode(state))

    async def load_state(self, directory: str) -> None:
        state = msgspec.json.decode(await anyio.Path(directory, "simulated_trainer.json").read_bytes())
        self.steps = state["steps"]
        self.trained_versions = state["trained_versions"]
        self.trained_prompts = state["trained_prompts"]

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()


class SimulatedTransport:
    """Sets the generation engine's version after a fixed delay; fails `sync_failures` times per sync.

    `generation` is one simulated engine or a `ReplicatedGeneration` of them (which loads every replica).
    `in_place`: pause every engine in place around the transfer, as the vLLM transports do (what
    `async_training.in_flight_updates` relies on: running generations then span the versions).
    """

    def __init__(
        self, generation: SimulatedGenerationEngine | ReplicatedGeneration, cfg: SimulatedTrainerConfig, *, in_place: bool = False
    ) -> None:
        self.generation = generation
        self.cfg = cfg
        self.in_place = in_place
        self._failures_left: dict[int, int] = {}
        self.attempts = 0

    def _engines(self) -> list[SimulatedGenerationEngine]:
        if isinstance(self.generation, ReplicatedGeneration):
            return [e for _, e in self.generation.push_targets()]
        return [self.generation]

    async def stage(self, version: int) -> None:
        """The simulated transfer has nothing to gather ahead of the pause."""

    async def push(self, version: int) -> None:
        self.attempts += 1
        left = self._failures_left.setdefault(version, self.cfg.sync_failures)
        paused = self._engines() if self.in_place else []
        try:
            for engine in paused:
                await engine.pause()
            await anyio.sleep(self.cfg.sync_latency_s)
            if left > 0:
                self._failures_left[version] = left - 1
                raise SimulatedEngineError(f"simulated weight-transfer failure for version {version}")
            self._failures_left.pop(version, None)
            self.generation.set_version(version)
        finally:
            with anyio.CancelScope(shield=True):  # every engine paused is resumed, whatever failed
                for engine in paused:
                    await engine.resume()


def simulated_reward(response_tokens: list[int]) -> float:
    """The simulated task's reward: the fraction of even tokens (any deterministic score would do)."""
    if not response_tokens:
        return 0.0
    return sum(1 for t in response_tokens if t % 2 == 0) / len(response_tokens)


class SimulatedTokenizer:
    """The simulated task's text ↔ tokens, enough for episodes' observations (no chat template).

    Decoding writes the ids as numbers, encoding takes one id per character: the round trip is NOT
    the identity, so a runtime that re-encoded a model turn's text would change its tokens (the
    property tests would see it).
    """

    chat_template = None
    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}

    def decode(self, tokens: list[int]) -> str:
        return " ".join(map(str, tokens))
