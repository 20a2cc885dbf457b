"""`guess`: find a secret digit from '+' / '-' hints, a multi-turn game the embedded model learns (task.name=guess).

The secret is a digit 0..`HIGHEST`; each model turn is one character (`max_turn_tokens=1`), a
guess. The environment answers with one character: `+` (the secret is larger), `-` (smaller), `?`
(not a digit of the range); a right guess ends the episode with reward `1 - TURN_COST * (turns - 1)`,
and `MAX_TURNS` wrong guesses score 0. Sized for the defaults: 7 secrets take at most 3 guesses by
bisection (3, then 1 or 5, then the last), and 3 guesses with 2 hints are 5 tokens, within the
default `data.max_response_length=6`. The policy to learn is that bisection: the hints are the
only information, as every game's prompt is the same.

Measured on a 2-core CPU (benchmarks/RESULTS.md, "The guess game"). The held-out split is one game
per secret: the space holds no unseen problem, so validation measures the policy on every secret.
"""

from __future__ import annotations

import random

from asyncpolicy.envs.protocol import Step
from asyncpolicy.samples import Prompt
from asyncpolicy.tasks.base import Example

HIGHEST = 6  # secrets 0..6: 7 of them, found by bisection in MAX_TURNS guesses
MAX_TURNS = 3
DIGITS = tuple(str(d) for d in range(HIGHEST + 1))
TURN_COST = 0.1  # a game won later scores less: the policy should bisect, not sweep
PROMPT = f"guess 0-{HIGHEST}:"
INSTRUCTION = (
    f"I am thinking of a whole number from 0 to {HIGHEST}. Guess it: reply with one digit. I answer + if my "
    "number is larger, - if it is smaller."
)


def example(secret: int) -> Example:
    return Example(prompt=PROMPT, instruction=INSTRUCTION, answer=str(secret), key=str(secret))


def splits(num_train: int, num_val: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded random secrets to train on; one held-out game per secret (at most `num_val`)."""
    rng = random.Random(f"guess:{seed}")
    train = [example(rng.randint(0, HIGHEST)) for _ in range(num_train)]
    return train, [example(secret) for secret in range(min(num_val, HIGHEST + 1))]


class GuessNumber:
    """One game: the secret is the prompt's ground truth."""

    def __init__(self) -> None:
        self.secret = -1
        self.turns = 0

    def reset(self, prompt: Prompt) -> None:
        self.secret, self.turns = int(prompt.ground_truth), 0

    def step(self, model_text: str) -> Step:
        self.turns += 1
        guess = model_text.strip()
        if guess not in DIGITS:  # not str.isdigit: it admits '²', which int() refuses
            return Step(observation="?")
        if int(guess) == self.secret:
            return Step(done=True, reward=1.0 - TURN_COST * (self.turns - 1))
        return Step(observation="+" if self.secret > int(guess) else "-")
