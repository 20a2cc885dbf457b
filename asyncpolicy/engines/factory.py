"""Build the engines a config names. Heavy engines are imported only when asked for."""

from __future__ import annotations

import random

from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.errors import ConfigError

SUPPORTED = {
    ("simulated", "simulated"),
    ("hf", "torch"),
    ("vllm", "fsdp"),
}


def build_engines(cfg: Config, *, rng: random.Random) -> EngineSet:
    """The generation engine, trainer engine and weight transport of this run (not yet started)."""
    pair = (cfg.rollout.engine, cfg.trainer.engine)
    if pair not in SUPPORTED:
        pairs = ", ".join(f"rollout.engine={g} with trainer.engine={t}" for g, t in sorted(SUPPORTED))
        raise ConfigError(
            f"config keys 'rollout.engine'={pair[0]!r} and 'trainer.engine'={pair[1]!r} do not go together; "
            f"supported: {pairs}",
            key="rollout.engine",
        )
    if pair == ("simulated", "simulated"):
        from asyncpolicy.engines.simulated import SimulatedGenerationEngine, SimulatedTrainEngine, SimulatedTransport

        gen = SimulatedGenerationEngine(cfg.rollout.simulated, rng)
        return EngineSet(
            generation=gen,
            trainer=SimulatedTrainEngine(cfg.trainer.simulated),
            transport=SimulatedTransport(gen, cfg.trainer.simulated),
        )
    if pair == ("hf", "torch"):
        from asyncpolicy.engines.hf_torch import build_hf_torch_engines

        return build_hf_torch_engines(cfg)
    from asyncpolicy.engines.vllm_fsdp import build_vllm_fsdp_engines

    return build_vllm_fsdp_engines(cfg)
