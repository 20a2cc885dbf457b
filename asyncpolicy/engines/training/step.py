"""One PPO/GRPO training step for both trainers: collation, micro-batch loss, updates, metrics.

The CPU trainer (a worker thread) and every FSDP rank (a process) run the same `StepRunner.run`;
an FSDP rank subclasses it for what only a sharded, multi-process policy needs (dealing rows to
ranks, the global grad norm of DTensors, all-reducing the step's sums). So the mini-batch split,
the micro-batch order, the loss normalisation, the non-finite-gradient rule and the metric keys
are one rule for both.

Layout of a batch: one row per response, `prompt + response` right-padded to T tokens. Position t
of the logits predicts token t+1, so every per-token tensor below has T-1 columns and
`response_mask[:, t]` is 1 where token t+1 is a response token. Right padding keeps positions
0..L-1 for real tokens — the same positions the generation engine gives under left padding — and
causal attention never lets a real token see the padding after it.

With `trainer.packing` a micro-batch is instead ONE row: its sequences concatenated without
padding, position ids restarting at 0 for each. transformers reads those restarts (no attention
mask given) as packed sequences and builds a block-diagonal causal mask (sdpa/flex) or runs
varlen kernels (flash_attention_2), so no token sees another sequence. The per-token tensors
follow the row: the last position of a sequence predicts the next sequence's first token and is
masked out.

Statistics stay tensors on the policy's device until the end of the step: the one device→host
copy is the final `tolist()`, plus one grad-norm read per optimizer update (the skip decision).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch.utils.checkpoint

import msgspec
import structlog
import torch

from asyncpolicy.algorithms.advantages import compute_advantages
from asyncpolicy.algorithms.importance import anchor_and_weights
from asyncpolicy.algorithms.kl import kl_k1, kl_k3
from asyncpolicy.algorithms.ppo_loss import aggregate_loss, ppo_clip_token_loss
from asyncpolicy.algorithms.schedule import lr_lambda
from asyncpolicy.config import AlgorithmConfig, Config
from asyncpolicy.samples import Sample

log = structlog.get_logger(__name__)



# ---- the batch ----------------------------------------------------------------------------------


class PolicyBatch(msgspec.Struct, kw_only=True):
    """Padded tensors of a batch of responses (N rows, T tokens), on the CPU."""

    input_ids: torch.Tensor  # (N, T) long, right-padded
    attention_mask: torch.Tensor  # (N, T) long
    response_mask: torch.Tensor  # (N, T-1) float, 1 on target positions that are the model's response tokens
    behaviour_logprobs: torch.Tensor  # (N, T-1) the rollout policy's logprob of each response token
    advantages: torch.Tensor  # (N, T-1) the response's advantage on each of its tokens
    same_version_mask: torch.Tensor  # (N, T-1) float, 1 on response tokens sampled by the trainer's version
    rewards: torch.Tensor  # (N,)

    @property
    def num_tokens(self) -> float:
        return float(self.response_mask.sum())

    def select(self, rows: slice | list[int]) -> PolicyBatch:
        """Rows `rows`, with padding columns that no selected row uses trimmed off."""
        length = int(self.attention_mask[rows].sum(dim=1).max())  # longest sequence of these rows
        cut = max(length, 2)
        return PolicyBatch(
            input_ids=self.input_ids[rows, :cut],
            attention_mask=self.attention_mask[rows, :cut],
            response_mask=self.response_mask[rows, : cut - 1],
            behaviour_logprobs=self.behaviour_logprobs[rows, : cut - 1],
            advantages=self.advantages[rows, : cut - 1],
            same_version_mask=self.same_version_mask[rows, : cut - 1],
            rewards=self.rewards[rows],
        )

    def micro(self, rows: list[int], device: torch.device, packed: bool = False) -> MicroBatch:
        """Rows `rows` as a MicroBatch on `device` (one packed row with `packed`); no rows = one
        padding row that adds exactly 0.

        An FSDP rank with fewer rows than the others still runs every forward/backward (the
        collectives must line up), so an empty micro-batch is a real one whose masks are all 0.
        """
        if rows and packed:
            return self._packed(rows, device)
        if rows:
            sub = self.select(rows)
        else:
            zeros = torch.zeros((1, 1))
            sub = PolicyBatch(
                input_ids=torch.zeros((1, 2), dtype=torch.long),
                attention_mask=torch.ones((1, 2), dtype=torch.long),
                response_mask=zeros, behaviour_logprobs=zeros, advantages=zeros, same_version_mask=zeros,
                rewards=torch.zeros(1),
            )
        index = sub.response_mask.flatten().nonzero().squeeze(1)  # (K,) built here: no device sync later
        full = bool(sub.attention_mask.all())  # no padding: let SDPA take its fastest causal path

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        return MicroBatch(
            input_ids=put(sub.input_ids),
            attention_mask=None if full else put(sub.attention_mask),
            response_index=put(index),
            response_mask=put(sub.response_mask),
            behaviour_logprobs=put(sub.behaviour_logprobs),
            advantages=put(sub.advantages),
            same_version_mask=put(sub.same_version_mask),
        )

    def _packed(self, rows: list[int], device: torch.device) -> MicroBatch:
        """Rows `rows` concatenated into one (1, S) row: S = their real tokens, no padding."""
        lengths = self.attention_mask[rows].sum(dim=1).tolist()
        ids, pos = [], []
        per_token: dict[str, list[torch.Tensor]] = {k: [] for k in _PER_TOKEN}
        seq_tokens = []
        for r, L in zip(rows, lengths, strict=True):
            ids.append(self.input_ids[r, :L])
            pos.append(torch.arange(L))
            for k in _PER_TOKEN:  # a sequence's L-1 targets, then 0 where its last token meets the next sequence
                per_token[k].append(torch.cat([getattr(self, k)[r, : L - 1], torch.zeros(1)]))
            n = self.response_mask[r].sum()
            seq_tokens.append(n.expand(L))  # the response's token count on each of its positions
        if sum(lengths) < 2:  # one 1-token sequence: add a padding position so the row has a target column
            ids.append(torch.zeros(1, dtype=torch.long))
            pos.append(torch.zeros(1, dtype=torch.long))
            for k in _PER_TOKEN:
                per_token[k].append(torch.zeros(1))
            seq_tokens.append(torch.zeros(1))

        def row(parts: list[torch.Tensor], cut: bool = True) -> torch.Tensor:
            t = torch.cat(parts).unsqueeze(0)  # (1, S)
            return (t[:, :-1] if cut else t).to(device, non_blocking=True)  # per-token tensors: (1, S-1)

        response_mask = torch.cat(per_token["response_mask"])[:-1]
        return MicroBatch(
            input_ids=row(ids, cut=False),
            attention_mask=None,
            position_ids=row(pos, cut=False),
            response_index=response_mask.nonzero().squeeze(1).to(device, non_blocking=True),
            seq_tokens=row(seq_tokens),
            **{k: row(v) for k, v in per_token.items()},
        )


_PER_TOKEN = ("response_mask", "behaviour_logprobs", "advantages", "same_version_mask")  # PolicyBatch's (N, T-1) tensors


class MicroBatch(msgspec.Struct, kw_only=True):
    """One forward/backward's rows, on the policy's device."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), None when no row is padded
    response_index: torch.Tensor  # (K,) flat indices into (B, T-1) of the response tokens
    response_mask: torch.Tensor  # (B, T-1)
    behaviour_logprobs: torch.Tensor  # (B, T-1)
    advantages: torch.Tensor  # (B, T-1)
    same_version_mask: torch.Tensor  # (B, T-1)
    position_ids: torch.Tensor | None = None  # (1, S) restarting at 0 per sequence when packed; None = 0..T-1 per row
    seq_tokens: torch.Tensor | None = None  # (1, S-1) packed: the token count of each position's response


def collate(samples: list[Sample], version: int, algo: AlgorithmConfig, pad_id: int) -> PolicyBatch:
    """Samples (groups of responses) → one padded PolicyBatch; advantages are computed per group.

    `version` is the trainer's: it marks the tokens its current weights sampled
    (`same_version_mask`, for the mismatch metric).
    """
    rows = [(s.prompt.tokens, t) for s in samples for t in s.trajectories]
    advantages: list[float] = []
    for s in samples:
        rewards = torch.tensor([s.rewards], dtype=torch.float64)  # (1, n)
        advantages.extend(compute_advantages(rewards, algo.adv_estimator, algo.norm_adv_by_std)[0].tolist())
    n_rows = len(rows)
    T = max(max(len(p) + len(t.response_tokens) for p, t in rows), 2)
    input_ids = torch.full((n_rows, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, T), dtype=torch.long)
    response_mask = torch.zeros((n_rows, T - 1))
    behaviour = torch.zeros((n_rows, T - 1))
    adv = torch.zeros((n_rows, T - 1))
    same = torch.zeros((n_rows, T - 1))
    for i, (prompt, traj) in enumerate(rows):
        P, R = len(prompt), len(traj.response_tokens)
        if P == 0:  # the first response token would have no position to be predicted from
            raise ValueError("a prompt needs at least one token (tokenizers add <bos> or a chat header)")
        input_ids[i, : P + R] = torch.tensor(prompt + traj.response_tokens, dtype=torch.long)
        attention_mask[i, : P + R] = 1
        # response token j sits at position P+j and is predicted at position P+j-1; an episode's
        # environment tokens (loss mask 0) are context only: no loss, KL, entropy or count
        model = torch.tensor(traj.loss_mask, dtype=torch.float32) if traj.loss_mask else torch.ones(R)
        response_mask[i, P - 1 : P - 1 + R] = model
        behaviour[i, P - 1 : P - 1 + R] = torch.tensor(traj.behaviour_logprobs, dtype=torch.float32) * model
        adv[i, P - 1 : P - 1 + R] = advantages[i] * model
        versions = torch.tensor(traj.token_versions[:R], dtype=torch.long)
        same[i, P - 1 : P - 1 + len(versions)] = (versions == version).float() * model[: len(versions)]
    trajs = [t for _, t in rows]
    return PolicyBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        behaviour_logprobs=behaviour,
        advantages=adv,
        same_version_mask=same,
        rewards=torch.tensor([t.reward for t in trajs], dtype=torch.float32),
    )


def mini_batches(batch: list[Sample], n: int) -> list[slice]:
    """Row ranges of `n` mini-batches of consecutive whole groups (GRPO groups are never split).

    Sizes differ by at most one group, and there are exactly `n` of them whenever the batch has
    `n` groups or more, so the LR schedule (counted in updates) advances as configured.
    """
    groups = len(batch)
    n = max(1, min(n, groups))
    slices, group, row = [], 0, 0
    for k in range(n):
        take = groups // n + (1 if k < groups % n else 0)
        n_rows = sum(len(s.trajectories) for s in batch[group : group + take])
        slices.append(slice(row, row + n_rows))
        group, row = group + take, row + n_rows
    return slices


class LossTotals(msgspec.Struct, kw_only=True):
    """Mini-batch sizes the micro-batch losses are normalised by (see ppo_loss.aggregate_loss).

    Totals of the WHOLE mini-batch, across micro-batches and ranks: that keeps gradient
    accumulation exact however the rows are split.
    """

    tokens: float
    seqs: float  # responses with at least one token (an empty one has no token to average)

    @classmethod
    def of(cls, pb: PolicyBatch, rows: slice) -> LossTotals:
        per_row = pb.response_mask[rows].sum(dim=1)  # (n,)
        return cls(tokens=float(per_row.sum()), seqs=float((per_row > 0).sum()))


# ---- the forward pass ---------------------------------------------------------------------------


class PolicyLogprobs(torch.nn.Module):
    """A causal LM → logprobs of its response tokens under softmax(logits / temperature).

    The temperature scaling is the sampler's, so these equal the behaviour logprobs when the
    weights are the rollout's. The LM head runs on response positions alone (no (B, T, V) logits
    for the prompt), `chunk_tokens` of them at a time: each chunk's fp32 (chunk, V) logits give
    its logprobs and entropy in one pass and are dropped; backward recomputes them
    (torch.utils.checkpoint), so no more than one chunk's logits are ever held. It is the root module an FSDP
    rank shards, so its forward gathers the embeddings and LM head; it expects a transformers
    CausalLM with `.model` and `.lm_head`.
    """

    def __init__(self, model: Any, temperature: float, chunk_tokens: int = 0, compile_head: bool = False) -> None:
        super().__init__()
        self.model = model  # the name is part of FSDP checkpoints' keys
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens  # 0 = all response tokens in one chunk, not recomputed
        self.head_maths = torch.compile(head_logprobs) if compile_head else head_logprobs

    @classmethod
    def of(cls, model: Any, cfg: Config) -> PolicyLogprobs:
        """`model` under the run's sampling temperature, logprob chunks and `trainer.compile`."""
        return cls(model, cfg.rollout.temperature, cfg.trainer.logprob_chunk_tokens, compile_head=cfg.trainer.compile)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, response_index: torch.Tensor,
        with_entropy: bool = False, position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T-1) logprobs (0 off the response) and, on request, (B, T-1) entropy without grad.

        `position_ids` restarting at 0 within a row mark packed sequences (attention_mask None)."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)  # (B, T)
        hidden = self.model.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, H)
        h = hidden[:, :-1].reshape(B * (T - 1), -1).index_select(0, response_index)  # (K, H)
        targets = input_ids[:, 1:].reshape(-1).index_select(0, response_index)  # (K,)
        size = self.chunk_tokens or max(h.shape[0], 1)
        # one chunk holds its logits for backward as before: recomputing costs a matmul and buys nothing then
        recompute = 0 < self.chunk_tokens < h.shape[0] and torch.is_grad_enabled()
        lps, ents = [], []
        for hc, tc in zip(h.split(size), targets.split(size), strict=True):
            if recompute:
                lp_c, ent_c = torch.utils.checkpoint.checkpoint(
                    self._head, hc, tc, with_entropy, use_reentrant=False
                )
            else:
                lp_c, ent_c = self._head(hc, tc, with_entropy)
            lps.append(lp_c)
            ents.append(ent_c)
        lp = torch.cat(lps) if lps else h.new_zeros(0, dtype=torch.promote_types(h.dtype, torch.float32))  # (K,)
        # back to (B, T-1), out of place: FSDP's backward hooks must see a fresh tensor, not a view
        where = (response_index // (T - 1), response_index % (T - 1))
        logprobs = lp.new_zeros((B, T - 1)).index_put(where, lp)
        entropy = None
        if with_entropy:
            flat = torch.cat(ents) if ents else lp.new_zeros(0)  # (K,)
            entropy = lp.new_zeros((B, T - 1)).index_put(where, flat.detach())
        return logprobs, entropy

    def _head(self, h: torch.Tensor, targets: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk: (chunk,) logprobs of `targets` and (chunk,) entropy (no grad; zeros unless asked)."""
        logits = self.model.lm_head(h)  # (chunk, V) in the compute dtype
        return self.head_maths(logits, targets, self.temperature, with_entropy)


def head_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk,) log softmax(logits / T)[target] in fp32 (fp64 for a float64 model) and (chunk,) entropy
    (no grad; zeros unless asked).

    Eager, each step below is a pass over a (chunk, V) fp32 tensor; compiled (`trainer.compile`),
    the cast, scaling and reductions fuse into a few passes over the compute-dtype logits.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (chunk, V), fp32 at least
    lse = torch.logsumexp(z, dim=-1)  # (chunk,)
    lp = z.gather(-1, targets[:, None]).squeeze(-1) - lse  # (chunk,)
    with torch.no_grad():
        if with_entropy:  # H = -Σ p log p = lse - Σ p·z
            ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
        else:
            ent = lp.new_zeros(lp.shape)
    return lp, ent


def compile_layers(model: Any) -> None:
    """`trainer.compile`: torch.compile each decoder layer in place, so parameter names, state
    dicts and FSDP's per-layer sharding stay as they are (compile first, then shard)."""
    for layer in model.model.layers:
        layer.compile()


def token_logprobs(model: Any, batch: PolicyBatch, temperature: float) -> torch.Tensor:
    """(N, T-1) logprobs of a whole batch's response tokens (0 elsewhere) under a plain HF model."""
    mb = batch.micro(list(range(batch.input_ids.shape[0])), torch.device("cpu"))
    lp, _ = PolicyLogprobs(model, temperature)(mb.input_ids, mb.attention_mask, mb.response_index)
    return lp


# ---- the loss -----------------------------------------------------------------------------------

# Token-summed statistics of a micro-batch, in this order; `StepRunner.run` turns them into metrics.
STATS = (
    "loss",  # the micro-batch's share of its mini-batch loss (summed: the mini-batch loss)
    "pg_loss",  # importance-weighted PPO-clip loss
    "kl_k1",  # KL(π_old || π_θ), cleanrl's old_approx_kl
    "kl_k3",  # cleanrl's approx_kl
    "clipped",
    "entropy",
    "weight_sum",  # truncated importance weights π_prox / π_behav
    "ratio_sum",  # PPO ratio π_θ / π_old
    "behaviour_kl_k3",  # KL(π_behav || π_θ)
    "kl_ref",  # KL(π_θ || π_ref), the penalty's (0 when kl_coef = 0)
    "mismatch_kl_k3",  # KL(π_behav || π_trainer) on tokens the trainer's own version sampled
    "mismatch_tokens",
)
_S = {name: i for i, name in enumerate(STATS)}


def _msum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of x where mask is set; whatever x holds elsewhere (even inf/NaN) is ignored."""
    return torch.where(mask > 0, x, 0.0).sum()


def micro_batch_loss(
    logprobs: torch.Tensor,  # (B, T-1) log π_θ, with grad
    entropy: torch.Tensor | None,  # (B, T-1)
    mb: MicroBatch,
    algo: AlgorithmConfig,
    totals: LossTotals,
    pre_update: torch.Tensor | None,  # (B, T-1) log π of the weights before the step's first update, or None
    ref_logprobs: torch.Tensor | None = None,  # (B, T-1) log π_ref, needed when kl_coef > 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the micro-batch's share of the mini-batch loss, its STATS as a float64 vector, its largest weight).

    `pre_update` is π_prox of decoupled PPO; it also gives the mismatch KL, so it is passed
    whenever it is known, in either staleness-correction mode.
    """
    mask = mb.response_mask
    old_logprobs, weights = anchor_and_weights(
        algo.staleness_correction, mb.behaviour_logprobs, pre_update, algo.tis_cap
    )
    pg_loss, ratio, clipped = ppo_clip_token_loss(logprobs, old_logprobs, mb.advantages, algo.clip_ratio)
    token_loss = weights * pg_loss  # (B, T-1)
    kl_ref = torch.zeros_like(logprobs)
    if algo.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("algorithm.kl_coef > 0 needs reference logprobs")
        kl_ref = kl_k3(logprobs, ref_logprobs)  # (B, T-1)
        token_loss = token_loss + algo.kl_coef * kl_ref
    loss = aggregate_loss(token_loss, mask, algo.loss_agg_mode, totals.tokens, totals.seqs, mb.seq_tokens)
    with torch.no_grad():
        lp = logprobs.detach()
        same = mb.same_version_mask if pre_update is not None else torch.zeros_like(mask)
        # k3 of KL(behaviour || trainer) from tokens the engine sampled (http://joschu.net/blog/kl-approx.html),
        # in float64: agreeing engines differ by float noise, whose square float32 would round away
        mismatch = (
            kl_k3(mb.behaviour_logprobs.double(), pre_update.double()) if pre_update is not None else torch.zeros_like(lp)
        )
        stats = torch.stack([
            loss.detach(),
            _msum(pg_loss * weights, mask),
            _msum(kl_k1(old_logprobs, lp), mask),
            _msum(kl_k3(old_logprobs, lp), mask),
            _msum(clipped, mask),
            _msum(entropy, mask) if entropy is not None else lp.new_zeros(()),
            _msum(weights, mask),
            _msum(ratio.detach(), mask),
            _msum(kl_k3(mb.behaviour_logprobs, lp), mask),
            _msum(kl_ref.detach(), mask),
            _msum(mismatch, same),
            same.sum(),
        ]).double()  # (len(STATS),)
        weight_max = torch.where(mask > 0, weights, 0.0).amax()
    return loss, stats, weight_max.double().reshape(1)


# ---- micro-batches ------------------------------------------------------------------------------


def plan_micro_batches(
    rows: range, lengths: list[int], *, world_size: int, rank: int, micro_batch_size: int, max_tokens: int, packed: bool,
) -> list[list[int]]:
    """Rank `rank`'s micro-batches of `rows` (`lengths[r]`: row r's real tokens), longest first.

    Every rank computes every rank's plan from the same batch, and gets the same NUMBER of
    micro-batches (FSDP collectives must line up), padded with empty ones.
    * `max_tokens` 0: rows sorted by length and dealt round-robin, `micro_batch_size` per micro-batch.
    * a token budget: rows dealt longest first to the rank with the fewest tokens so far, then
      filled into micro-batches of at most `max_tokens` tokens — real tokens when `packed`
      (first fit), rows × the longest row when padded (in order). A row over the budget goes alone.
    With one rank and a count, these are the CPU trainer's micro-batches exactly.
    """
    ordered = sorted(rows, key=lambda r: -lengths[r])
    if max_tokens <= 0:
        n_micro = max(1, math.ceil(math.ceil(len(ordered) / world_size) / micro_batch_size))
        mine = ordered[rank::world_size]
        return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(n_micro)]
    dealt: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for r in ordered:
        k = min(range(world_size), key=lambda j: (load[j], j))
        dealt[k].append(r)
        load[k] += lengths[r]
    plans = [_fill(d, lengths, max_tokens, packed) for d in dealt]
    n_micro = max(1, *(len(p) for p in plans))
    return plans[rank] + [[] for _ in range(n_micro - len(plans[rank]))]


def _fill(rows: list[int], lengths: list[int], budget: int, packed: bool) -> list[list[int]]:
    """`rows` (longest first) into micro-batches of at most `budget` tokens."""
    bins: list[list[int]] = []
    used: list[int] = []
    for r in rows:
        n = lengths[r]
        if packed:  # first fit: real tokens add up
            k = next((i for i, u in enumerate(used) if u + n <= budget), None)
        else:  # padded to the micro-batch's first (longest) row: next fit keeps similar lengths together
            k = len(bins) - 1 if bins and (len(bins[-1]) + 1) * lengths[bins[-1][0]] <= budget else None
        if k is None:
            bins.append([r])
            used.append(n)
        else:
            bins[k].append(r)
            used[k] += n
    return bins


# ---- optimizer and schedule -----------------------------------------------------------------------


def make_optimizer(params: Any, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; on CUDA its fused kernel (the same update, 7 % more tokens/s on a 0.5B model: RESULTS.md)."""
    params = list(params)
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """algorithms/schedule.py's curve, counted in optimizer updates (steps × require_batches)."""
    tr, per_step = cfg.trainer, cfg.async_training.require_batches
    warmup, total = tr.warmup_steps * per_step, tr.total_training_steps * per_step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_lambda(u, warmup, total, tr.lr_schedule))


# ---- the step -----------------------------------------------------------------------------------


class StepRunner:
    """One training step over a policy this thread or process holds.

    A step = `async_training.require_batches` optimizer updates, one per mini-batch of whole
    groups, each accumulated over micro-batches of `trainer.micro_batch_size` responses or of at
    most `trainer.max_tokens_per_micro_batch` tokens, sorted by length (little padding), packed
    into one row each with `trainer.packing`. An update whose gradient norm is not finite is skipped (the weights
    stay, the schedule advances: it counts updates planned) and counted in `train/skipped_updates`.
    """

    def __init__(
        self,
        cfg: Config,
        policy: torch.nn.Module,  # a PolicyLogprobs, or the FSDP module wrapping one
        ref: torch.nn.Module | None,  # the reference (initial) policy when kl_coef > 0
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        device: torch.device,
        pad_id: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.ref = ref
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.pad_id = pad_id
        self.world_size = world_size
        self.rank = rank

    # -- what a sharded policy replaces --

    def micro_batches(self, rows: range, lengths: list[int]) -> list[list[int]]:
        """This process's micro-batches of `rows` (see `plan_micro_batches`)."""
        tr = self.cfg.trainer
        return plan_micro_batches(
            rows, lengths, world_size=self.world_size, rank=self.rank, micro_batch_size=tr.micro_batch_size,
            max_tokens=tr.max_tokens_per_micro_batch, packed=tr.packing,
        )

    def clip_grad_norm(self) -> torch.Tensor:
        """Clip the gradients to `trainer.grad_clip`; the global norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.trainer.grad_clip)

    def all_reduce(self, sums: torch.Tensor, maxes: torch.Tensor) -> None:
        """Sum `sums` and take the max of `maxes` over processes, in place (one process: nothing)."""

    # -- the step --

    def run(self, batch: list[Sample], version: int) -> dict[str, float]:
        """Train on `batch` (taken at trainer `version`); the step's metrics."""
        cfg, algo = self.cfg, self.cfg.algorithm
        t0 = time.perf_counter()
        self.policy.train()
        pb = collate(batch, version, algo, self.pad_id)
        lengths = pb.attention_mask.sum(dim=1).tolist()
        plan = [(mini, self.micro_batches(range(mini.start, mini.stop), lengths))
                for mini in mini_batches(batch, cfg.async_training.require_batches)]
        proximal = self._proximal(pb, plan) if algo.staleness_correction == "decoupled" else {}
        sums = torch.zeros(len(STATS), dtype=torch.float64, device=self.device)
        maxes = torch.zeros(1, dtype=torch.float64, device=self.device)  # the largest importance weight
        updates = [
            self._update(pb, k, mini, micros, proximal, sums, maxes, version) for k, (mini, micros) in enumerate(plan)
        ]
        self.all_reduce(sums, maxes)
        s = dict(zip(STATS, sums.tolist(), strict=True))  # note: the step's one device→host sync of statistics
        s["weight_max"] = maxes.item()
        return step_metrics(pb, s, updates, self.scheduler.last_epoch, algo, time.perf_counter() - t0)

    def _update(
        self, pb: PolicyBatch, k: int, mini: slice, micros: list[list[int]],
        proximal: dict[tuple[int, int], torch.Tensor], sums: torch.Tensor, maxes: torch.Tensor, version: int,
    ) -> tuple[float, float]:
        """Optimizer update `k`, accumulated over `micros`; adds to `sums`/`maxes`. (grad norm, LR taken)."""
        totals = LossTotals.of(pb, mini)
        self.optimizer.zero_grad(set_to_none=True)
        for m, rows in enumerate(micros):
            mb = pb.micro(rows, self.device, self.cfg.trainer.packing)
            logprobs, entropy = self._forward(self.policy, mb, with_entropy=True)
            # before the first update the current weights ARE the pre-update ones: no extra forward
            pre_update = logprobs.detach() if k == 0 else proximal.get((k, m))
            loss, stats, weight_max = micro_batch_loss(
                logprobs, entropy, mb, self.cfg.algorithm, totals, pre_update, self._ref_logprobs(mb)
            )
            # Each process's loss is its share of the mini-batch total; FSDP averages gradients
            # over processes, so scale back up to get the gradient of the sum.
            (loss * self.world_size).backward()
            sums += stats
            torch.maximum(maxes, weight_max, out=maxes)
        return self._apply_update(version)

    def _proximal(self, pb: PolicyBatch, plan: list[tuple[slice, list[list[int]]]]) -> dict[tuple[int, int], torch.Tensor]:
        """log π_prox of mini-batches 1.. by the weights before the step's first update (decoupled PPO).

        Mini-batch 0 needs no pass of its own: its training forward runs on those very weights.
        """
        out: dict[tuple[int, int], torch.Tensor] = {}
        with torch.no_grad():
            for k, (_mini, micros) in enumerate(plan[1:], start=1):
                for m, rows in enumerate(micros):
                    mb = pb.micro(rows, self.device, self.cfg.trainer.packing)
                    out[(k, m)] = self._forward(self.policy, mb)[0]
        return out

    def _ref_logprobs(self, mb: MicroBatch) -> torch.Tensor | None:
        if self.ref is None:
            return None
        with torch.no_grad():
            return self._forward(self.ref, mb)[0]

    @staticmethod
    def _forward(policy: torch.nn.Module, mb: MicroBatch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out: tuple[torch.Tensor, torch.Tensor | None] = policy(
            mb.input_ids, mb.attention_mask, mb.response_index, with_entropy=with_entropy, position_ids=mb.position_ids
        )
        return out

    def _apply_update(self, version: int) -> tuple[float, float]:
        """Clip, then step unless the norm is inf/NaN (one poisoned mini-batch must not destroy the
        weights); the schedule advances either way. (grad norm, LR taken: 0 when skipped)."""
        norm = float(self.clip_grad_norm())  # note: a device→host sync, once per update: the skip decision
        lr = float(self.scheduler.get_last_lr()[0])  # torch types an LR as float | Tensor
        if math.isfinite(norm):
            self.optimizer.step()
        else:
            log.warning("non_finite_grad_norm_skipped_update", version=version, grad_norm=norm)
            lr = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, lr


def step_metrics(
    pb: PolicyBatch, s: dict[str, float], updates: list[tuple[float, float]], updates_total: int,
    algo: AlgorithmConfig, seconds: float,
) -> dict[str, float]:
    """A step's metrics from its summed STATS (over all processes) and its updates' (grad norm, LR)."""
    tokens = pb.num_tokens
    per_token = max(tokens, 1.0)
    norms = [n for n, _ in updates]
    metrics = {
        "losses/loss": s["loss"] / len(updates),
        "losses/policy_loss": s["pg_loss"] / per_token,
        "losses/approx_kl": s["kl_k1"] / per_token,
        "losses/approx_kl_k3": s["kl_k3"] / per_token,
        "losses/clipfrac": s["clipped"] / per_token,
        "is/weight_mean": s["weight_sum"] / per_token,
        "is/weight_max": s["weight_max"],
        "is/ratio_mean": s["ratio_sum"] / per_token,
        "is/approx_kl_behaviour_k3": s["behaviour_kl_k3"] / per_token,
        "is/mismatch_tokens": s["mismatch_tokens"],
        "actor/entropy": s["entropy"] / per_token,
        "train/grad_norm": sum(norms) / len(norms),
        "train/lr": updates[-1][1],
        "train/tokens": tokens,
        "train/seqs": float((pb.response_mask.sum(dim=1) > 0).sum()),
        "train/updates": float(updates_total),
        "train/skipped_updates": float(sum(1 for n in norms if not math.isfinite(n))),
        "train/reward_mean": float(pb.rewards.mean()),
        "perf/train_step_s": seconds,
        "perf/train_tokens_per_s": float(pb.attention_mask.sum()) / seconds,  # prompt + response tokens
    }
    if algo.kl_coef > 0:
        metrics["losses/kl_ref"] = s["kl_ref"] / per_token
    if s["mismatch_tokens"] > 0:  # absent, not NaN or 0, when no token of the batch is from this version
        metrics["is/mismatch_kl"] = s["mismatch_kl_k3"] / s["mismatch_tokens"]
    return metrics
