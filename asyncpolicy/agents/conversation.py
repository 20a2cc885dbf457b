"""One black-box agent episode's calls, recorded token-exactly (the token rule of envs/tokens.py).

An agent resends the whole chat history on every call (that is the OpenAI API). The runtime keeps
the ids it generated and never encodes a model turn's text again: a call's history must be the
recorded conversation plus ONE new message (a tool result, the user's reply), whose ids are the
token rule's. A call whose history does not extend the recorded one (an edited or dropped turn, a
summarised context) is refused: its context is not the one the model saw, so it cannot be trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from asyncpolicy.engines.protocols import GenerationRequest
from asyncpolicy.envs.episode import EpisodeTokens, Generate
from asyncpolicy.envs.tokens import ObservationTokens
from asyncpolicy.samples import Prompt, Trajectory
from asyncpolicy.tasks.base import ChatMessage


class HistoryMismatch(ValueError):
    """A call's messages do not extend the episode's recorded conversation by one message."""


class AgentConversation:
    """The recorded conversation, its token ids, logprobs, versions and loss mask."""

    def __init__(
        self, prompt: Prompt, request: GenerationRequest, generate: Generate, tokens: ObservationTokens,
        decode: Callable[[list[int]], str], max_episode_tokens: int,
    ) -> None:
        self.prompt, self.request, self.generate = prompt, request, generate
        self.tokens_rule, self.decode, self.max_episode_tokens = tokens, decode, max_episode_tokens
        self.messages: list[ChatMessage] = []
        self.context: list[int] = []
        self.record = EpisodeTokens()  # the ids after `context`, their logprobs, versions and loss mask
        self.last_turn: list[int] = []
        self.finish = "stop"
        self._lock = anyio.Lock()  # an agent that calls twice at once gets its calls in order

    async def complete(self, messages: list[ChatMessage], max_tokens: int | None) -> tuple[str, str]:
        """The model's next turn for `messages`: (its text, finish reason). Raises HistoryMismatch."""
        async with self._lock:
            await self._extend(messages)
            left = self.max_episode_tokens - len(self.record.tokens)
            if left <= 0:
                raise HistoryMismatch(f"the episode has used all {self.max_episode_tokens} tokens (data.max_response_length)")
            turn = msgspec.structs.replace(
                self.request,
                request_id=f"{self.request.request_id}/t{len(self.messages)}",
                prompt_tokens=self.context + self.record.tokens,
                max_tokens=min(left, max_tokens) if max_tokens else left,
                seed=(self.request.seed + len(self.messages)) & 0x7FFFFFFF,
            )
            result = await self.generate(turn)
            self.record.add_model(result)
            self.last_turn, self.finish = list(result.response_tokens), result.finish_reason
            text = self.decode(result.response_tokens)
            self.messages.append(ChatMessage("assistant", text))
            return text, result.finish_reason

    async def _extend(self, messages: list[ChatMessage]) -> None:
        if not self.messages:  # the first call opens the episode with one user message
            if len(messages) != 1 or messages[0].role != "user":
                raise HistoryMismatch("the first call of an episode must send exactly one user message")
            text = messages[0].content
            self.context = list(self.prompt.tokens) if text == self.prompt.text else await self.tokens_rule.opening_ids(text)
            self.messages = [messages[0]]
            return
        n = len(self.messages)
        if messages[:n] != self.messages:
            raise HistoryMismatch(f"messages[0:{n}] are not the episode's recorded conversation (edited, dropped or re-rendered turns)")
        new = messages[n:]
        if len(new) != 1 or new[0].role == "assistant":
            raise HistoryMismatch(f"a call must add exactly one non-assistant message to the recorded {n}; it added {len(new)}")
        ids = await self.tokens_rule.append_ids(self.messages, self.last_turn, new[0])
        if len(self.record.tokens) + len(ids) >= self.max_episode_tokens:
            raise HistoryMismatch(f"the message does not fit in the episode's {self.max_episode_tokens} tokens (data.max_response_length)")
        self.record.add_env(ids, self.record.versions[-1] if self.record.versions else -1)
        self.messages.append(new[0])

    def trajectory(self, reward: float, error: str = "") -> Trajectory:
        """The episode as the trainer takes it: the agent's reward, environment tokens masked out of the loss."""
        turns = sum(1 for m in self.messages if m.role == "assistant")
        t = self.record.trajectory(finish_reason=self.finish, reward=reward, turns=turns)
        if error:
            t.reward_error = error
        return t


def parse_messages(body: Any) -> list[ChatMessage]:
    """`messages` of a chat-completions body as ChatMessages; HistoryMismatch names what is wrong."""
    raw = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(raw, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in raw):
        raise HistoryMismatch("'messages' must be a list of {role, content} objects with string content")
    return [ChatMessage(str(m.get("role", "")), m["content"]) for m in raw]
