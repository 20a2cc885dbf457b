"""Trainer variants side by side in ONE process: the FSDP rank's own policy (`fsdp_worker.RankPolicy`),
one rank, tokens/s, MFU, peak memory, and where a step's GPU time goes.

    python benchmarks/trainer_gpu.py [--seqs 16,256] [--steps 4] [--profile NAME,NAME] \
        [--variant "NAME override override ..."]...

Each variant is a name and `key=value` config overrides (and `+foreach-adam`: AdamW's foreach kernels instead of the fused one) on top of `bench gpu`'s trainer settings
(fp32 master weights, bf16 compute, decoupled PPO, token budget 16384, recompute on). Batches are
`bench gpu`'s fixed ones: 128-token prompts, responses of --resp-len tokens (uniform in
--resp-min..--resp-len when --resp-min > 0), 4 per prompt. One process saves the ~10 s start of
a worker per variant (`bench gpu --sections train` starts one each); the step itself is the
same code. `--profile NAME` runs torch.profiler over one step of that variant and prints the
GPU time by kernel family and the GPU's busy fraction of the step (low = launch-bound).
Without a GPU it runs the same plumbing on a tiny model over gloo (the CPU test).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import torch

from asyncpolicy.bench.gpu.model_dir import QWEN05, TINY_QWEN, make_model_dir, vocab_size
from asyncpolicy.bench.gpu.settings import TRAINER_OVERRIDES
from asyncpolicy.bench.synthetic import fixed_batch
from asyncpolicy.config import load_config
from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.training.relay import join_process_group
from asyncpolicy.engines.training.step import make_scheduler
from asyncpolicy.errors import first_line

BASE = [*TRAINER_OVERRIDES, "trainer.max_tokens_per_micro_batch=16384"]
DEFAULT_VARIANTS = [
    "base",
    "no-recompute model.gradient_checkpointing=false",
    "compile model.gradient_checkpointing=false trainer.compile=true",
]


def family(kernel: str) -> str:
    k = kernel.lower()
    if any(x in k for x in ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "splitk")):
        return "matmul"
    if any(x in k for x in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if "nccl" in k:
        return "nccl"
    if "triton" in k:
        return "triton (compiled)"
    if any(x in k for x in ("reduce", "softmax", "logsumexp", "norm")):
        return "reductions"
    if any(x in k for x in ("memcpy", "memset", "copy")):
        return "copies"
    if any(x in k for x in ("elementwise", "vectorized", "unrolled", "foreach", "index", "gather", "scatter", "cat")):
        return "elementwise/index"
    return "other"


def profile_step(policy: Any, batch: list[Any], version: int, top: int = 12) -> list[str]:
    """One step under torch.profiler: GPU time per kernel family, the top kernels, GPU busy fraction."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        policy.train(w.Train(batch=batch, version=version))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    by_kernel: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_kernel[e.name] += e.device_time / 1e6  # µs → s
            count[e.name] += 1
    total = sum(by_kernel.values())
    fam: dict[str, float] = defaultdict(float)
    for k, v in by_kernel.items():
        fam[family(k)] += v
    out = [f"profiled step: wall {wall:.3f} s, GPU kernel time {total:.3f} s (busy {total / wall:.0%}), "
           f"{sum(count.values())} kernels"]
    out += [f"  {f:<20} {v:7.3f} s  {v / total:5.1%}" for f, v in sorted(fam.items(), key=lambda x: -x[1])]
    out.append("  top kernels:")
    for k, v in sorted(by_kernel.items(), key=lambda x: -x[1])[:top]:
        out.append(f"  {v:7.3f} s {count[k]:6d}x  {k[:110]}")
    return out


def run_variant(
    name: str, init: w.WorkerInit, seqs: list[int], args: argparse.Namespace, vocab: int,
    rows: list[dict[str, Any]], profile: list[str], foreach_adam: bool = False,
) -> int:
    """`args.steps` steps of each batch size on a fresh policy; a row each (and a profile when asked)."""
    cuda = init.gpu is not None
    t0 = time.perf_counter()
    policy = w.RankPolicy(init)
    if foreach_adam:  # the same AdamW as foreach kernels (the trainer's before it took the fused one on CUDA)
        tr = init.config.trainer
        policy.opt = torch.optim.AdamW(policy.module.parameters(), lr=tr.lr, weight_decay=tr.weight_decay, foreach=True)
        policy.sched = make_scheduler(policy.opt, init.config)
        policy.step.optimizer, policy.step.scheduler = policy.opt, policy.sched
    start_s = time.perf_counter() - t0
    version = 0
    for n in seqs:
        batch = fixed_batch(max(1, n // 4), 4, args.prompt_len, args.resp_len, vocab, 1, args.resp_min)
        ms = []
        for _ in range(args.steps):
            ms.append(policy.train(w.Train(batch=batch, version=version)))
            version += 1
        best = max(ms[1:] or ms, key=lambda m: m["perf/train_tokens_per_s"])  # step 1 pays compile and allocator warm-up
        rows.append({
            "variant": name, "seqs": n, "tok_s": best["perf/train_tokens_per_s"], "mfu": best.get("perf/mfu", 0.0),
            "step_s": best["perf/train_step_s"], "first_s": ms[0]["perf/train_step_s"],
            "peak_GiB": max(m.get("perf/gpu_mem_peak_GB", 0.0) for m in ms), "loss": ms[-1]["losses/loss"], "start_s": start_s,
        })
        print(f"# {rows[-1]}", flush=True)
        if cuda and name in args.profile.split(",") and n == seqs[-1]:
            profile += [f"variant {name}, {n} sequences", *profile_step(policy, batch, version, args.top)]
            version += 1
    return version


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="16,256")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resp-len", type=int, default=512)
    ap.add_argument("--resp-min", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--variant", action="append", help='"NAME key=value ..." (repeatable)')
    ap.add_argument("--profile", default="", help="variant names (comma-separated) to profile one step of")
    ap.add_argument("--model-dir", default="")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per profile")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    seqs = [int(x) for x in args.seqs.split(",")]
    variants = [v.split() for v in (args.variant or DEFAULT_VARIANTS)]
    model_dir = args.model_dir or make_model_dir(
        tempfile.mkdtemp(prefix="trainer-gpu-"), QWEN05 if cuda else TINY_QWEN, tokenizer=False
    )
    vocab = vocab_size(model_dir)
    port = w.free_port()
    rows: list[dict[str, Any]] = []
    profile: list[str] = []
    joined = False
    for name, *overrides in variants:
        foreach_adam = "+foreach-adam" in overrides  # an experiment of this script's, not a config key
        overrides = [o for o in overrides if o != "+foreach-adam"]
        cfg = load_config(overrides=[*BASE, *overrides])
        init = w.WorkerInit(model_path=model_dir, config=cfg, gpu=0 if cuda else None, master_port=port)
        if not joined:
            join_process_group(init)
            joined = True
        try:
            run_variant(name, init, seqs, args, vocab, rows, profile, foreach_adam)
        except Exception as e:  # one variant's failure (a kernel this torch lacks, OOM) is a row, not the end
            rows.append({"variant": name, "error": f"{type(e).__name__}: {first_line(e)[:100]}"})
            print(f"# {rows[-1]}", flush=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    print("\n".join(profile))
    print(f"\n{'variant':<28} {'seqs':>5} {'tokens/s':>9} {'MFU':>6} {'step s':>7} {'1st s':>6} {'peak GiB':>8} {'loss':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<28} failed: {r['error']}")
            continue
        print(f"{r['variant']:<28} {r['seqs']:>5} {r['tok_s']:>9.0f} {r['mfu']:>6.3f} {r['step_s']:>7.3f} "
              f"{r['first_s']:>6.2f} {r['peak_GiB']:>8.1f} {r['loss']:>9.4f}")
    sys.stdout.flush()
    os._exit(0)  # the process group and compile workers: nothing left to save


if __name__ == "__main__":
    raise SystemExit(main())
