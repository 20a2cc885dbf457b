"""What a task is: prompts with ground truths, and a verifiable reward.

A task hands the runtime a `PromptSource` (the data cursor: seeded epochs over a fixed list, whose
whole state is three integers) and a `Scorer` that turns a response into a float. The rollouter
guards every call to a scorer: an exception or a non-finite value is logged with the function and
the sample, counted, and scored 0 — never a crash, never a NaN in the loss.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from asyncpolicy.samples import Prompt


class ChatMessage(msgspec.Struct, frozen=True):
    """One turn of a chat prompt, as a tokenizer's chat template takes it (`role`: user, system, ...)."""

    role: str
    content: str


class PromptRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A tokenised prompt as loaded from a task or a data file.

    `messages` is the prompt as a chat (a user message); `text` is its plain-text form. `tokens` are
    rendered once, at load (`loading.encode_prompt`): the messages through the tokenizer's chat
    template when it has one, else `text` tokenised as it is. Engines take `tokens` only.
    """

    text: str
    tokens: list[int]
    ground_truth: str = ""
    messages: tuple[ChatMessage, ...] = ()


class Example(msgspec.Struct, frozen=True, kw_only=True):
    """One generated problem: a plain prompt, the instruction a chat model gets, the ground truth.

    `key` identifies the problem itself, whatever its wording, for the held-out split
    (`splits.hashed_splits`); empty = the prompt.
    """

    prompt: str
    instruction: str
    answer: str
    key: str = ""


class CursorState(msgspec.Struct, kw_only=True):
    """The data cursor: enough to continue exactly where a run stopped."""

    seed: int
    epoch: int
    position: int


class PromptSource:
    """Endless, seeded walk over `records`: one permutation per epoch, then the next epoch."""

    def __init__(self, records: list[PromptRecord], *, seed: int, shuffle: bool = True) -> None:
        if not records:
            raise ValueError("a prompt source needs at least one prompt")
        self.records = records
        self.shuffle = shuffle
        self._state = CursorState(seed=seed, epoch=0, position=0)
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"{self._state.seed}:{epoch}").shuffle(order)
        return order

    def next(self) -> Prompt:
        st = self._state
        if st.position >= len(self._order):
            st.epoch += 1
            st.position = 0
            self._order = self._permutation(st.epoch)
        index = self._order[st.position]
        st.position += 1
        rec = self.records[index]
        return Prompt(index=index, epoch=st.epoch, text=rec.text, tokens=rec.tokens, ground_truth=rec.ground_truth)

    def state(self) -> CursorState:
        return msgspec.structs.replace(self._state)

    def restore(self, state: CursorState) -> None:
        self._state = msgspec.structs.replace(state)
        self._order = self._permutation(state.epoch)


class Scorer(Protocol):
    """Reward of one response to one prompt."""

    name: str

    def __call__(self, prompt: Prompt, response_tokens: list[int]) -> float: ...


class TaskData(msgspec.Struct, kw_only=True):
    """Everything the runtime needs from a task."""

    train: PromptSource
    val: list[Prompt]
    scorer: Scorer
    decode: Callable[[list[int]], str]
    episodes: Any = None  # envs.loading.EpisodeSpec or agents.episode.AgentSpec: responses are multi-turn episodes; None = single-turn
