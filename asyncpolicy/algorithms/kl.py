"""Approximate KL divergence from sampled tokens, for logging and for an optional penalty.

Estimators of KL(q || p) from samples x ~ q with logr = log p(x) - log q(x)
(John Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):

* k1 = -logr — unbiased, high variance, can be negative per sample;
* k3 = (r - 1) - logr — unbiased, always ≥ 0, low variance. cleanrl logs both (`old_approx_kl`, `approx_kl`).

The penalty to the reference (initial) policy uses k3 per token, as in DeepSeekMath's GRPO (eq. 4),
added to the token loss with weight `algorithm.kl_coef`.
"""

from __future__ import annotations

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(π || π_ref) for tokens sampled from π."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref) for tokens sampled from π; ≥ 0."""
    logr = ref_logprobs - logprobs
    return torch.exp(logr) - 1.0 - logr
