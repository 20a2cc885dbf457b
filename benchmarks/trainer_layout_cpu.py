"""CPU training step time of the trainer's micro-batch layouts, side by side in one process.

    python benchmarks/trainer_layout_cpu.py [--reps 5] [--resp-max 6]

The embedded model, the default batch (16 prompts × 8 responses), prompts of 8-20 tokens and
responses of 1..--resp-max tokens. Variants run interleaved (rep 1 of each, rep 2 of each, ...)
so machine load hits all alike; the figure is each variant's median step time ÷ the default's.
Decides whether `trainer.packing` and `trainer.logprob_chunk_tokens` may be on by default on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from asyncpolicy.bench.synthetic import random_batch
from asyncpolicy.config import load_config
from asyncpolicy.engines.training.step import PolicyLogprobs, StepRunner, make_optimizer, make_scheduler
from asyncpolicy.models import tiny

VARIANTS = {
    "padded, 32 rows, one chunk (before)": ["trainer.logprob_chunk_tokens=0"],
    "padded, 32 rows, chunks of 2048 (default)": [],
    "packed, 32 rows": ["trainer.packing=true"],
    "padded, ≤ 512 tokens": ["trainer.max_tokens_per_micro_batch=512"],
    "packed, ≤ 512 tokens": ["trainer.max_tokens_per_micro_batch=512", "trainer.packing=true"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--resp-max", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runners = {}
    vocab = 0
    for name, overrides in VARIANTS.items():
        cfg = load_config(overrides=["trainer.threads=1", *overrides])
        model = tiny.load_model(tiny.resolve_model_path(cfg))
        opt = make_optimizer(model.parameters(), cfg)
        policy = PolicyLogprobs.of(model, cfg)
        runners[name] = StepRunner(cfg, policy, None, opt, make_scheduler(opt, cfg), torch.device("cpu"), 0)
        vocab = int(model.config.vocab_size)
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for rep in range(args.reps + 1):
        batch = random_batch(rep, groups=16, n=8, prompt_len=(8, 20), response_len=(1, args.resp_max), tokens=range(3, vocab),
                             logprob=(-4.0, -4.0))
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.run(batch, 0)
            if rep:  # rep 0 warms up
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["padded, 32 rows, chunks of 2048 (default)"])
    print(f"| variant | median step s | ÷ default |  (reps {args.reps}, responses 1-{args.resp_max} tokens)")
    print("|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.4f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
