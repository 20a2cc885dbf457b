"""The CPU engine set: HF generation + torch trainer + in-memory weight transport, one model path."""

from __future__ import annotations

from asyncpolicy.config import Config
from asyncpolicy.engines.hf_generation import HFGenerationEngine
from asyncpolicy.engines.memory_transport import InMemoryTransport
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.engines.torch_trainer import TorchTrainEngine
from asyncpolicy.models.tiny import load_tokenizer, resolve_model_path


def build_hf_torch_engines(cfg: Config) -> EngineSet:
    """Resolve `model.path` (building the embedded model if asked) and wire the three engines."""
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
