"""Every built-in task by its `task.name`: how its prompts are made and which reward scores them.

A task's reward is named by a dotted path, the same form `task.reward_fn` takes, and imported the
same way: a built-in reward and a user's are one mechanism (`loading.import_reward_fn`), and any
built-in reward can be given as `task.reward_fn` for the user's own data.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from asyncpolicy.envs import calc, guess
from asyncpolicy.tasks import arith, builtin, countdown, gsm8k
from asyncpolicy.tasks.base import Example
from asyncpolicy.tasks.splits import hashed_splits

Splits = tuple[list[Example], list[Example]]


class GeneratedTask(msgspec.Struct, frozen=True, kw_only=True):
    """Problems generated from the seed: `splits(num_train, num_val, seed, difficulty)` → (train, held-out)."""

    splits: Callable[[int, int, int, int], Splits]
    reward_fn: str  # empty: a game whose environment scores it (`env` is then set)
    env: str = ""  # the environment of its episodes (envs/), empty = single-turn; `task.env` overrides it
    max_turns: int = 0  # its episodes' limits when the config sets none (task.max_turns, task.max_turn_tokens)
    max_turn_tokens: int = 0


class FileTask(msgspec.Struct, frozen=True, kw_only=True):
    """The user's data files in a known format: `example(prompt column, answer column)` per row."""

    prompt_column: str
    answer_column: str
    example: Callable[[str, str], Example]
    reward_fn: str


def _tiny(name: str) -> GeneratedTask:
    return GeneratedTask(
        splits=lambda n, v, seed, _difficulty: builtin.make_splits(name, n, v, seed),
        reward_fn="asyncpolicy.tasks.builtin:position_reward",
    )


TASKS: dict[str, GeneratedTask | FileTask] = {
    **{name: _tiny(name) for name in builtin.TASKS},
    "arith": GeneratedTask(
        splits=lambda n, v, seed, d: hashed_splits("arith", arith.generator(d), n, v, seed),
        reward_fn="asyncpolicy.tasks.answers:number_reward",
    ),
    "countdown": GeneratedTask(
        splits=lambda n, v, seed, d: hashed_splits("countdown", countdown.generator(d), n, v, seed),
        reward_fn="asyncpolicy.tasks.countdown:reward",
    ),
    "calc": GeneratedTask(
        splits=lambda n, v, seed, d: hashed_splits("arith", calc.generator(d), n, v, seed),  # arith's split
        reward_fn="asyncpolicy.tasks.answers:number_reward",  # the environment scores with it
        env="asyncpolicy.envs.calc:Calculator",
        max_turns=4,
    ),
    "guess": GeneratedTask(
        splits=lambda n, v, seed, _difficulty: guess.splits(n, v, seed),
        reward_fn="",
        env="asyncpolicy.envs.guess:GuessNumber",
        max_turns=guess.MAX_TURNS,
        max_turn_tokens=1,
    ),
    "gsm8k": FileTask(
        prompt_column=gsm8k.PROMPT_COLUMN,
        answer_column=gsm8k.ANSWER_COLUMN,
        example=gsm8k.example,
        reward_fn="asyncpolicy.tasks.answers:number_reward",
    ),
}
