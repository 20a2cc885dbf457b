"""The set-up both trainers share: the trainable policy, its reference, optimizer, schedule and pad id.

The CPU trainer (a worker thread) and every FSDP rank (a process) run the same training step
(`step.StepRunner`); they are built here, by one function, so a setting (gradient
checkpointing, dtype, attention kernel, compile, the reference for KL, the pad id, CPU threads)
cannot take effect in one trainer and not the other. What only a sharded policy needs — FSDP2's
`fully_shard` with its mixed precision — is the `shard` callback an FSDP rank passes in.

`TrainerSummary` is what a set-up produced, read off the built objects: both trainers log it at
start, and a test compares the two trainers' summaries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import torch

from asyncpolicy.config import Config
from asyncpolicy.engines.training.step import PolicyLogprobs, StepRunner, compile_layers, make_optimizer, make_scheduler
from asyncpolicy.models.cache import has_weights

# (the policy or reference wrapper, whether it is trained) -> the module the step runs; identity on one process
ShardFn = Callable[[PolicyLogprobs, bool], torch.nn.Module]
R = TypeVar("R", bound=StepRunner)


class TrainerSummary(msgspec.Struct, frozen=True, kw_only=True):
    """A trainer's set-up as built (not as configured): equal for the CPU trainer and an FSDP rank."""

    parameters: int
    dtype: str
    attn_implementation: str
    gradient_checkpointing: bool
    reference: bool  # a frozen reference policy for the KL penalty
    pad_id: int
    threads: int  # torch's intra-op CPU threads in the trainer's process
    lr: float  # the optimizer's LR after the schedule's first value
    weight_decay: float


class TrainerSetup:
    """The built parts of one trainer (one process's share of them on an FSDP rank)."""

    def __init__(
        self, cfg: Config, *, model: Any, policy: torch.nn.Module, ref: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, device: torch.device,
        n_params: int, names: list[str],
    ) -> None:
        self.cfg = cfg
        self.model = model  # the Hugging Face causal LM (sharded in place on an FSDP rank)
        self.policy = policy  # PolicyLogprobs over it, or the FSDP module wrapping one
        self.ref = ref
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.n_params = n_params
        self.names = names  # HF parameter names, tied weights once
        self.pad_id = padding_id(model)

    def runner(self, cls: type[R] = StepRunner, **kw: Any) -> R:  # type: ignore[assignment]
        """The training step over these parts; an FSDP rank passes its subclass and rank."""
        return cls(self.cfg, self.policy, self.ref, self.optimizer, self.scheduler, self.device, self.pad_id, **kw)

    def summary(self) -> TrainerSummary:
        group = self.optimizer.param_groups[0]
        return TrainerSummary(
            parameters=self.n_params,
            dtype=str(self.model.dtype).removeprefix("torch."),
            attn_implementation=str(self.model.config._attn_implementation),
            # what transformers' is_gradient_checkpointing (renamed in 5.2x) reads: a layer's flag
            gradient_checkpointing=any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()),
            reference=self.ref is not None,
            pad_id=self.pad_id,
            threads=torch.get_num_threads(),
            lr=float(group["lr"]),
            weight_decay=float(group["weight_decay"]),
        )


def build_trainer(
    cfg: Config, model_path: str, device: torch.device | None = None, shard: ShardFn | None = None
) -> TrainerSetup:
    """The policy (gradient checkpointing, compile, then `shard`), the reference when kl_coef > 0,
    AdamW over the policy's (sharded) parameters and the LR schedule."""
    device = device or torch.device("cpu")
    tr = cfg.trainer
    if device.type == "cpu" and tr.threads:
        torch.set_num_threads(tr.threads)
    wrap = shard or (lambda wrapper, trainable: wrapper)
    model = load_trainable(model_path, cfg, device)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if tr.compile:
        compile_layers(model)  # before sharding: fully_shard wraps the compiled layers
    model.train()
    names = [n for n, _ in model.named_parameters()]
    n_params = sum(p.numel() for p in model.parameters())
    policy = wrap(PolicyLogprobs.of(model, cfg), True)
    ref = None
    if cfg.algorithm.kl_coef > 0:  # the initial model at model.path, even on resume; frozen
        ref_model = load_trainable(model_path, cfg, device).requires_grad_(False).eval()
        ref = wrap(PolicyLogprobs.of(ref_model, cfg), False).eval()
    optimizer = make_optimizer(policy.parameters(), cfg)
    return TrainerSetup(
        cfg, model=model, policy=policy, ref=ref, optimizer=optimizer, scheduler=make_scheduler(optimizer, cfg),
        device=device, n_params=n_params, names=names,
    )


def load_trainable(model_path: str, cfg: Config, device: torch.device) -> Any:
    """The causal LM at `model_path` in `model.dtype` with `trainer.attn_implementation`, on `device`.

    A directory with only a config (benchmarks, tests of large shapes) gets a random init seeded
    with `cfg.seed` — the same on every rank, and for the reference as for the policy.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from asyncpolicy.models.tiny import load_model

    torch.manual_seed(cfg.seed)
    attn = cfg.trainer.attn_implementation
    if has_weights(model_path):
        model = load_model(model_path, cfg.model.dtype, attn)
    else:
        config = AutoConfig.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.model.dtype), attn_implementation=attn)
    return model.to(device)


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer in backward, non-reentrant: the variant FSDP2 and torch.compile
    support, and the default of the newer API (transformers 5.2x renamed the method)."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def padding_id(model: Any) -> int:
    """The id padding positions hold: the model config's pad token, else 0. Padding is masked and
    sits after every real token of its row, so its value never changes a result; it only has to
    be a row of the embedding (transformers refuses a config whose pad id is not). Read from the
    model, not the tokenizer, because an FSDP rank and a config-only directory have none."""
    pad = getattr(model.config, "pad_token_id", None)
    return pad if isinstance(pad, int) else 0
