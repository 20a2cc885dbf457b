"""Advantages of a group of responses to one prompt, from their scalar rewards.

There is no value network: the other responses to the same prompt are the baseline.

* GRPO — Shao et al. 2024, "DeepSeekMath" (https://arxiv.org/abs/2402.03300), §4.1.2 outcome
  supervision: A_i = (r_i - mean(r)) / std(r). Dr. GRPO (Liu et al. 2025,
  https://arxiv.org/abs/2503.20783) drops the division by std (`norm_adv_by_std=False`) because it
  over-weights prompts whose responses all score alike.
* RLOO — Ahmadian et al. 2024, "Back to Basics" (https://arxiv.org/abs/2402.14740): the baseline of
  response i is the mean of the *other* n-1 rewards, A_i = r_i - mean_{j≠i} r_j
  = n/(n-1) · (r_i - mean(r)).

Every response of the group then gets its advantage on each of its tokens (outcome reward).
"""

from __future__ import annotations

import torch

EPS = 1e-6  # keeps a group whose rewards are all equal at advantage 0 instead of 0/0


def grpo_advantages(rewards: torch.Tensor, norm_by_std: bool = True) -> torch.Tensor:
    """(G, n) rewards → (G, n) group-normalised advantages; std is the unbiased one, as in DeepSeekMath."""
    mean = rewards.mean(dim=-1, keepdim=True)  # (G, 1)
    adv = rewards - mean
    if norm_by_std:
        n = rewards.shape[-1]
        std = rewards.std(dim=-1, keepdim=True) if n > 1 else torch.zeros_like(mean)  # (G, 1)
        adv = adv / (std + EPS)
    return adv


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(G, n) rewards → (G, n) leave-one-out advantages; a group of one has no baseline: 0."""
    n = rewards.shape[-1]
    if n < 2:
        return torch.zeros_like(rewards)
    baseline = (rewards.sum(dim=-1, keepdim=True) - rewards) / (n - 1)  # (G, n) mean of the others
    return rewards - baseline


def compute_advantages(rewards: torch.Tensor, estimator: str, norm_by_std: bool = True) -> torch.Tensor:
    """Dispatch on `algorithm.adv_estimator`."""
    if estimator == "grpo":
        return grpo_advantages(rewards, norm_by_std)
    if estimator == "rloo":
        return rloo_advantages(rewards)
    raise ValueError(f"unknown advantage estimator {estimator!r}")
