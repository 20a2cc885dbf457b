"""A black-box agent written against the `openai` client (docs/agents.md, "Black-box agents").

The runtime gives each episode its own base URL; the agent talks to the policy like to any
OpenAI-compatible server and returns the episode's reward. Here: ask, let the model check its
answer once (a second user message), and score the final reply against the prompt's arithmetic.
"""

from __future__ import annotations

import re
from typing import Any

from openai import AsyncOpenAI


def _expected(prompt: str) -> int | None:
    match = re.search(r"(-?\d+)\s*([+-])\s*(-?\d+)", prompt)
    if match is None:
        return None
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return a + b if op == "+" else a - b


async def solve(base_url: str, prompt: str) -> float:
    """Two calls, the history resent each time as the OpenAI API does; reward 1 for the right number."""
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60.0)
    async with client:
        messages: list[Any] = [{"role": "user", "content": prompt}]  # the client's message TypedDicts, as plain dicts
        first = await client.chat.completions.create(model="policy", messages=messages, max_tokens=16)
        messages.append({"role": "assistant", "content": first.choices[0].message.content or ""})
        messages.append({"role": "user", "content": "Check it, then reply with the number only."})
        final = await client.chat.completions.create(model="policy", messages=messages, max_tokens=8)
    expected = _expected(prompt)
    numbers = re.findall(r"-?\d+", final.choices[0].message.content or "")
    return 1.0 if expected is not None and numbers and int(numbers[-1]) == expected else 0.0
