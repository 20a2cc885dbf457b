"""Train and held-out splits of a generated task, disjoint by construction.

A problem's split is a function of the problem alone: its `key` (the numbers and operations, not
the wording) hashed with the task's name. One problem in `HELD_OUT_BUCKETS` of the whole problem
space is held out, whatever the seed, so no seed's training set ever holds any seed's held-out
problem — validation measures generalisation to unseen problems, not recall.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from asyncpolicy.tasks.base import Example

HELD_OUT_BUCKETS = 10  # 1 in 10 problems is held out: enough distinct held-out problems at every difficulty


def is_held_out(task: str, key: str) -> bool:
    """Whether `key`'s problem belongs to the held-out split of `task` (a stable hash, not Python's)."""
    digest = hashlib.sha256(f"{task}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def hashed_splits(
    task: str, make: Callable[[random.Random], Example], num_train: int, num_val: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Seeded train and held-out examples of `make`, split by `is_held_out`.

    Held-out problems are distinct; training problems may repeat (the space of easy problems is
    small). Bounded draws: a problem space too small for `num_val` distinct held-out problems gives
    fewer, never a hang.
    """
    rng = random.Random(f"{task}:{seed}")
    train: list[Example] = []
    val: list[Example] = []
    val_keys: set[str] = set()
    for _ in range(2 * num_train + 20 * HELD_OUT_BUCKETS * num_val):
        if len(train) == num_train and len(val) == num_val:
            break
        ex = make(rng)
        key = ex.key or ex.prompt
        if not is_held_out(task, key):
            if len(train) < num_train:
                train.append(ex)
        elif len(val) < num_val and key not in val_keys:
            val_keys.add(key)
            val.append(ex)
    return train, val
