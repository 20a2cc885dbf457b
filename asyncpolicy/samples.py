"""The data that flows from rollouter to trainer.

A `Sample` is the unit of queueing, staleness and accounting: one prompt with its `rollout.n`
responses (a GRPO group). It carries the policy versions that produced its tokens, so the
channel can enforce the staleness bound on it.
"""

from __future__ import annotations

import msgspec


class Prompt(msgspec.Struct, frozen=True, kw_only=True):
    """One prompt drawn from a data source; `index` is its position in the data set."""

    index: int
    epoch: int
    text: str
    tokens: list[int]
    ground_truth: str = ""

    @property
    def uid(self) -> str:
        return f"{self.epoch}:{self.index}"


class Trajectory(msgspec.Struct, kw_only=True):
    """One response: tokens, the behaviour policy's logprob of each, and the versions that made them.

    `token_versions[i]` is the rollout policy version that sampled `response_tokens[i]`; with partial
    rollout a response can span several versions.
    """

    response_tokens: list[int]
    behaviour_logprobs: list[float]
    token_versions: list[int]
    finish_reason: str  # "stop" (EOS), "length", or "abort" while still partial
    reward: float = 0.0
    reward_error: str = ""  # set when the reward function failed; the reward is then 0

    @property
    def min_version(self) -> int:
        return min(self.token_versions) if self.token_versions else -1

    @property
    def max_version(self) -> int:
        return max(self.token_versions) if self.token_versions else -1


class Sample(msgspec.Struct, kw_only=True):
    """A prompt and its group of responses: what the channel holds and the trainer consumes."""

    prompt: Prompt
    trajectories: list[Trajectory]
    start_version: int  # rollout version when the first token of the group was started
    min_version: int  # oldest version that produced any token: staleness is measured from here
    max_version: int

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]


def make_sample(prompt: Prompt, trajectories: list[Trajectory], start_version: int) -> Sample:
    """Build a Sample whose version range is that of its tokens (the start version if it has none)."""
    versions = [v for t in trajectories for v in t.token_versions] or [start_version]
    return Sample(
        prompt=prompt,
        trajectories=trajectories,
        start_version=start_version,
        min_version=min(versions),
        max_version=max(versions),
    )
