"""The simulated engine set: seeded fakes of every protocol, no model, no torch (tests, benchmarks, CI)."""

from __future__ import annotations

import random

from asyncpolicy.config import Config, replica_count
from asyncpolicy.engines.generation.replicas import ReplicatedGeneration
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.engines.simulated import SimulatedGenerationEngine, SimulatedTrainEngine, SimulatedTransport


def build_simulated_engines(cfg: Config, rng: random.Random) -> EngineSet:
    """Simulated generation (`rollout.replicas` of it behind the router when > 1), trainer and transport."""
    n = replica_count(cfg)
    gen: SimulatedGenerationEngine | ReplicatedGeneration = SimulatedGenerationEngine(cfg.rollout.simulated, rng)
    if n > 1:  # replicas share the run's Random: one seed still replays the whole run
        gen = ReplicatedGeneration.for_config(cfg, [SimulatedGenerationEngine(cfg.rollout.simulated, rng) for _ in range(n)])
    return EngineSet(
        generation=gen,
        trainer=SimulatedTrainEngine(cfg.trainer.simulated),
        transport=SimulatedTransport(gen, cfg.trainer.simulated, in_place=cfg.async_training.in_flight_updates),
    )
