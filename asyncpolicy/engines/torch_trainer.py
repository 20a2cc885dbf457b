"""The CPU trainer: PPO/GRPO updates of a Hugging Face causal LM with plain torch.

One `train_step` = `async_training.require_batches` optimizer updates, each over one slice of the
batch's prompts, each accumulated over micro-batches of `trainer.micro_batch_size` responses.

LR schedule, counted in optimizer updates: linear warm-up over
`warmup_steps × require_batches` updates, then constant or cosine decay to 0 at
`total_training_steps × require_batches` updates. The scheduler's position is part of every
checkpoint, so a resumed run continues the same curve instead of restarting the warm-up.

All torch work runs in a worker thread under `self.limiter` (one at a time), which the weight
transport also holds while it copies the weights out, so it never sees a half-applied update.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import structlog
import torch

from asyncpolicy.config import Config
from asyncpolicy.algorithms.schedule import lr_lambda
from asyncpolicy.engines.torch_policy import LossTotals, PolicyBatch, collate, micro_batch_loss, token_logprobs
from asyncpolicy.samples import Sample

log = structlog.get_logger(__name__)

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


class UpdateStats(msgspec.Struct, frozen=True, kw_only=True):
    """What one optimizer update reports."""

    loss: float
    grad_norm: float
    weight_max: float  # largest importance weight of its tokens
    lr: float  # the LR it was taken with (0 when skipped)


class TorchTrainEngine:
    """`TrainEngine` + checkpointing over a transformers causal LM on the CPU."""

    def __init__(self, cfg: Config, model_path: str, tokenizer: Any) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.tokenizer = tokenizer
        self.limiter = anyio.CapacityLimiter(1)
        self.model: Any = None
        self.ref_model: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.updates = 0  # optimizer updates so far (the scheduler's clock)

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self._start, limiter=self.limiter)

    def _start(self) -> None:
        from asyncpolicy.models.tiny import load_model

        cfg, tr = self.cfg, self.cfg.trainer
        if tr.threads:
            torch.set_num_threads(tr.threads)
        torch.manual_seed(cfg.seed)
        model = load_model(self.model_path, cfg.model.dtype)
        if cfg.model.gradient_checkpointing:
            # transformers 5 renamed it; older versions only have the first name
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            model.config.use_cache = False
        model.train()
        self.model = model
        if cfg.algorithm.kl_coef > 0:  # the reference is always the initial model at model.path, even on resume
            self.ref_model = load_model(self.model_path, cfg.model.dtype).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
        per_step = cfg.async_training.require_batches
        warmup, total = tr.warmup_steps * per_step, tr.total_training_steps * per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda u: lr_lambda(u, warmup, total, tr.lr_schedule)
        )
        log.info(
            "trainer_started",
            parameters=sum(p.numel() for p in model.parameters()),
            dtype=cfg.model.dtype,
            total_updates=total,
            warmup_updates=warmup,
            schedule=tr.lr_schedule,
        )

    async def train_step(self, batch: list[Sample], version: int) -> dict[str, float]:
        if self.model is None:
            raise RuntimeError("TorchTrainEngine.train_step called before start()")
        # Abandonable: when the trainer's step deadline passes, the run fails at once instead of
        # waiting on a hung thread (the failed run keeps its last good checkpoint, not this state).
        return await anyio.to_thread.run_sync(
            self._train_step, batch, version, limiter=self.limiter, abandon_on_cancel=True
        )

    # -- the worker thread ----------------------------------------------------------------------

    def _no_grad_logprobs(self, model: Any, pb: PolicyBatch) -> torch.Tensor:
        """Logprobs (N, T-1) of the whole batch, micro-batch by micro-batch, without grad."""
        mbs = self.cfg.trainer.micro_batch_size
        n, width = pb.input_ids.shape[0], pb.response_mask.shape[1]
        out = torch.zeros((n, width))
        with torch.no_grad():
            for lo in range(0, n, mbs):
                mb = pb.select(slice(lo, lo + mbs))
                lp, _ = token_logprobs(model, mb, self.cfg.rollout.temperature)
                out[lo : lo + mbs, : lp.shape[1]] = lp.float()
        return out

    def _train_step(self, batch: list[Sample], version: int) -> dict[str, float]:
        algo = self.cfg.algorithm
        t0 = time.perf_counter()
        pb = collate(batch, version, algo, self.tokenizer.pad_token_id)
        if algo.staleness_correction == "decoupled":
            pb.prox_logprobs = self._no_grad_logprobs(self.model, pb)  # π_prox: current weights, before any update
        ref_all = self._no_grad_logprobs(self.ref_model, pb) if self.ref_model is not None else None
        sums: dict[str, float] = {}
        updates = [self._update(pb, rows, ref_all, sums, version) for rows in self._mini_batches(batch)]

        tokens = max(sums["tokens"], 1.0)
        metrics = {
            "losses/loss": sum(u.loss for u in updates) / len(updates),
            "losses/policy_loss": sums["pg_loss"] / tokens,
            "losses/approx_kl": sums["approx_kl_k1"] / tokens,
            "losses/approx_kl_k3": sums["approx_kl_k3"] / tokens,
            "losses/clipfrac": sums["clipped"] / tokens,
            "is/weight_mean": sums["weight_sum"] / tokens,
            "is/weight_max": max(u.weight_max for u in updates),
            "actor/entropy": sums["entropy"] / tokens,
            "train/grad_norm": sum(u.grad_norm for u in updates) / len(updates),
            "train/lr": updates[-1].lr,
            "train/tokens": sums["tokens"],
            "train/updates": float(self.updates),
            "train/reward_mean": float(pb.rewards.mean()),
            "staleness/mean": float(pb.staleness.mean()),
            "staleness/max": float(pb.staleness.max()),
            "perf/train_step_s": time.perf_counter() - t0,
        }
        if "kl_ref" in sums:
            metrics["losses/kl_ref"] = sums["kl_ref"] / tokens
        return metrics

    def _mini_batches(self, batch: list[Sample]) -> list[slice]:
        """Row ranges of `require_batches` mini-batches of consecutive whole groups (complete GRPO groups)."""
        per_mini = math.ceil(len(batch) / self.cfg.async_training.require_batches)
        slices, row = [], 0
        for lo in range(0, len(batch), per_mini):
            n_rows = sum(len(s.trajectories) for s in batch[lo : lo + per_mini])
            slices.append(slice(row, row + n_rows))
            row += n_rows
        return slices

    def _update(
        self, pb: PolicyBatch, rows: slice, ref_all: torch.Tensor | None, sums: dict[str, float], version: int
    ) -> UpdateStats:
        """One optimizer update over `rows`, accumulated micro-batch by micro-batch; adds token sums to `sums`."""
        assert self.optimizer is not None and self.scheduler is not None
        cfg = self.cfg
        mini = pb.select(rows)
        totals = LossTotals(tokens=mini.num_tokens, seqs=float(rows.stop - rows.start))
        self.optimizer.zero_grad(set_to_none=True)
        loss_total, weight_max = 0.0, 0.0
        for lo in range(rows.start, rows.stop, cfg.trainer.micro_batch_size):
            micro = slice(lo, min(lo + cfg.trainer.micro_batch_size, rows.stop))
            mb = pb.select(micro)
            ref = ref_all[micro, : mb.response_mask.shape[1]] if ref_all is not None else None
            loss, stats = micro_batch_loss(self.model, mb, cfg.algorithm, cfg.rollout.temperature, totals, ref)
            loss.backward()
            loss_total += float(loss.detach())
            weight_max = max(weight_max, stats.pop("weight_max"))
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.trainer.grad_clip))
        lr = float(self.scheduler.get_last_lr()[0])  # torch types an LR as float | Tensor
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:  # one poisoned mini-batch must not destroy the weights; the metric shows it
            log.warning("non_finite_grad_norm_skipped_update", version=version, grad_norm=grad_norm)
            lr = 0.0
        self.scheduler.step()  # the schedule advances either way: it counts updates planned, not taken
        self.updates += 1
        return UpdateStats(loss=loss_total, grad_norm=grad_norm, weight_max=weight_max, lr=lr)

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
                "updates": self.updates,
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
        self.updates = state["updates"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        log.info("trainer_state_loaded", directory=str(d), updates=self.updates)

    async def aclose(self) -> None:
        async with self.limiter:  # never drop the model under a running step or weight copy
            self.model = None
            self.ref_model = None
        self.ref_model = None
