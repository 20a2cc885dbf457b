"""A simulated tool environment for `bench agentic`: each tool call awaits a lognormal latency.

Real agents spend most of an episode waiting on tools (a search, a sandbox, an API) whose times
have a long tail; that tail is what a synchronous generate-then-train loop pays at every step
(a batch waits for its slowest episode) and what asynchronous training hides. An episode is
`TOOL_TURNS` tool calls (the model's turn, then the tool's result as the observation), then an
answer turn that ends it. The latencies come from one seeded `random.Random` (`reseed`), and the
class counts live episodes so the bench can report how many ran at once.
"""

from __future__ import annotations

import math
import random

import anyio

from asyncpolicy.envs.protocol import Step
from asyncpolicy.samples import Prompt

TOOL_MEDIAN_S = 0.2  # median tool latency
TOOL_SIGMA = 1.0  # lognormal sigma: mean = median * e^(sigma²/2) ≈ 0.33 s, p99 ≈ 2 s
TOOL_TURNS = 2  # tool calls per episode; the next turn answers and ends it


class LognormalTools:
    """`task.env=asyncpolicy.bench.tool_env:LognormalTools`: one object per episode."""

    rng = random.Random(0)
    live = 0  # episodes reset and not yet done
    peak = 0  # most live at once since `reseed`
    tool_calls = 0
    tool_seconds = 0.0

    @classmethod
    def reseed(cls, seed: int) -> None:
        """Start a scenario: the same latencies for the same seed, counters at zero."""
        cls.rng = random.Random(seed)
        cls.live = cls.peak = cls.tool_calls = 0
        cls.tool_seconds = 0.0

    def __init__(self) -> None:
        self.turn = 0
        self.counted = False

    async def reset(self, prompt: Prompt) -> None:
        cls = type(self)
        cls.live += 1
        cls.peak = max(cls.peak, cls.live)
        self.counted = True

    async def step(self, model_text: str) -> Step:
        self.turn += 1
        cls = type(self)
        if self.turn > TOOL_TURNS:
            if self.counted:
                cls.live -= 1
                self.counted = False
            return Step(done=True, reward=float(len(model_text) % 2))
        latency = TOOL_MEDIAN_S * math.exp(cls.rng.gauss(0.0, TOOL_SIGMA))
        await anyio.sleep(latency)
        cls.tool_calls += 1
        cls.tool_seconds += latency
        return Step(observation=f"tool {self.turn}: ok", role="tool", tool_call=True)
