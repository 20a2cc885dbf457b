"""What an environment is: `reset(prompt)` opens an episode, `step(model_text)` answers a turn.

An environment is the user's code, named by import path (`task.env=mypkg.envs:Calculator`); the
runtime builds one object per episode by calling that name with no arguments, so an instance
holds one episode's state and needs no locking. Its methods may be coroutines (awaited on the
event loop: a tool call is an `await`) or plain functions (run in a worker thread, so a blocking
tool never stalls the loop); either way every call has a timeout (`task.env_timeout_s`). The
runtime owns the tokens: an environment sees and returns text only.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, runtime_checkable

import msgspec

from asyncpolicy.samples import Prompt


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """An environment's answer to one model turn.

    `observation` is appended to the conversation as a message of `role` (rendered by the chat
    template, see tokens.py) and the model takes its next turn; `done` ends the episode (the
    observation is then not shown). `reward` is this turn's reward: an episode's reward is the sum
    over its steps. `tool_call` says the turn called a tool (counted in `episode/tool_calls`).
    """

    observation: str = ""
    done: bool = False
    reward: float = 0.0
    role: str = "user"
    tool_call: bool = False


@runtime_checkable
class Environment(Protocol):
    """One episode's environment. Either method may be `async def` or plain."""

    def reset(self, prompt: Prompt) -> str | None | Awaitable[str | None]:
        """Open an episode of `prompt`; the first observation, or None to open with the prompt as the task rendered it.

        A string opens the episode with it as the user's first message instead (rendered and
        tokenised like a prompt); `prompt.ground_truth` is there for the environment's own use.
        """
        ...

    def step(self, model_text: str) -> Step | Awaitable[Step]:
        """Answer the model's turn (its text, decoded once from the tokens it sampled)."""
        ...
