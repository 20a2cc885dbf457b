r"""`arith`: integer word problems of one to several steps, for instruct models.

"Maya has 12 marbles. Maya buys 3 bags of 5 marbles each. Maya gives away 7 marbles. How many
marbles does Maya have now?" — generated from a seed; every intermediate count is a whole number
from 0 up, so the story always makes sense. The prompt asks for the final number only, in
`\boxed{}` (`INSTRUCTION`); the reward (`answers.number_reward`) is 1 for the exact number, else 0
— a response without a box is scored by its last number.

`task.difficulty` picks the steps, the number ranges and the operations (`LEVELS`). Level 1 is
sized for a ~135M instruct model, measured (`benchmarks/base_accuracy.py`; benchmarks/RESULTS.md,
"Base accuracy of the math tasks"): SmolLM2-135M-Instruct, greedy, answers 13 of 64 (20 %) of
level 1's held-out one-step +/- stories over numbers up to 20, 2 % at level 2, 3 % at level 3.
"Please reason step by step" made it ramble to the 128-token cut (1 of 32 at level 1), and 1-2
steps at level 1 gave 7 of 48 (15 %). It rarely writes the box: the format, like the arithmetic,
is left for RL to teach. Larger models: 2-3 (~0.5B), 4-5 (several billion).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec

from asyncpolicy.tasks.base import Example

# Short on purpose: a ~135M model told to reason step by step rambles past any answer (see above).
INSTRUCTION = r"Give only the final number, in \boxed{}."


class Level(msgspec.Struct, frozen=True, kw_only=True):
    """One difficulty: how many steps, how large the numbers, which operations."""

    min_steps: int
    max_steps: int
    max_number: int  # the start count and every added or given-away amount are 1..max_number
    max_group: int  # "k bags of m": k in 2..5, m in 2..max_group
    ops: tuple[str, ...]


ALL_OPS = ("buy", "give", "buy_groups", "give_groups", "multiply", "share")
LEVELS: dict[int, Level] = {
    1: Level(min_steps=1, max_steps=1, max_number=20, max_group=5, ops=("buy", "give")),
    2: Level(min_steps=2, max_steps=2, max_number=30, max_group=6, ops=("buy", "give", "buy_groups")),
    3: Level(min_steps=2, max_steps=3, max_number=50, max_group=10, ops=ALL_OPS),
    4: Level(min_steps=3, max_steps=4, max_number=100, max_group=12, ops=ALL_OPS),
    5: Level(min_steps=4, max_steps=6, max_number=100, max_group=12, ops=ALL_OPS),
}
MAX_COUNT = 2000  # no story grows past this: a "triples" step is skipped above it

NAMES = ("Tom", "Ann", "Maya", "Leo", "Sara", "Omar", "Lena", "Ravi", "Ken", "Zoe", "Ben", "Mia", "Ivan", "Nora")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "coins", "cards", "books", "shells", "stamps")
CONTAINERS = ("bags", "boxes", "packs", "jars")


class _Story(msgspec.Struct, kw_only=True):
    name: str
    items: str
    count: int


def _noun(n: int, items: str) -> str:
    """"apples", or "apple" for one: every item name is a plain -s plural."""
    return items if n != 1 else items.removesuffix("s")


def _step(rng: random.Random, op: str, level: Level, s: _Story) -> tuple[str, str] | None:
    """One step applied to the story: (sentence, key part), or None when `op` does not fit the count."""
    name, items, x = s.name, s.items, s.count
    if op == "buy":
        n = rng.randint(1, level.max_number)
        s.count = x + n
        return f"{name} buys {n} more {_noun(n, items)}.", f"+{n}"
    if op == "give" and x >= 1:
        n = rng.randint(1, min(x, level.max_number))
        s.count = x - n
        return f"{name} gives away {n} {_noun(n, items)}.", f"-{n}"
    k, m = rng.randint(2, 5), rng.randint(2, level.max_group)
    if op == "buy_groups":
        s.count = x + k * m
        return f"{name} buys {k} {rng.choice(CONTAINERS)} of {m} {items} each.", f"+{k}*{m}"
    if op == "give_groups" and k * m <= x:
        s.count = x - k * m
        return f"{name} gives {k} friends {m} {items} each.", f"-{k}*{m}"
    if op == "multiply" and x >= 1 and x * 3 <= MAX_COUNT:
        k = rng.choice((2, 3))
        s.count = x * k
        return f"Then the number of {items} {name} has {'doubles' if k == 2 else 'triples'}.", f"*{k}"
    divisors = [d for d in range(2, 6) if x >= d and x % d == 0]
    if op == "share" and divisors:
        d = rng.choice(divisors)
        s.count = x // d
        return f"{name} splits the {items} into {d} equal piles and keeps one pile.", f"/{d}"
    return None


def make_problem(rng: random.Random, difficulty: int) -> Example:
    """One seeded word problem of `difficulty` (a key of LEVELS)."""
    level = LEVELS[difficulty]
    story = _Story(name=rng.choice(NAMES), items=rng.choice(ITEMS), count=rng.randint(1, level.max_number))
    sentences = [f"{story.name} has {story.count} {_noun(story.count, story.items)}."]
    key = [str(story.count)]
    steps = rng.randint(level.min_steps, level.max_steps)
    while len(key) <= steps:
        step = _step(rng, rng.choice(level.ops), level, story)
        if step is not None:
            sentences.append(step[0])
            key.append(step[1])
    question = " ".join([*sentences, f"How many {story.items} does {story.name} have now?"])
    return Example(
        prompt=f"Question: {question}\nAnswer:",
        instruction=f"{question}\n{INSTRUCTION}",
        answer=str(story.count),
        key=" ".join(key),
    )


def generator(difficulty: int) -> Callable[[random.Random], Example]:
    return lambda rng: make_problem(rng, difficulty)
