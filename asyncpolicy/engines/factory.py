"""Build the engines a config names. Heavy engines are imported only when asked for."""

from __future__ import annotations

import importlib
import random

from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import EngineSet

_MODULES = {
    ("simulated", "simulated"): ("asyncpolicy.engines.simulated",),
    ("hf", "torch"): ("asyncpolicy.engines.hf_torch",),
}
_GPU_MODULES = ("asyncpolicy.engines.vllm_fsdp",)


def import_engine_modules(cfg: Config) -> None:
    """Import what `build_engines` will need (torch, transformers, vllm: seconds).

    Run it in a worker thread before building: importing only fills `sys.modules`, so a cancelled
    start-up may abandon it, and the loop never waits on it.
    """
    pair = (cfg.rollout.engine, cfg.trainer.engine)
    for name in _MODULES.get(pair, _GPU_MODULES):
        module = importlib.import_module(name)
    if pair not in _MODULES:
        module.import_vllm()  # vllm itself (a ConfigError naming the extra when it is missing)


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
    from asyncpolicy.engines.vllm_fsdp import build_vllm_fsdp_engines

    return build_vllm_fsdp_engines(cfg)
