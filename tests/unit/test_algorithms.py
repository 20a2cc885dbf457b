"""Advantages, PPO clip, staleness correction, KL estimators and loss aggregation against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from asyncpolicy.algorithms.advantages import compute_advantages, grpo_advantages, rloo_advantages
from asyncpolicy.algorithms.importance import anchor_and_weights, behaviour_weights
from asyncpolicy.algorithms.kl import kl_k1, kl_k3
from asyncpolicy.algorithms.ppo_loss import aggregate_loss, ppo_clip_token_loss


def test_grpo_normalises_by_unbiased_group_std() -> None:
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    # mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735
    assert adv.tolist()[0] == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)


def test_grpo_without_std_is_centred_reward() -> None:
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), norm_by_std=False)
    assert adv.tolist()[0] == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_grpo_equal_rewards_and_singleton_groups_give_zero() -> None:
    assert grpo_advantages(torch.tensor([[0.3, 0.3, 0.3]])).abs().max() == 0
    assert grpo_advantages(torch.tensor([[0.7]])).tolist() == [[0.0]]


def test_rloo_uses_mean_of_the_others() -> None:
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert adv.tolist()[0] == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    assert compute_advantages(torch.tensor([[2.0]]), "rloo").tolist() == [[0.0]]


def test_ppo_clip_branches() -> None:
    logratio = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, ratio, clipped = ppo_clip_token_loss(logratio, torch.zeros_like(logratio), adv, clip_ratio=0.2)
    # (1.5, A>0): max(-1.5, -1.2) = -1.2 clipped; (0.5, A>0): max(-0.5, -0.8) = -0.5;
    # (0.5, A<0): max(0.5, 0.8) = 0.8 clipped;    (1.5, A<0): max(1.5, 1.2) = 1.5
    assert loss.tolist()[0] == pytest.approx([-1.2, -0.5, 0.8, 1.5], abs=1e-6)
    assert clipped.tolist()[0] == [1.0, 0.0, 1.0, 0.0]
    assert ratio.tolist()[0] == pytest.approx([1.5, 0.5, 0.5, 1.5])


def test_ppo_clip_gradient_vanishes_outside_the_trust_region() -> None:
    logprobs = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, _, _ = ppo_clip_token_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), clip_ratio=0.2)
    loss.sum().backward()
    assert logprobs.grad is not None
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, -1.1])  # d(-ratio)/dlogp = -ratio inside


TOKEN_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("token-mean", 10 / 4), ("seq-mean-token-mean", (2 + 4) / 2), ("seq-mean-token-sum", (6 + 4) / 2)],
)
def test_loss_aggregation_modes(mode: str, expected: float) -> None:
    assert float(aggregate_loss(TOKEN_LOSS, MASK, mode, total_tokens=4, total_seqs=2)) == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batch_shares_sum_to_the_whole(mode: str) -> None:
    whole = aggregate_loss(TOKEN_LOSS, MASK, mode, total_tokens=4, total_seqs=2)
    parts = sum(
        aggregate_loss(TOKEN_LOSS[i : i + 1], MASK[i : i + 1], mode, total_tokens=4, total_seqs=2) for i in range(2)
    )
    assert float(parts) == pytest.approx(float(whole))


def test_decoupled_weights_are_truncated_prox_over_behaviour() -> None:
    prox = torch.log(torch.tensor([[0.5, 0.2]]))
    behav = torch.log(torch.tensor([[0.25, 0.4]]))
    assert behaviour_weights(prox, behav, tis_cap=1.5).tolist()[0] == pytest.approx([1.5, 0.5])  # 2.0 capped
    anchor, weights = anchor_and_weights("decoupled", behav, prox, tis_cap=3.0)
    assert torch.equal(anchor, prox)
    assert weights.tolist()[0] == pytest.approx([2.0, 0.5])


def test_behaviour_mode_anchors_on_rollout_logprobs_with_unit_weights() -> None:
    behav = torch.log(torch.tensor([[0.25, 0.4]]))
    anchor, weights = anchor_and_weights("behaviour", behav, None, tis_cap=2.0)
    assert torch.equal(anchor, behav)
    assert weights.tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="proximal logprobs"):
        anchor_and_weights("decoupled", behav, None, tis_cap=2.0)


def test_kl_estimators_hand_values() -> None:
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    assert float(kl_k1(logp, ref)) == pytest.approx(math.log(2))
    assert float(kl_k3(logp, ref)) == pytest.approx(0.5 - 1 + math.log(2))  # r = 0.5, k3 = r - 1 - log r


def test_k3_is_nonnegative_and_k1_unbiased_on_average() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    x = torch.multinomial(q, 200_000, replacement=True, generator=g)
    lq, lp = q.log()[x], p.log()[x]
    exact = float((q * (q.log() - p.log())).sum())
    assert float(kl_k3(lq, lp).min()) >= 0
    assert float(kl_k1(lq, lp).mean()) == pytest.approx(exact, abs=0.02)
    assert float(kl_k3(lq, lp).mean()) == pytest.approx(exact, abs=0.02)
