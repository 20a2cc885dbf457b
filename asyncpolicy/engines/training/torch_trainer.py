"""The CPU trainer: PPO/GRPO updates of a Hugging Face causal LM with plain torch.

A training step is `step.StepRunner.run`, the same code every FSDP rank runs, over parts
built by the same `setup.build_trainer`: the model's loading and settings, the reference,
the mini-batch split, loss, non-finite-gradient rule, LR schedule (counted in optimizer updates)
and metrics are shared. This engine adds the worker thread and checkpoints. The
scheduler's position is part of every checkpoint, so a resumed run continues the same curve
instead of restarting the warm-up.

All torch work runs in a worker thread under `self.limiter` (one at a time), which the weight
transport also holds while it copies the weights out, so it never sees a half-applied update.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import structlog
import torch

from asyncpolicy.config import Config
from asyncpolicy.engines.training.setup import TrainerSummary, build_trainer
from asyncpolicy.engines.training.step import StepRunner
from asyncpolicy.samples import Sample

log = structlog.get_logger(__name__)

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


class TorchTrainEngine:
    """`TrainEngine` + checkpointing over a transformers causal LM on the CPU."""

    def __init__(self, cfg: Config, model_path: str, tokenizer: Any) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.limiter = anyio.CapacityLimiter(1)
        self.model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.step: StepRunner | None = None
        self.summary: TrainerSummary | None = None  # the set-up as built, after start()

    @property
    def updates(self) -> int:
        """Optimizer updates so far (the scheduler's clock)."""
        return self.scheduler.last_epoch if self.scheduler is not None else 0

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self._start, limiter=self.limiter)

    def _start(self) -> None:
        cfg, tr = self.cfg, self.cfg.trainer
        setup = build_trainer(cfg, self.model_path)
        self.model, self.optimizer, self.scheduler = setup.model, setup.optimizer, setup.scheduler
        self.step = setup.runner()
        self.summary = setup.summary()
        per_step = cfg.async_training.require_batches
        log.info(
            "trainer_started",
            **msgspec.structs.asdict(self.summary),
            total_updates=tr.total_training_steps * per_step,
            warmup_updates=tr.warmup_steps * per_step,
            schedule=tr.lr_schedule,
        )

    async def train_step(self, batch: list[Sample], version: int) -> dict[str, float]:
        step = self.step
        if step is None:
            raise RuntimeError("TorchTrainEngine.train_step called before start()")
        # Abandonable: when the trainer's step deadline passes, the run fails at once instead of
        # waiting on a hung thread (the failed run keeps its last good checkpoint, not this state).
        return await anyio.to_thread.run_sync(step.run, batch, version, limiter=self.limiter, abandon_on_cancel=True)

    # -- checkpoints ----------------------------------------------------------------------------

    async def save_state(self, directory: str) -> None:
        """Model + tokenizer (HF format, loadable as model.path), optimizer, schedule and RNG states."""
        await anyio.to_thread.run_sync(self._save_state, directory, limiter=self.limiter)

    def _save_state(self, directory: str) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._save_model(d / MODEL_DIR)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
            },
            d / STATE_FILE,
        )

    async def load_state(self, directory: str) -> None:
        await anyio.to_thread.run_sync(self._load_state, directory, limiter=self.limiter)

    async def save_model(self, directory: str) -> None:
        """The model as a Hugging Face directory (safetensors, config, tokenizer) that transformers and vLLM load."""
        await anyio.to_thread.run_sync(self._save_model, Path(directory), limiter=self.limiter)

    def _save_model(self, directory: Path) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)

    def _load_state(self, directory: str) -> None:
        from asyncpolicy.models.tiny import load_model

        assert self.optimizer is not None and self.scheduler is not None
        d = Path(directory)
        saved = load_model(str(d / MODEL_DIR), self.cfg.model.dtype)
        with torch.no_grad():
            self.model.load_state_dict(saved.state_dict())
        state = torch.load(d / STATE_FILE, weights_only=False)  # our own file: holds python RNG state
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        log.info("trainer_state_loaded", directory=str(d), updates=self.updates)

    async def aclose(self) -> None:
        async with self.limiter:  # never drop the model under a running step or weight copy
            self.model = None
            self.step = None
