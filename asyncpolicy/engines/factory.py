"""Build the engines a config names. Heavy engines are imported only when asked for."""

from __future__ import annotations

import random

from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import EngineSet


def build_engines(cfg: Config, *, rng: random.Random) -> EngineSet:
    """The generation engine, trainer engine and weight transport of this run (not yet started).

    The pair of engines was checked with the config (`config.ENGINE_PAIRS`).
    """
    pair = (cfg.rollout.engine, cfg.trainer.engine)
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
    if pair == ("hf", "fsdp"):
        from asyncpolicy.engines.hf_fsdp import build_hf_fsdp_engines

        return build_hf_fsdp_engines(cfg)
    from asyncpolicy.engines.vllm_fsdp import build_vllm_fsdp_engines

    return build_vllm_fsdp_engines(cfg)
