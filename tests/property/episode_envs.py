"""Environments for the episode properties, named by import path (`task.env=episode_envs:RandomEnv`).

Their randomness (turn counts, tool latencies, failures) comes from `RNG`, which the property
module registers with Hypothesis, so an example replays and shrinks.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import anyio

from asyncpolicy.envs import Step
from asyncpolicy.samples import Prompt

RNG = random.Random(0)
LATENCIES = (0.0, 0.0, 0.0005, 0.002)
FAILURE_RATE = 0.05


class RandomEnv:
    """A tool-using environment: a random number of turns, random latencies, now and then a failure."""

    def __init__(self) -> None:
        self.turns_left = RNG.randint(0, 4)

    async def reset(self, prompt: Prompt) -> None:
        await anyio.sleep(RNG.choice(LATENCIES))

    async def step(self, model_text: str) -> Step:
        await anyio.sleep(RNG.choice(LATENCIES))
        if RNG.random() < FAILURE_RATE:
            raise RuntimeError("the tool broke")
        if self.turns_left == 0:
            return Step(done=True, reward=float(len(model_text) % 2))
        self.turns_left -= 1
        return Step(observation="result " * RNG.randint(0, 2), reward=0.25, tool_call=True, role="tool")


class PlainEnv(RandomEnv):
    """The same, written as plain functions: run in worker threads."""

    def reset(self, prompt: Prompt) -> None:  # type: ignore[override]
        return None

    def step(self, model_text: str) -> Step:  # type: ignore[override]
        if self.turns_left == 0:
            return Step(done=True, reward=1.0)
        self.turns_left -= 1
        return Step(observation="x")


class Tripwire:
    """What the stop properties arm: `on_step(prompt)` as each episode step starts (a property stops the
    run at the k-th tool call from it), and the prompts whose tool call hung."""

    def __init__(self) -> None:
        self.on_step: Callable[[Prompt], None] | None = None
        self.hung: list[Prompt] = []

    def disarm(self) -> None:
        self.on_step, self.hung = None, []


TRIPWIRE = Tripwire()
HANG_RATE = 0.08


class HangingEnv(RandomEnv):
    """RandomEnv whose tool now and then never answers (task.env_timeout_s ends the call), and whose
    steps pass TRIPWIRE first."""

    async def reset(self, prompt: Prompt) -> None:
        self.prompt = prompt
        await super().reset(prompt)

    async def step(self, model_text: str) -> Step:
        if TRIPWIRE.on_step is not None:
            TRIPWIRE.on_step(self.prompt)
        if RNG.random() < HANG_RATE:
            TRIPWIRE.hung.append(self.prompt)
            await anyio.sleep_forever()
        return await super().step(model_text)
