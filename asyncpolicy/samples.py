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

    An agentic episode's response interleaves the model's turns with the environment's observations
    (docs/agents.md). `loss_mask[i]` is 1 for a token the model sampled (trained on) and 0 for an
    environment token (context only); EMPTY means every token is the model's, so a single-turn
    response is unchanged. An environment token has behaviour logprob 0.0 and, as its version, that
    of the model token before it: the lists stay aligned with `response_tokens`, and versions never
    decrease along an episode. Staleness is measured over model tokens only.
    """

    response_tokens: list[int]
    behaviour_logprobs: list[float]
    token_versions: list[int]
    finish_reason: str  # "stop" (EOS), "length", or "abort" while still partial
    reward: float = 0.0
    reward_error: str = ""  # set when the reward function failed; the reward is then 0
    loss_mask: list[int] = msgspec.field(default_factory=list)  # 1 = model token, 0 = environment token; [] = all 1
    turns: int = 1  # model turns of the episode (1 for a single-turn response)
    tool_calls: int = 0  # turns the environment marked as tool calls (`Step.tool_call`)

    def is_model_token(self, i: int) -> bool:
        return not self.loss_mask or self.loss_mask[i] == 1

    @property
    def model_versions(self) -> list[int]:
        """Versions of the model's tokens: what staleness is measured over."""
        if not self.loss_mask:
            return self.token_versions
        return [v for v, m in zip(self.token_versions, self.loss_mask, strict=True) if m]

    @property
    def env_tokens(self) -> int:
        return len(self.loss_mask) - sum(self.loss_mask)

    @property
    def min_version(self) -> int:
        versions = self.model_versions
        return min(versions) if versions else -1

    @property
    def max_version(self) -> int:
        versions = self.model_versions
        return max(versions) if versions else -1


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
    """Build a Sample whose version range is that of its model tokens (the start version if it has none)."""
    versions = [v for t in trajectories for v in t.model_versions] or [start_version]
    return Sample(
        prompt=prompt,
        trajectories=trajectories,
        start_version=start_version,
        min_version=min(versions),
        max_version=max(versions),
    )
