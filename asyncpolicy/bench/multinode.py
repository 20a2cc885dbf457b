"""The multi-node trainer layout on one machine (FSDP over gloo, the embedded model): what
benchmarks/multinode_cpu.py times and tests/unit/test_multinode_cpu.py holds equal, 2 nodes × 1 rank
against 1 node × 2 ranks, on the same settings and batches."""

from __future__ import annotations

from asyncpolicy.bench.synthetic import random_batch
from asyncpolicy.samples import Sample

EMBEDDED_VOCAB = 40  # token ids the embedded model has
CPU_FSDP = ["rollout.engine=hf", "trainer.engine=fsdp", "trainer.n_gpus_per_node=0"]
# float64: the layouts sum in different orders; Adam would lift float32's machine-dependent noise to
# lr-sized steps where a gradient is zero in exact arithmetic (k_proj's bias)
LAYOUT_TRAIN = ["model.dtype=float64", "trainer.threads=1", "trainer.micro_batch_size=2", "trainer.lr=1e-2", "trainer.warmup_steps=0",
                "data.train_batch_size=3", "rollout.n=3", "async_training.require_batches=3", "algorithm.kl_coef=0.1"]


def layout_batch(seed: int) -> list[Sample]:
    """A seeded batch of the layout's shape (3 prompts × 3 responses) for the embedded model."""
    return random_batch(seed, tokens=range(EMBEDDED_VOCAB), versions=(0, 1))


def two_node_overrides(port: int, timeout_s: float, *extra: str) -> list[str]:
    """Config overrides of the layout over 2 nodes; node 1 adds `trainer.node_rank=1`."""
    return [*CPU_FSDP, *LAYOUT_TRAIN, "trainer.nnodes=2", f"trainer.master_port={port}",
            f"trainer.worker_timeout_s={timeout_s}", *extra]
