"""The trainer uses an episode's loss mask: environment tokens are context, never trained on."""

from __future__ import annotations

import math

import torch

from asyncpolicy.config import load_config
from asyncpolicy.engines.training.step import LossTotals, collate, micro_batch_loss, step_metrics
from asyncpolicy.samples import Prompt, Trajectory, make_sample

PROMPT = Prompt(index=0, epoch=0, text="q", tokens=[5, 6])
# two episodes of one prompt: model tokens (1) and the environment's (0)
EPISODES = [
    ([7, 8, 30, 31, 9], [1, 1, 0, 0, 1], [-0.5, -1.0, 0.0, 0.0, -0.25], 1.0),
    ([10, 32, 11], [1, 0, 1], [-2.0, 0.0, -0.75], 0.0),
]


def batch() -> list:
    trajs = [
        Trajectory(
            response_tokens=toks, behaviour_logprobs=lps, token_versions=[3] * len(toks), finish_reason="stop",
            reward=r, loss_mask=mask,
        )
        for toks, mask, lps, r in EPISODES
    ]
    return [make_sample(PROMPT, trajs, start_version=3)]


def test_env_tokens_leave_the_loss_the_counts_and_the_forward() -> None:
    cfg = load_config(overrides=["algorithm.staleness_correction=behaviour", "algorithm.clip_ratio=0.2"])
    algo = cfg.algorithm
    pb = collate(batch(), 3, algo, pad_id=0)
    assert pb.num_tokens == 5.0  # 3 + 2 model tokens; the 3 environment tokens are not counted
    mb = pb.micro([0, 1], torch.device("cpu"))
    # the trainer's logprobs: arbitrary and far from the behaviour ones, wildly so on environment tokens
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(mb.response_mask.shape, generator=gen, dtype=torch.float32) * 3
    P = len(PROMPT.tokens)
    for row, (_, mask, _, _) in enumerate(EPISODES):
        for j, m in enumerate(mask):
            if not m:
                logprobs[row, P - 1 + j] = -50.0
    loss, stats, _ = micro_batch_loss(logprobs, None, mb, algo, LossTotals.of(pb, slice(0, 2)), pre_update=None)
    # by hand, in float64, over model tokens only: GRPO advantages of rewards (1, 0) are (±0.5)/σ
    # with σ the unbiased std of the group, √0.5
    adv = [0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)]
    total, n = 0.0, 0
    for row, (_, mask, lps, _) in enumerate(EPISODES):
        for j, m in enumerate(mask):
            if m:
                ratio = math.exp(float(logprobs[row, P - 1 + j]) - lps[j])
                a = adv[row]
                total += max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
                n += 1
    assert n == 5
    assert abs(float(loss) - total / n) < 1e-5 * max(1.0, abs(total / n))
    # the forward computes logprobs at the model tokens' positions alone
    flat = set(mb.response_index.tolist())
    width = mb.response_mask.shape[1]
    expected = {r * width + P - 1 + j for r, (_, mask, _, _) in enumerate(EPISODES) for j, m in enumerate(mask) if m}
    assert flat == expected
    metrics = step_metrics(pb, dict(zip(_stat_names(), stats.tolist(), strict=True)) | {"weight_max": 1.0},
                           [(1.0, 1e-3)], 1, algo, 1.0)
    assert metrics["train/tokens"] == 5.0


def _stat_names() -> tuple[str, ...]:
    from asyncpolicy.engines.training.step import STATS

    return tuple(STATS)


def test_an_empty_mask_trains_every_response_token() -> None:
    cfg = load_config(overrides=[])
    single = Trajectory(response_tokens=[7, 8], behaviour_logprobs=[-1.0, -1.0], token_versions=[0, 0], finish_reason="stop")
    pb = collate([make_sample(PROMPT, [single], 0)], 0, cfg.algorithm, pad_id=0)
    assert pb.num_tokens == 2.0
