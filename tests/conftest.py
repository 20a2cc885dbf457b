"""Shared fixtures: Hypothesis profiles, simulated configs, and engines built around a registered RNG.

Hypothesis profiles (select with HYPOTHESIS_PROFILE=...):
  ci        the default: few examples per property, the whole property suite well under 90 s;
  thorough  many more examples, for a nightly run or after touching channels/actors.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, register_random, settings

from asyncpolicy.actors.rollouter import Rollouter
from asyncpolicy.channels import VersionedChannel
from asyncpolicy.config import Config, load_config
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.engines.simulated import SimulatedGenerationEngine, SimulatedTrainEngine, SimulatedTransport
from asyncpolicy.samples import Sample
from asyncpolicy.tasks.registry import simulated_task

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Plain tracebacks in log lines: structlog's default rich renderer prints every local of every frame
# (whole batches of samples), which costs seconds per failing-run test and buries the message.
structlog.configure(
    processors=[
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.StackInfoRenderer(),
        structlog.dev.set_exc_info,
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
        structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback),
    ]
)

# Simulated engines with tiny latencies: a run of a few steps takes tens of milliseconds. Sizes are
# pinned here, so retuning the defaults for real runs does not change what these tests exercise.
FAST_SIMULATED = (
    "rollout.engine=simulated",
    "trainer.engine=simulated",
    "data.train_batch_size=4",
    "data.max_response_length=12",
    "rollout.n=2",
    "rollout.max_concurrency=16",
    "async_training.max_queue_size=16",
    "async_training.staleness_threshold=1",
    "trainer.total_training_steps=4",
    "trainer.test_freq=0",
    "rollout.simulated.mean_latency_s=0.002",
    "trainer.simulated.step_latency_s=0.001",
    "trainer.simulated.sync_latency_s=0.0005",
    "task.num_prompts=16",
    "task.num_val_prompts=2",
    "progress=off",
)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh ASYNCPOLICY_CACHE for one test module: the embedded model is built there, never taken
    from the user's cache."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASYNCPOLICY_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def sim_config() -> Callable[..., Config]:
    """`sim_config("data.train_batch_size=2", ..., output_dir=path)`: a checked Config for simulated engines."""

    def make(*overrides: str, output_dir: str | os.PathLike[str] = "") -> Config:
        return load_config(None, [*FAST_SIMULATED, *overrides, f"output_dir={output_dir}"])

    return make


# One Random for the simulated engines under Hypothesis: registered, Hypothesis seeds it before each
# example (from the drawn seed when the test draws `st.random_module()`), so completion orders are
# explored, shrunk and replayed. Module-level: Hypothesis holds registered generators weakly.
HYPOTHESIS_RNG = random.Random(0)
register_random(HYPOTHESIS_RNG)


class RecordingTrainEngine:
    """A fake TrainEngine: the simulated one, plus a record of every batch it was asked to train.

    `steps` holds (version, [(epoch, index, min_version, max_version, oldest_token_version)]).
    """

    def __init__(self, inner: SimulatedTrainEngine) -> None:
        self.inner = inner
        self.steps: list[tuple[int, list[tuple[int, int, int, int, int]]]] = []
        self.batches: list[list[Sample]] = []

    async def start(self) -> None:
        await self.inner.start()

    async def train_step(self, batch: list[Sample], version: int) -> dict[str, float]:
        self.batches.append(list(batch))
        self.steps.append(
            (
                version,
                [
                    (
                        s.prompt.epoch,
                        s.prompt.index,
                        s.min_version,
                        s.max_version,
                        min((v for t in s.trajectories for v in t.token_versions), default=s.start_version),
                    )
                    for s in batch
                ],
            )
        )
        return await self.inner.train_step(batch, version)

    async def save_state(self, directory: str) -> None:
        await self.inner.save_state(directory)

    async def load_state(self, directory: str) -> None:
        await self.inner.load_state(directory)

    async def aclose(self) -> None:
        await self.inner.aclose()


class ObservedGenerationEngine:
    """A fake GenerationEngine: the simulated one, calling `on_generate(request)` as each call starts."""

    def __init__(self, inner: SimulatedGenerationEngine, on_generate: Callable[[Any], None]) -> None:
        self.inner = inner
        self.on_generate = on_generate

    @property
    def version(self) -> int:
        return self.inner.version

    async def start(self) -> None:
        await self.inner.start()

    async def generate(self, request: Any) -> Any:
        self.on_generate(request)
        return await self.inner.generate(request)

    async def abort_all(self) -> None:
        await self.inner.abort_all()

    async def aclose(self) -> None:
        await self.inner.aclose()


def simulated_engines(
    cfg: Config, rng: random.Random, *, on_generate: Callable[[Any], None] | None = None
) -> tuple[EngineSet, RecordingTrainEngine]:
    """The simulated engine set `build_engines` would make, around `rng`, with a recording trainer."""
    gen = SimulatedGenerationEngine(cfg.rollout.simulated, rng)
    trainer = RecordingTrainEngine(SimulatedTrainEngine(cfg.trainer.simulated))
    generation: Any = gen if on_generate is None else ObservedGenerationEngine(gen, on_generate)
    return EngineSet(generation=generation, trainer=trainer, transport=SimulatedTransport(gen, cfg.trainer.simulated)), trainer


@pytest.fixture(scope="session")
def engines_for() -> Callable[..., tuple[EngineSet, RecordingTrainEngine]]:
    """`engines_for(cfg, rng=None, on_generate=None)`: simulated engines with a RecordingTrainEngine."""

    def make(
        cfg: Config, rng: random.Random | None = None, on_generate: Callable[[Any], None] | None = None
    ) -> tuple[EngineSet, RecordingTrainEngine]:
        return simulated_engines(cfg, rng if rng is not None else random.Random(cfg.seed), on_generate=on_generate)

    return make


@pytest.fixture(scope="session")
def recording_trainer() -> Callable[[Config], RecordingTrainEngine]:
    """`recording_trainer(cfg)`: the simulated trainer recording every batch, for an engine set a test builds itself."""

    def make(cfg: Config) -> RecordingTrainEngine:
        return RecordingTrainEngine(SimulatedTrainEngine(cfg.trainer.simulated))

    return make


@pytest.fixture(scope="session")
def hypothesis_random() -> random.Random:
    """The Random registered with Hypothesis: pass it to simulated engines inside @given tests."""
    return HYPOTHESIS_RNG


@pytest.fixture(scope="session")
def rollouter_for() -> Callable[..., tuple[Rollouter, Any, VersionedChannel[Sample]]]:
    """`rollouter_for(cfg, engine=None, scorer=None)`: a Rollouter on the simulated task and engine."""

    def make(cfg: Config, engine: Any = None, scorer: Any = None) -> tuple[Rollouter, Any, VersionedChannel[Sample]]:
        engine = engine if engine is not None else SimulatedGenerationEngine(cfg.rollout.simulated, random.Random(cfg.seed))
        at = cfg.async_training
        channel: VersionedChannel[Sample] = VersionedChannel(at.max_queue_size, at.staleness_threshold)
        task = simulated_task(cfg)
        return Rollouter(cfg, engine, channel, task.train, scorer or task.scorer), engine, channel

    return make


class RolloutServers:
    """`python -m asyncpolicy serve-rollout` processes on 127.0.0.1, each on a port the kernel picks.

    `start(*overrides)` returns the server's host:port once it has printed that it listens (its
    engine is up); `kill(address)` ends one with SIGKILL; `close()` ends the rest (tests call it in
    a finally, or use the `rollout_servers` fixture, which does).
    """

    def __init__(self, directory: Any) -> None:
        self.directory = directory
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *overrides: str, ready_within_s: float = 300.0) -> str:
        log_path = self.directory / f"server-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "asyncpolicy", "serve-rollout", "--port", "0", "log_level=warning", *overrides],
                stdout=log, stderr=log, start_new_session=True,
            )
        deadline = time.monotonic() + ready_within_s  # a hang guard only: a started server answers at once
        while True:
            found = re.search(r"listening on (\S+:\d+)", log_path.read_text(errors="replace"))
            if found:
                self.procs[found.group(1)] = proc
                return found.group(1)
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"serve-rollout did not start (exit {proc.poll()}): {log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self, address: str) -> None:
        proc = self.procs.pop(address)
        proc.kill()
        proc.wait()

    def close(self) -> None:
        for address in list(self.procs):
            self.kill(address)


@pytest.fixture
def rollout_servers(tmp_path: Any) -> Iterator[RolloutServers]:
    servers = RolloutServers(tmp_path)
    try:
        yield servers
    finally:
        servers.close()
