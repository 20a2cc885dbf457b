"""Model-agnostic torch pieces of policy training, shared by the CPU trainer and the FSDP trainer.

Layout of a batch: one row per response, `prompt + response` right-padded to T tokens. Position t
of the logits predicts token t+1, so every per-token tensor below has T-1 columns and
`response_mask[:, t]` is 1 where token t+1 is a response token. Right padding keeps positions
0..L-1 for real tokens — the same positions the generation engine gives under left padding — and
causal attention never lets a real token see the padding after it.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch

from asyncpolicy.algorithms.advantages import compute_advantages
from asyncpolicy.algorithms.importance import anchor_and_weights
from asyncpolicy.algorithms.kl import kl_k1, kl_k3
from asyncpolicy.algorithms.ppo_loss import aggregate_loss, ppo_clip_token_loss
from asyncpolicy.config import AlgorithmConfig
from asyncpolicy.samples import Sample


class PolicyBatch(msgspec.Struct, kw_only=True):
    """Padded tensors of a batch of responses (N rows, T tokens)."""

    input_ids: torch.Tensor  # (N, T) long, right-padded
    attention_mask: torch.Tensor  # (N, T) long
    response_mask: torch.Tensor  # (N, T-1) float, 1 on target positions that are response tokens
    behaviour_logprobs: torch.Tensor  # (N, T-1) the rollout policy's logprob of each response token
    advantages: torch.Tensor  # (N, T-1) the response's advantage on each of its tokens
    rewards: torch.Tensor  # (N,)
    staleness: torch.Tensor  # (N,) trainer version - oldest version among the response's tokens
    prox_logprobs: torch.Tensor | None = None  # (N, T-1) decoupled PPO: recomputed before the update

    @property
    def num_tokens(self) -> float:
        return float(self.response_mask.sum())

    def select(self, rows: slice) -> PolicyBatch:
        """Rows `rows`, with padding columns that no selected row uses trimmed off."""
        length = int(self.attention_mask[rows].sum(dim=1).max())  # longest sequence of these rows
        cut = max(length, 2)

        def take(t: torch.Tensor | None, cols: int) -> Any:
            return None if t is None else t[rows, :cols]

        return PolicyBatch(
            input_ids=take(self.input_ids, cut),
            attention_mask=take(self.attention_mask, cut),
            response_mask=take(self.response_mask, cut - 1),
            behaviour_logprobs=take(self.behaviour_logprobs, cut - 1),
            advantages=take(self.advantages, cut - 1),
            rewards=self.rewards[rows],
            staleness=self.staleness[rows],
            prox_logprobs=take(self.prox_logprobs, cut - 1),
        )


def collate(samples: list[Sample], version: int, algo: AlgorithmConfig, pad_id: int) -> PolicyBatch:
    """Samples (groups of responses) → one padded PolicyBatch; advantages are computed per group."""
    rows = [(s.prompt.tokens, t) for s in samples for t in s.trajectories]
    advantages: list[float] = []
    for s in samples:
        rewards = torch.tensor([s.rewards], dtype=torch.float32)  # (1, n)
        advantages.extend(compute_advantages(rewards, algo.adv_estimator, algo.norm_adv_by_std)[0].tolist())
    n_rows = len(rows)
    T = max(max(len(p) + len(t.response_tokens) for p, t in rows), 2)
    input_ids = torch.full((n_rows, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, T), dtype=torch.long)
    response_mask = torch.zeros((n_rows, T - 1))
    behaviour = torch.zeros((n_rows, T - 1))
    adv = torch.zeros((n_rows, T - 1))
    for i, (prompt, traj) in enumerate(rows):
        P, R = len(prompt), len(traj.response_tokens)
        if P == 0:  # the first response token would have no position to be predicted from
            raise ValueError("a prompt needs at least one token (tokenizers add <bos> or a chat header)")
        input_ids[i, : P + R] = torch.tensor(prompt + traj.response_tokens, dtype=torch.long)
        attention_mask[i, : P + R] = 1
        # response token j sits at position P+j and is predicted at position P+j-1
        response_mask[i, P - 1 : P - 1 + R] = 1.0
        behaviour[i, P - 1 : P - 1 + R] = torch.tensor(traj.behaviour_logprobs, dtype=torch.float32)
        adv[i, P - 1 : P - 1 + R] = advantages[i]
    trajs = [t for _, t in rows]
    return PolicyBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        behaviour_logprobs=behaviour,
        advantages=adv,
        rewards=torch.tensor([t.reward for t in trajs], dtype=torch.float32),
        staleness=torch.tensor(
            [version - t.min_version if t.token_versions else 0 for t in trajs], dtype=torch.float32
        ),
    )


def token_logprobs(
    model: Any, batch: PolicyBatch, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs (N, T-1) of the actual next tokens under softmax(logits / temperature).

    The temperature scaling is the sampler's, so these equal the behaviour logprobs when the
    weights are the rollout's. Entropy (no grad) is for the `actor/entropy` metric only.
    """
    ids = batch.input_ids
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)  # (N, T)
    out = model(input_ids=ids, attention_mask=batch.attention_mask, position_ids=position_ids, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature  # (N, T-1, V)
    logp_all = torch.log_softmax(logits, dim=-1)  # (N, T-1, V)
    logprobs = logp_all.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N, T-1)
    return logprobs, entropy


class LossTotals(msgspec.Struct, kw_only=True):
    """Mini-batch sizes the micro-batch losses are normalised by (see ppo_loss.aggregate_loss)."""

    tokens: float
    seqs: float


def micro_batch_loss(
    model: Any,
    mb: PolicyBatch,
    algo: AlgorithmConfig,
    temperature: float,
    totals: LossTotals,
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The micro-batch's share of the mini-batch loss, and token-summed statistics for metrics."""
    logprobs, entropy = token_logprobs(model, mb, temperature, with_entropy=True)  # (N, T-1)
    mask = mb.response_mask
    old_logprobs, weights = anchor_and_weights(
        algo.staleness_correction, mb.behaviour_logprobs, mb.prox_logprobs, algo.tis_cap
    )
    pg_loss, _ratio, clipped = ppo_clip_token_loss(logprobs, old_logprobs, mb.advantages, algo.clip_ratio)
    token_loss = weights * pg_loss  # (N, T-1)
    stats: dict[str, float] = {}
    if algo.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("algorithm.kl_coef > 0 needs reference logprobs")
        kl_ref = kl_k3(logprobs, ref_logprobs)  # (N, T-1)
        token_loss = token_loss + algo.kl_coef * kl_ref
        stats["kl_ref"] = float((kl_ref.detach() * mask).sum())
    loss = aggregate_loss(token_loss, mask, algo.loss_agg_mode, totals.tokens, totals.seqs)
    with torch.no_grad():
        lp = logprobs.detach()
        masked_weights = weights.masked_fill(mask == 0, 0.0)
        stats.update(
            pg_loss=float((pg_loss * weights * mask).sum()),
            approx_kl_k1=float((kl_k1(old_logprobs, lp) * mask).sum()),  # KL(π_old || π_θ), cleanrl's old_approx_kl
            approx_kl_k3=float((kl_k3(old_logprobs, lp) * mask).sum()),  # cleanrl's approx_kl
            clipped=float((clipped * mask).sum()),
            entropy=float((entropy * mask).sum()) if entropy is not None else 0.0,
            weight_sum=float(masked_weights.sum()),
            weight_max=float(masked_weights.max()) if mask.any() else 0.0,
            tokens=float(mask.sum()),
        )
    return loss, stats
