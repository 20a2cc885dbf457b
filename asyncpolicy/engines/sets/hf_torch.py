"""The CPU engine set: HF generation + torch trainer + in-memory weight transport, one model path."""

from __future__ import annotations

import random

import structlog

from asyncpolicy.config import Config
from asyncpolicy.engines.generation.hf import HFGenerationEngine
from asyncpolicy.engines.transport.memory import InMemoryTransport
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.engines.training.torch_trainer import TorchTrainEngine
from asyncpolicy.models.tiny import load_tokenizer, resolve_model_path

log = structlog.get_logger(__name__)


def build_hf_torch_engines(cfg: Config, rng: random.Random | None = None) -> EngineSet:
    """Resolve `model.path` (building the embedded model if asked) and wire the three engines.

    rng: unused (the registry's builder signature); these engines seed from cfg.seed.
    """
    if cfg.rollout.top_p < 1.0:
        # behaviour logprobs are under the renormalised nucleus, the trainer's under the full softmax
        log.warning(
            "top_p_logprob_mismatch",
            top_p=cfg.rollout.top_p,
            effect="behaviour logprobs exceed the trainer's: importance weights and PPO ratios are biased low",
        )
    path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(path)
    generation = HFGenerationEngine(path, cfg.model.dtype, threads=cfg.trainer.threads)
    trainer = TorchTrainEngine(cfg, path, tokenizer)
    return EngineSet(
        generation=generation,
        trainer=trainer,
        transport=InMemoryTransport(trainer, generation),
        tokenizer=tokenizer,
    )
