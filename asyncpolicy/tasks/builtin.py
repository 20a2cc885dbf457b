"""Built-in tasks: short string puzzles a tiny model learns from reward alone in minutes.

Each task is a seeded generator of (question, answer) pairs and a verifiable reward with partial
credit per position, so early, mostly-wrong responses still give GRPO a gradient. The held-out
split is drawn first and excluded from training, so validation measures generalisation.

Prompt formats are terse for the embedded character model ("abc>" → "cba"); a model with a chat
template gets the same puzzle as a plain-English instruction instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from asyncpolicy.tasks.base import Example

LETTERS = "abcdefgh"  # a small alphabet: random responses hit a right letter often enough to learn from
MIN_LEN, MAX_LEN = 2, 4


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


def reverse_example(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(
        prompt=f"{w}>", instruction=f"Reverse the string {w}. Reply with the reversed string only.", answer=w[::-1]
    )


def copy_example(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(prompt=f"{w}=", instruction=f"Repeat the string {w}. Reply with the string only.", answer=w)


def add_example(rng: random.Random) -> Example:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return Example(prompt=f"{a}+{b}=", instruction=f"What is {a}+{b}? Reply with the number only.", answer=str(a + b))


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "reverse": reverse_example,
    "copy": copy_example,
    "add": add_example,
}


def position_credit(response: str, answer: str) -> float:
    """Fraction of positions where response and answer agree, over the longer of the two.

    Dividing by the longer length means extra characters cost as much as missing ones, so the
    policy must also learn where to stop (emit EOS).
    """
    response = response.strip()
    longest = max(len(answer), len(response))
    if longest == 0:
        return 1.0
    return sum(r == a for r, a in zip(response, answer, strict=False)) / longest


def make_splits(name: str, num_train: int, num_val: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded train and held-out val examples; no val prompt appears in train (when the space allows)."""
    make = TASKS[name]
    rng = random.Random(f"{name}:{seed}")
    val: list[Example] = []
    seen: set[str] = set()
    for _ in range(num_val * 20):  # bounded: a tiny puzzle space may hold fewer distinct prompts
        if len(val) == num_val:
            break
        ex = make(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            val.append(ex)
    train: list[Example] = []
    for _ in range(num_train * 20):
        if len(train) == num_train:
            break
        ex = make(rng)
        if ex.prompt not in seen:
            train.append(ex)
    return train, val


def position_reward(prompt: str, response: str, ground_truth: str) -> float:
    """`position_credit` as a reward function (the form `task.reward_fn` names)."""
    return position_credit(response, ground_truth)
