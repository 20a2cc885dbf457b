"""A sample's versions are those of its tokens: staleness is measured from the oldest token."""

from __future__ import annotations

from asyncpolicy.samples import Prompt, Trajectory, make_sample

PROMPT = Prompt(index=0, epoch=0, text="ab", tokens=[1, 2])


def trajectory(versions: list[int]) -> Trajectory:
    return Trajectory(
        response_tokens=[3] * len(versions),
        behaviour_logprobs=[-1.0] * len(versions),
        token_versions=versions,
        finish_reason="stop",
    )


def test_a_group_started_before_a_sync_but_generated_after_it_is_not_aged_from_its_start() -> None:
    sample = make_sample(PROMPT, [trajectory([4, 4]), trajectory([4])], start_version=3)
    assert (sample.min_version, sample.max_version) == (4, 4)


def test_partial_rollout_spans_the_versions_of_its_tokens() -> None:
    sample = make_sample(PROMPT, [trajectory([2, 2, 3]), trajectory([3, 3])], start_version=2)
    assert (sample.min_version, sample.max_version) == (2, 3)


def test_a_sample_without_tokens_takes_its_start_version() -> None:
    sample = make_sample(PROMPT, [trajectory([])], start_version=5)
    assert (sample.min_version, sample.max_version) == (5, 5)


def test_staleness_is_measured_over_model_tokens_only() -> None:
    # an episode: model tokens (mask 1) of versions 5 and 6; the environment's tokens (mask 0) carry
    # versions that are not the model's: they must not age the sample
    episode = Trajectory(
        response_tokens=[3, 4, 9, 9, 5],
        behaviour_logprobs=[-1.0, -1.0, 0.0, 0.0, -1.0],
        token_versions=[5, 5, 1, 1, 6],
        finish_reason="stop",
        loss_mask=[1, 1, 0, 0, 1],
    )
    assert (episode.min_version, episode.max_version, episode.env_tokens) == (5, 6, 2)
    sample = make_sample(PROMPT, [episode, trajectory([7])], start_version=4)
    assert (sample.min_version, sample.max_version) == (5, 7)


def test_an_empty_loss_mask_means_every_token_is_the_models() -> None:
    single = trajectory([2, 3])
    assert (single.model_versions, single.env_tokens, single.is_model_token(1)) == ([2, 3], 0, True)
