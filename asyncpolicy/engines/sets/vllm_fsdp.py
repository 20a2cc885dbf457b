"""The GPU engine set: vLLM generation + FSDP2 training + a weight transport that joins them.

Placement (`rollout.colocate`):
* disjoint (default, the seed's layout): vLLM on GPUs 0..R-1, the trainer's ranks on GPUs
  R..R+T-1; weights move over NCCL. The R rollout GPUs hold R / `rollout.tensor_parallel_size`
  replicas, each its own AsyncLLM on consecutive GPUs (replica k on GPUs k*TP..k*TP+TP-1), behind
  one router (`replicas.ReplicatedGeneration`); one NCCL group joins the trainer's rank 0 and every
  replica's workers, so a sync is one broadcast.
* colocated: vLLM and a one-rank trainer share GPU 0 (memory split by
  `rollout.gpu_memory_utilization`); weights move over CUDA IPC, no copy between processes.

The supervisor's process never touches CUDA: vLLM's engine core and the trainer's ranks are
child processes that each see only their GPUs. When the model directory holds only a config
(random weights), vLLM starts with dummy weights and the trainer's initial weights are pushed as
version 0 as soon as both engines are up — whichever starts second does it — so rollout and
trainer always begin from the same policy.
"""

from __future__ import annotations

import random
from typing import Any

import anyio
import structlog

from asyncpolicy.config import Config
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.engines.generation.replicas import ReplicatedGeneration
from asyncpolicy.engines.generation.vllm import VLLMGenerationEngine, import_vllm, vllm_settings
from asyncpolicy.models.cache import has_weights
from asyncpolicy.engines.training.placement import physical_gpu, worker_init
from asyncpolicy.engines.transport.cuda import IPCTransport, NCCLTransport
from asyncpolicy.errors import ConfigError
from asyncpolicy.models.tiny import resolve_model_path

log = structlog.get_logger("asyncpolicy.vllm_fsdp")

def place(cfg: Config, n_visible: int) -> tuple[list[int], list[int]]:
    """(rollout GPUs, trainer GPUs) as indices into the visible devices; ConfigError if they don't fit."""
    r, t = cfg.rollout.n_gpus_per_node, cfg.trainer.n_gpus_per_node
    if r < 1 or t < 1:
        key = "rollout.n_gpus_per_node" if r < 1 else "trainer.n_gpus_per_node"
        raise ConfigError(f"config key {key!r} must be at least 1 for rollout.engine=vllm with trainer.engine=fsdp", key=key)
    if cfg.rollout.colocate:
        if r != 1 or t != 1:
            raise ConfigError(
                "config key 'rollout.colocate': the colocated mode shares ONE GPU; set "
                f"rollout.n_gpus_per_node=1 and trainer.n_gpus_per_node=1 (got {r} and {t})",
                key="rollout.colocate",
            )
        need = 1
        rollout, trainer = [0], [0]
    else:
        need = r + t
        rollout, trainer = list(range(r)), list(range(r, r + t))
    if n_visible < need:
        raise ConfigError(
            f"config keys 'rollout.n_gpus_per_node'={r} and 'trainer.n_gpus_per_node'={t} need {need} GPU(s) "
            f"{'(colocated)' if cfg.rollout.colocate else '(disjoint)'}, but {n_visible} are visible",
            key="rollout.n_gpus_per_node",
        )
    return rollout, trainer


def replica_gpus(cfg: Config, rollout_gpus: list[int]) -> list[list[int]]:
    """The rollout GPUs cut into consecutive slices of `rollout.tensor_parallel_size`, one per replica."""
    tp = cfg.rollout.tensor_parallel_size
    return [rollout_gpus[i : i + tp] for i in range(0, len(rollout_gpus), tp)]


def _visible_gpus() -> int:
    """GPUs visible to this process, counted without creating a CUDA context here."""
    import torch

    return torch.cuda.device_count()


class _InitialSync:
    """Push version 0 once both engines have started, whichever finishes second."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.started = 0
        self.lock = anyio.Lock()  # also keeps the two starts apart (colocated memory profiling)

    async def run_start(self, start: Any) -> None:
        async with self.lock:
            await start()
            self.started += 1
            if self.started == 2:
                await self.transport.push(0)


class _GatedGeneration(VLLMGenerationEngine):
    gate: _InitialSync

    async def start(self) -> None:
        await self.gate.run_start(super().start)


class _GatedReplicas(ReplicatedGeneration):
    gate: _InitialSync

    async def start(self) -> None:
        await self.gate.run_start(super().start)


class _GatedTrainer(FSDPTrainEngine):
    gate: _InitialSync

    async def start(self) -> None:
        await self.gate.run_start(super().start)


def build_vllm_fsdp_engines(cfg: Config, rng: random.Random | None = None) -> EngineSet:
    """The engines of a vLLM + FSDP2 run (not started). Raises ConfigError for what cannot work.

    rng: unused (the registry's builder signature); these engines seed from cfg.seed.
    """
    import_vllm()
    # `embedded` is the tiny built-in model, saved in Hugging Face format, so vLLM gets its directory like any
    # other; a directory with only a config and a tokenizer gives random weights (vLLM starts with dummy ones
    # and receives the trainer's at version 0)
    path = resolve_model_path(cfg)
    if cfg.rollout.top_p < 1.0:
        # vLLM's processed logprobs are renormalised over the nucleus; the trainer's are not
        log.warning("top_p_logprob_mismatch", top_p=cfg.rollout.top_p,
                    note="behaviour logprobs come from the truncated distribution; PPO ratios will be biased")
    rollout_gpus, trainer_gpus = place(cfg, _visible_gpus())
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'model.path': no tokenizer could be loaded from {path!r}: {e}", key="model.path") from None
    dummy = not has_weights(path)
    gate = _InitialSync()
    eos = tokenizer.eos_token_id
    slices = replica_gpus(cfg, rollout_gpus)
    gen: _GatedGeneration | _GatedReplicas
    if len(slices) == 1:
        gen = _GatedGeneration(vllm_settings(cfg, path, slices[0], eos))
    else:
        gen = _GatedReplicas.for_config(cfg, [VLLMGenerationEngine(vllm_settings(cfg, path, gpus, eos, k)) for k, gpus in enumerate(slices)])
    base = worker_init(cfg, path)
    trainer = _GatedTrainer(base, [physical_gpu(g) for g in trainer_gpus], timeout_s=cfg.trainer.worker_timeout_s)
    transport = IPCTransport(gen, trainer) if cfg.rollout.colocate else NCCLTransport(gen, trainer)
    gate.transport = transport
    gen.gate = gate
    trainer.gate = gate
    log.info(
        "gpu_placement",
        rollout_gpus=slices,
        trainer_gpus=trainer_gpus,
        transport=transport.kind,
        dummy_weights=dummy,
    )
    return EngineSet(generation=gen, trainer=trainer, transport=transport, tokenizer=tokenizer)

