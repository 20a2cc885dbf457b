"""Where the FSDP trainer's ranks run: what every rank is started with and which physical GPU each gets.

Shared by every engine set with the FSDP trainer (vLLM + FSDP, the CPU FSDP set, rollout servers)
and by `trainer-node`.
"""

from __future__ import annotations

import os

from asyncpolicy.config import Config
from asyncpolicy.engines.training import fsdp_worker as w


def worker_init(cfg: Config, model_path: str) -> w.WorkerInit:
    """What every FSDP rank is started with (rank, world size, GPU and port are filled in per rank)."""
    return w.WorkerInit(model_path=model_path, config=cfg)


def physical_gpu(index: int) -> int:
    """A visible-device index → the physical index the worker puts in its CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [int(x) for x in visible.split(",") if x.strip()]
    return ids[index] if ids else index


def node_gpus(cfg: Config) -> list[int | None]:
    """This node's ranks: one per GPU 0..n_gpus_per_node-1 (physical indices), or one CPU rank."""
    n = cfg.trainer.n_gpus_per_node
    return [None] if n == 0 else [physical_gpu(i) for i in range(n)]
