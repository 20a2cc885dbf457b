"""Find an environment by import path, and call it guarded: a thread for plain code, always a timeout."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from asyncpolicy.config import Config
from asyncpolicy.dotted import import_named
from asyncpolicy.envs.protocol import Environment
from asyncpolicy.envs.tokens import ObservationTokens
from asyncpolicy.errors import ConfigError

EnvFactory = Callable[[], Environment]


def load_env(path: str, key: str = "task.env") -> EnvFactory:
    """`pkg.module:Name` → what builds one episode's environment (a class, or a function of no
    arguments); a ConfigError naming `key` (exit 2) when it does not import or has no reset/step."""
    factory: Any = import_named(path, key, what="environment")
    if inspect.isclass(factory):
        missing = [m for m in ("reset", "step") if not callable(getattr(factory, m, None))]
        if missing:
            raise ConfigError(f"config key {key!r}: {path!r} has no {' or '.join(missing)} method", key=key)
    env_factory: EnvFactory = factory
    return env_factory


async def call_env(method: Callable[..., Any], arg: object, timeout: float) -> Any:
    """`method(arg)` within `timeout` seconds: awaited when it is a coroutine, else run in a worker
    thread so a blocking tool never stalls the event loop. On a timeout (TimeoutError) a thread is
    abandoned, not killed — Python cannot kill one — and its result is ignored when it comes."""
    with anyio.fail_after(timeout):
        if inspect.iscoroutinefunction(method):
            return await method(arg)
        result = await anyio.to_thread.run_sync(method, arg, abandon_on_cancel=True)
        if inspect.isawaitable(result):  # a plain function that returned a coroutine
            return await result
        return result


DEFAULT_MAX_TURNS = 4  # a user's environment without a task's own limit


class EpisodeSpec(msgspec.Struct, frozen=True, kw_only=True):
    """How a run's responses become episodes: the environment and the limits on each episode.

    `max_turn_tokens` 0 = no limit per turn but the episode's (`data.max_response_length`, which
    holds every token of the episode after the prompt, the environment's included).
    """

    name: str  # the environment's dotted path, as logs and errors name it
    make: Any  # EnvFactory: one environment per episode
    tokens: ObservationTokens
    decode: Any  # Callable[[list[int]], str]: a model turn's text, decoded once for the environment
    max_turns: int
    max_turn_tokens: int
    max_episode_tokens: int
    timeout_s: float


def episode_spec(
    cfg: Config, tokenizer: Any, decode: Callable[[list[int]], str], task_env: str = "", task_turns: int = 0,
    task_turn_tokens: int = 0,
) -> EpisodeSpec | None:
    """The run's episodes: `task.env` or the task's own environment (None: single-turn); the task's
    limits unless the config sets its own."""
    t = cfg.task
    path = t.env or task_env
    if not path:
        return None
    return EpisodeSpec(
        name=path,
        make=load_env(path),
        tokens=ObservationTokens(tokenizer),
        decode=decode,
        max_turns=t.max_turns or task_turns or DEFAULT_MAX_TURNS,
        max_turn_tokens=t.max_turn_tokens or task_turn_tokens,
        max_episode_tokens=cfg.data.max_response_length,
        timeout_s=t.env_timeout_s,
    )
