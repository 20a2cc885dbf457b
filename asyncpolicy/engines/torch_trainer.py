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
import structlog
import torch

from asyncpolicy.config import Config
from asyncpolicy.engines.torch_policy import LossTotals, PolicyBatch, collate, micro_batch_loss, token_logprobs
from asyncpolicy.samples import Sample

log = structlog.get_logger(__name__)

STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"


def lr_lambda(update: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak LR for optimizer update number `update` (0-based)."""
    if warmup and update < warmup:
        return (update + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


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
        return await anyio.to_thread.run_sync(self._train_step, batch, version, limiter=self.limiter)

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
        cfg, algo = self.cfg, self.cfg.algorithm
        assert self.optimizer is not None and self.scheduler is not None
        t0 = time.perf_counter()
        pb = collate(batch, version, algo, self.tokenizer.pad_token_id)
        if algo.staleness_correction == "decoupled":
            pb.prox_logprobs = self._no_grad_logprobs(self.model, pb)  # π_prox: current weights, before any update
        ref_all = self._no_grad_logprobs(self.ref_model, pb) if self.ref_model is not None else None

        # mini-batches: consecutive whole groups, so every update sees complete GRPO groups
        rows_per_sample = [len(s.trajectories) for s in batch]
        k = cfg.async_training.require_batches
        per_mini = math.ceil(len(batch) / k)
        bounds, row = [], 0
        for lo in range(0, len(batch), per_mini):
            n_rows = sum(rows_per_sample[lo : lo + per_mini])
            bounds.append((row, row + n_rows))
            row += n_rows

        sums: dict[str, float] = {}
        grad_norms, losses, weight_max, lrs = [], [], 0.0, []
        mbs = cfg.trainer.micro_batch_size
        for lo, hi in bounds:
            mini = pb.select(slice(lo, hi))
            totals = LossTotals(tokens=mini.num_tokens, seqs=float(hi - lo))
            self.optimizer.zero_grad(set_to_none=True)
            mini_loss = 0.0
            for mlo in range(lo, hi, mbs):
                rows = slice(mlo, min(mlo + mbs, hi))
                mb = pb.select(rows)
                ref = ref_all[rows, : mb.response_mask.shape[1]] if ref_all is not None else None
                loss, stats = micro_batch_loss(self.model, mb, algo, cfg.rollout.temperature, totals, ref)
                loss.backward()
                mini_loss += float(loss.detach())
                weight_max = max(weight_max, stats.pop("weight_max"))
                stats.pop("ratio_max")
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.trainer.grad_clip))
            if math.isfinite(grad_norm):
                lrs.append(self.scheduler.get_last_lr()[0])
                self.optimizer.step()
            else:  # one poisoned mini-batch must not destroy the weights; the metric shows it
                log.warning("non_finite_grad_norm_skipped_update", version=version, grad_norm=grad_norm)
            self.scheduler.step()  # the schedule advances either way: it counts updates planned, not taken
            self.updates += 1
            grad_norms.append(grad_norm)
            losses.append(mini_loss)

        tokens = max(sums.get("tokens", 0.0), 1.0)
        metrics = {
            "losses/loss": sum(losses) / len(losses),
            "losses/policy_loss": sums["pg_loss"] / tokens,
            "losses/approx_kl": sums["approx_kl_k1"] / tokens,
            "losses/approx_kl_k3": sums["approx_kl_k3"] / tokens,
            "losses/clipfrac": sums["clipped"] / tokens,
            "is/weight_mean": sums["weight_sum"] / tokens,
            "is/weight_max": weight_max,
            "actor/entropy": sums["entropy"] / tokens,
            "train/grad_norm": sum(grad_norms) / len(grad_norms),
            "train/lr": lrs[-1] if lrs else 0.0,
            "train/tokens": sums.get("tokens", 0.0),
            "train/updates": float(self.updates),
            "train/reward_mean": float(pb.rewards.mean()),
            "staleness/mean": float(pb.staleness.mean()),
            "staleness/max": float(pb.staleness.max()),
            "perf/train_step_s": time.perf_counter() - t0,
        }
        if "kl_ref" in sums:
            metrics["losses/kl_ref"] = sums["kl_ref"] / tokens
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------

    async def save_state(self, directory: str) -> None:
        """Model + tokenizer (HF format, loadable as model.path), optimizer, schedule and RNG states."""
        await anyio.to_thread.run_sync(self._save_state, directory, limiter=self.limiter)

    def _save_state(self, directory: str) -> None:
        assert self.optimizer is not None and self.scheduler is not None
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(d / MODEL_DIR)
        self.tokenizer.save_pretrained(d / MODEL_DIR)
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
