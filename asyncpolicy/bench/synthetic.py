"""Synthetic training batches, seeded: what the trainer benchmarks measure on and the trainer tests compare.

The GPU bench's fixed shapes, the CPU layout benchmark and the tests that hold one training layout
equal to another all draw here, so "a batch of G prompts × n responses" means one thing.
"""

from __future__ import annotations

import math
import random

from asyncpolicy.samples import Prompt, Sample, Trajectory, make_sample


def random_batch(
    seed: int,
    *,
    groups: int = 3,
    n: int = 3,
    prompt_len: tuple[int, int] = (4, 4),
    response_len: tuple[int, int] = (1, 6),
    tokens: range = range(200),
    versions: tuple[int, ...] = (0,),
    logprob: tuple[float, float] = (-5.0, -3.0),
    finish_reason: str = "stop",
) -> list[Sample]:
    """`groups` samples of `n` responses; lengths uniform in the inclusive ranges (equal bounds: fixed),
    token ids from `tokens`, behaviour logprobs uniform in `logprob`, each token's version from
    `versions`, rewards uniform in [0, 1)."""
    rng = random.Random(seed)
    out = []
    for i in range(groups):
        prompt = Prompt(index=i, epoch=0, text="", tokens=[rng.choice(tokens) for _ in range(rng.randint(*prompt_len))])
        trajs = []
        for _ in range(n):
            k = rng.randint(*response_len)
            trajs.append(Trajectory(
                response_tokens=[rng.choice(tokens) for _ in range(k)],
                behaviour_logprobs=[rng.uniform(*logprob) for _ in range(k)],
                token_versions=[rng.choice(versions) for _ in range(k)],
                finish_reason=finish_reason,
                reward=rng.random(),
            ))
        out.append(make_sample(prompt, trajs, 0))
    return out


def fixed_batch(groups: int, n: int, prompt_len: int, resp_len: int, vocab: int, seed: int, min_len: int = 0) -> list[Sample]:
    """`groups` samples of `n` responses of exactly `resp_len` tokens (of `min_len`..`resp_len`
    tokens, seeded, when `min_len` > 0), sampled by the uniform policy: a training batch of known size."""
    uniform = -math.log(vocab)
    return random_batch(
        seed, groups=groups, n=n, prompt_len=(prompt_len, prompt_len), response_len=(min_len or resp_len, resp_len),
        tokens=range(vocab), logprob=(uniform, uniform), finish_reason="length",
    )

