"""One agentic episode as a coroutine: the model's turns and the environment's answers, token-exact.

The episode owns its token ids. Each turn calls the generation engine with the WHOLE context so
far as `prompt_tokens` (prompt, earlier turns, observations), so every engine works unchanged —
hf, vLLM (its prefix cache makes later turns cheap), replicas (the group key keeps an episode on
one replica), remote servers — and a weight sync interrupts a turn exactly as it interrupts a
single-turn response (partial rollout continues it under the new weights). The model's tokens are
appended as sampled (loss mask 1), decoded once for the environment, never encoded again; an
observation adds the tokens of the token rule (tokens.py; loss mask 0, logprob 0, the version of
the model token before it). A tool call is an `await` outside any engine call: a weight sync
never waits for one, nor interrupts one.

Limits: `max_turns` model turns, `max_turn_tokens` per turn, `max_episode_tokens` for every token
after the prompt (an observation that does not fit ends the episode). The reward is the sum of the
steps' rewards; an environment that raises, times out or returns a non-finite reward scores 0 and
ends the episode (`EpisodeResult.error`): the caller logs and counts it, the run goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

import msgspec

from asyncpolicy.engines.protocols import GenerationRequest, GenerationResult
from asyncpolicy.envs.loading import EpisodeSpec, call_env
from asyncpolicy.envs.protocol import Step
from asyncpolicy.samples import Prompt, Trajectory
from asyncpolicy.tasks.base import ChatMessage

Generate = Callable[[GenerationRequest], Awaitable[GenerationResult]]


class EpisodeResult(msgspec.Struct, kw_only=True):
    """An episode's trajectory (reward set) and what its environment cost."""

    trajectory: Trajectory
    env_calls: int = 0  # reset and step calls made
    env_seconds: float = 0.0  # wall time inside them
    error: str = ""  # the environment failed: reward 0


class _EnvFailed(Exception):
    pass


class EpisodeTokens:
    """An episode's ids after its prompt, as the trainer takes them: the model's as sampled (loss mask 1),
    the environment's by the token rule (mask 0, logprob 0, the version of the model token before them).
    Environment episodes and black-box agents' conversations (agents/conversation.py) both record here."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.mask: list[int] = []

    def add_model(self, result: GenerationResult) -> None:
        n = len(result.response_tokens)
        self.tokens += result.response_tokens
        self.logprobs += result.behaviour_logprobs[:n]
        self.versions += result.token_versions[:n]
        self.mask += [1] * n

    def add_env(self, ids: list[int], version: int) -> None:
        self.tokens += ids
        self.logprobs += [0.0] * len(ids)
        self.versions += [version] * len(ids)
        self.mask += [0] * len(ids)

    def trajectory(self, *, finish_reason: str, reward: float, turns: int, tool_calls: int = 0) -> Trajectory:
        """The record as it is now, copied: a call still running when its episode ends (an agent that
        timed out while the endpoint generates for it) may add to the record, never to what is trained."""
        return Trajectory(
            response_tokens=list(self.tokens),
            behaviour_logprobs=list(self.logprobs),
            token_versions=list(self.versions),
            finish_reason=finish_reason,
            reward=reward,
            loss_mask=list(self.mask),
            turns=turns,
            tool_calls=tool_calls,
        )


class _Episode(EpisodeTokens):
    """One running episode (a helper of `run_episode`): its tokens, its environment and what it cost."""

    def __init__(self, spec: EpisodeSpec) -> None:
        super().__init__()
        self.spec = spec
        self.env = spec.make()
        self.calls = 0
        self.seconds = 0.0

    async def call(self, method: Callable[..., object], arg: object, what: str) -> object:
        start = time.monotonic()
        try:
            return await call_env(method, arg, self.spec.timeout_s)
        except TimeoutError:
            raise _EnvFailed(f"{what} timed out after {self.spec.timeout_s:g}s") from None
        except Exception as exc:  # the user's environment: any failure scores 0, never crashes the run
            raise _EnvFailed(f"{what} raised {type(exc).__name__}: {exc}") from exc
        finally:
            self.calls += 1
            self.seconds += time.monotonic() - start



async def run_episode(spec: EpisodeSpec, prompt: Prompt, request: GenerationRequest, generate: Generate) -> EpisodeResult:
    """Play one episode of `prompt`; `request` carries its id, group, sampling and seed, and
    `generate` is the caller's guarded engine call (retries, timeouts, pauses, partial rollout)."""
    ep = _Episode(spec)
    context = list(prompt.tokens)
    conversation = [ChatMessage("user", prompt.text)]
    reward, turns, tool_calls, error, finish = 0.0, 0, 0, "", "stop"
    try:
        opening = await ep.call(ep.env.reset, prompt, "reset")
        if opening is not None:
            if not isinstance(opening, str):
                raise _EnvFailed(f"reset returned {type(opening).__name__}, not a string or None")
            context = await spec.tokens.opening_ids(opening)
            conversation = [ChatMessage("user", opening)]
        while turns < spec.max_turns:
            left = spec.max_episode_tokens - len(ep.tokens)
            budget = min(left, spec.max_turn_tokens) if spec.max_turn_tokens else left
            turn_request = msgspec.structs.replace(
                request,
                request_id=f"{request.request_id}/t{turns}",
                prompt_tokens=context + ep.tokens,
                max_tokens=budget,
                seed=(request.seed + turns) & 0x7FFFFFFF,
            )
            result = await generate(turn_request)
            turns += 1
            ep.add_model(result)
            finish = result.finish_reason
            step = await ep.call(ep.env.step, spec.decode(result.response_tokens), "step")
            if not isinstance(step, Step):
                raise _EnvFailed(f"step returned {type(step).__name__}, not a Step")
            if not math.isfinite(step.reward):
                raise _EnvFailed(f"step returned a non-finite reward {step.reward!r}")
            reward += step.reward
            tool_calls += int(step.tool_call)
            if step.done or turns >= spec.max_turns:
                break
            model_text = spec.decode(result.response_tokens)
            conversation.append(ChatMessage("assistant", model_text))
            observation = ChatMessage(step.role, step.observation)
            ids = await spec.tokens.append_ids(conversation, result.response_tokens, observation)
            conversation.append(observation)
            if len(ep.tokens) + len(ids) >= spec.max_episode_tokens:  # no room for the observation and a turn
                finish = "length"
                break
            ep.add_env(ids, ep.versions[-1] if ep.versions else result_version(result, request))
    except _EnvFailed as failed:
        reward, error = 0.0, str(failed)
    trajectory = ep.trajectory(finish_reason=finish, reward=reward, turns=turns, tool_calls=tool_calls)
    return EpisodeResult(
        trajectory=trajectory, env_calls=ep.calls, env_seconds=ep.seconds, error=error
    )


def result_version(result: GenerationResult, request: GenerationRequest) -> int:
    """The version of a turn that sampled no token: that of its last token, else of the request's."""
    versions = result.token_versions or request.token_versions
    return versions[-1] if versions else -1
