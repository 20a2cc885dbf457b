"""Token-level PPO-clip policy loss and how token losses are averaged.

PPO: Schulman et al. 2017 (https://arxiv.org/abs/1707.06347), eq. 7, written as in cleanrl's
`ppo.py`: minimise max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)), i.e. maximise the clipped objective.
Here each response token is one "action" and carries its response's advantage.
"""

from __future__ import annotations

import torch


def ppo_clip_token_loss(
    logprobs: torch.Tensor,  # (B, T) log π_θ(token), with grad
    old_logprobs: torch.Tensor,  # (B, T) log π_old(token): the policy the trust region is around
    advantages: torch.Tensor,  # (B, T)
    clip_ratio: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped loss; also returns `ratio` and whether each token was clipped (for clipfrac)."""
    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)  # (B, T)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    pg_loss = torch.max(pg_loss1, pg_loss2)  # (B, T)
    clipped = (pg_loss2 > pg_loss1).float()  # the clipped branch was the active one
    return pg_loss, ratio, clipped


def aggregate_loss(
    token_loss: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T) 1.0 on response tokens
    mode: str,
    total_tokens: float,
    total_seqs: float,
    seq_tokens: torch.Tensor | None = None,  # (B, T) token count of each position's response; None = one response per row
) -> torch.Tensor:
    """This micro-batch's share of the mini-batch loss.

    Modes (the names verl uses):
    * "token-mean": every token of the mini-batch weighs the same (DAPO's choice, unbiased by length);
      sum over tokens / `total_tokens` of the whole mini-batch.
    * "seq-mean-token-mean": average each response over its tokens, then over responses (original
      GRPO; a short response's tokens weigh more); sum of per-response means / `total_seqs`.
    * "seq-mean-token-sum": sum each response's tokens, average over responses (Dr. GRPO's
      length-unbiased form when responses share a max length); sum of per-response sums / `total_seqs`.

    A packed row holds several responses, so its per-response means come from `seq_tokens`.

    Dividing by mini-batch totals, not micro-batch ones, makes gradient accumulation over
    micro-batches give exactly the gradient of the whole mini-batch.
    """
    masked = token_loss * mask
    if mode == "token-mean":
        return masked.sum() / max(total_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        if seq_tokens is not None:  # each token's share of its response's mean
            return (masked / seq_tokens.clamp(min=1.0)).sum() / max(total_seqs, 1.0)
        per_seq = masked.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)  # (B,)
        return per_seq.sum() / max(total_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return masked.sum(dim=-1).sum() / max(total_seqs, 1.0)
    raise ValueError(f"unknown loss_agg_mode {mode!r}")
