"""Run a black-box agent for one episode: its reward ends the episode, its calls are the trajectory."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from asyncpolicy.agents.conversation import AgentConversation
from asyncpolicy.config import Config
from asyncpolicy.dotted import import_named
from asyncpolicy.errors import ConfigError
from asyncpolicy.engines.protocols import GenerationRequest
from asyncpolicy.envs.episode import EpisodeResult, Generate
from asyncpolicy.envs.tokens import ObservationTokens
from asyncpolicy.samples import Prompt

if TYPE_CHECKING:  # starlette and uvicorn (the 'agents' extra) load only when a run serves agents
    from asyncpolicy.agents.chat_server import ChatServer

Agent = Callable[[str, str], Awaitable[float]]  # (base_url, prompt text) → reward


def load_agent(path: str, key: str = "task.agent") -> Agent:
    """`pkg.module:solve` → the agent; a ConfigError naming `key` (exit 2) when it does not import."""
    agent: Any = import_named(path, key, what="agent")
    loaded: Agent = agent
    return loaded


class AgentSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How a run's responses become agent episodes (`task.agent`); the rollouter's counterpart of
    envs.loading.EpisodeSpec. The endpoint's address is the Supervisor's (it serves the ChatServer)."""

    name: str  # the agent's dotted path, as logs and errors name it
    agent: Any  # Agent
    tokens: ObservationTokens
    decode: Any  # Callable[[list[int]], str]
    max_episode_tokens: int
    timeout_s: float
    host: str
    port: int

    def server(self) -> ChatServer:
        """The endpoint the agents call, not yet serving (its owner starts `serve` in a task group)."""
        from asyncpolicy.agents.chat_server import ChatServer

        return ChatServer(self.host, self.port)


def agent_spec(cfg: Config, tokenizer: Any, decode: Callable[[list[int]], str]) -> AgentSpec | None:
    """The run's agent episodes (`task.agent`), None without one."""
    t = cfg.task
    if not t.agent:
        return None
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"config key 'task.agent': serving agents needs {' and '.join(missing)}: pip install -e '.[agents]'", key="task.agent"
        )
    return AgentSpec(
        name=t.agent, agent=load_agent(t.agent), tokens=ObservationTokens(tokenizer), decode=decode,
        max_episode_tokens=cfg.data.max_response_length, timeout_s=t.agent_timeout_s, host=t.agent_host, port=t.agent_port,
    )


async def run_agent_episode(
    spec: AgentSpec, server: ChatServer, prompt: Prompt, request: GenerationRequest, generate: Generate
) -> EpisodeResult:
    """The agent plays `prompt` against the policy within `spec.timeout_s`; an agent that raises, times
    out or returns a non-finite reward scores 0 (`EpisodeResult.error`), like a failing environment."""
    conversation = AgentConversation(prompt, request, generate, spec.tokens, spec.decode, spec.max_episode_tokens)
    error = ""
    with server.episode(conversation) as base_url:
        try:
            with anyio.fail_after(spec.timeout_s):
                reward = float(await spec.agent(base_url, prompt.text))
            if not math.isfinite(reward):
                error, reward = f"the agent returned a non-finite reward {reward!r}", 0.0
        except TimeoutError:
            error, reward = f"the agent did not return within {spec.timeout_s:g}s", 0.0
        except Exception as exc:  # the user's agent: any failure scores 0, never crashes the run
            error, reward = f"the agent raised {type(exc).__name__}: {exc}", 0.0
    return EpisodeResult(trajectory=conversation.trajectory(reward, error), error=error)
