"""Staleness correction: which policy the PPO ratio is taken against, and the off-policy weight.

With asynchronous rollouts a sample's tokens come from a behaviour policy π_behav up to
`staleness_threshold` versions older than the trained one.

* "behaviour": plain PPO, ratio π_θ / π_behav and clip around π_behav. Simple, but the trust
  region is centred on a policy that may be several updates old.
* "decoupled": decoupled PPO as in AReaL (Fu et al. 2025, https://arxiv.org/abs/2505.24298, §4;
  after Hilton et al. 2022, "Batch size-invariance for policy optimization",
  https://arxiv.org/abs/2110.00641). The trainer recomputes proximal logprobs log π_prox with the
  current weights before the step's first update; the ratio π_θ / π_prox is clipped (the trust
  region is around a recent policy) and each token's loss is weighted by π_prox / π_behav,
  truncated at `tis_cap` (truncated importance sampling, TIS) so one stale token cannot dominate.
"""

from __future__ import annotations

import torch


def behaviour_weights(
    prox_logprobs: torch.Tensor,  # (B, T)
    behaviour_logprobs: torch.Tensor,  # (B, T)
    tis_cap: float,
) -> torch.Tensor:
    """Truncated π_prox / π_behav per token; a constant (no grad) in the loss."""
    return torch.exp(prox_logprobs - behaviour_logprobs).clamp(max=tis_cap).detach()


def anchor_and_weights(
    mode: str,
    behaviour_logprobs: torch.Tensor,  # (B, T)
    prox_logprobs: torch.Tensor | None,  # (B, T) or None in "behaviour" mode
    tis_cap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(old_logprobs the PPO ratio is against, per-token importance weight)."""
    if mode == "behaviour":
        return behaviour_logprobs, torch.ones_like(behaviour_logprobs)
    if mode == "decoupled":
        if prox_logprobs is None:
            raise ValueError("decoupled PPO needs proximal logprobs recomputed by the trainer")
        return prox_logprobs, behaviour_weights(prox_logprobs, behaviour_logprobs, tis_cap)
    raise ValueError(f"unknown staleness_correction {mode!r}")
