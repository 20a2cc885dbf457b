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
