"""Run a black-box agent for one episode: its reward ends the episode, its calls are the trajectory."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from asyncpolicy.agents.chat_server import ChatServer
from asyncpolicy.agents.conversation import AgentConversation
from asyncpolicy.dotted import import_named
from asyncpolicy.engines.protocols import GenerationRequest
from asyncpolicy.envs.episode import EpisodeResult, Generate
from asyncpolicy.envs.tokens import ObservationTokens
from asyncpolicy.samples import Prompt

Agent = Callable[[str, str], Awaitable[float]]  # (base_url, prompt text) → reward


def load_agent(path: str, key: str = "task.agent") -> Agent:
    """`pkg.module:solve` → the agent; a ConfigError naming `key` (exit 2) when it does not import."""
    agent: Any = import_named(path, key, what="agent")
    loaded: Agent = agent
    return loaded


async def run_agent_episode(
    agent: Agent, server: ChatServer, prompt: Prompt, request: GenerationRequest, generate: Generate,
    tokens: ObservationTokens, decode: Callable[[list[int]], str], max_episode_tokens: int, timeout_s: float,
) -> EpisodeResult:
    """The agent plays `prompt` against the policy within `timeout_s`; an agent that raises, times out
    or returns a non-finite reward scores 0 (`EpisodeResult.error`), like a failing environment."""
    conversation = AgentConversation(prompt, request, generate, tokens, decode, max_episode_tokens)
    error = ""
    with server.episode(conversation) as base_url:
        try:
            with anyio.fail_after(timeout_s):
                reward = float(await agent(base_url, prompt.text))
            if not math.isfinite(reward):
                error, reward = f"the agent returned a non-finite reward {reward!r}", 0.0
        except TimeoutError:
            error, reward = f"the agent did not return within {timeout_s:g}s", 0.0
        except Exception as exc:  # the user's agent: any failure scores 0, never crashes the run
            error, reward = f"the agent raised {type(exc).__name__}: {exc}", 0.0
    return EpisodeResult(trajectory=conversation.trajectory(reward, error), error=error)
