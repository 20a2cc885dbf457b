"""The GPU trainer on a machine without GPUs: HF generation + FSDP2 ranks over gloo + a CPU weight copy.

Selected by `rollout.engine=hf trainer.engine=fsdp trainer.n_gpus_per_node=0`. The trainer is the
one GPU runs use — the same worker processes, commands, signal handling, stop order, checkpoints
and export — on one CPU rank, so `python -m asyncpolicy run` exercises that path where tests run.
Weights reach the generation model as full CPU tensors gathered by rank 0 (no NCCL, no CUDA IPC).
"""

from __future__ import annotations

import random
from asyncpolicy.config import Config
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.engines.generation.hf import HFGenerationEngine
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.engines.transport.memory import FullStateTransport
from asyncpolicy.engines.training.placement import worker_init
from asyncpolicy.models.tiny import load_tokenizer, resolve_model_path


def build_hf_fsdp_engines(cfg: Config, rng: random.Random | None = None) -> EngineSet:
    """The engines (not started) of a CPU run with the FSDP trainer: one gloo rank.

    rng: unused (the registry's builder signature); these engines seed from cfg.seed.
    """
    path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(path)
    generation = HFGenerationEngine(path, cfg.model.dtype, threads=cfg.trainer.threads)
    trainer = FSDPTrainEngine(worker_init(cfg, path), [None], timeout_s=cfg.trainer.worker_timeout_s)
    return EngineSet(
        generation=generation, trainer=trainer, transport=FullStateTransport(trainer, generation), tokenizer=tokenizer
    )
