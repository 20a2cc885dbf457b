"""`bench gpu`'s sections, one function each, of engines from a factory (`BenchEngines`), and the
runner that records a failing section's traceback and runs the rest.

  gen    generation tokens/s: bare vLLM AsyncLLM vs asyncpolicy's VLLMGenerationEngine, same
         engine, same prompts, fixed lengths (EOS ignored); then abort and continue a response
  ipc    colocated: a trainer rank on vLLM's GPU, CUDA IPC weight sync (pause → resume), checksums
  nccl   disjoint: vLLM on GPU 0, trainer on GPU 1: the bare broadcast, then NCCL weight syncs
  train  FSDP2 trainer tokens/s, MFU and peak memory, one rank, per batch size and variant
  fsdp2  the same over 2 ranks (GPUs 0 and 1)
  async  the Supervisor, as users run it: the same run with staleness_threshold=0 and ≥ 1
  learn  a real model on a real task: held-out accuracy against time, on-policy vs staleness 1 and 2 (learn.py)
"""

from __future__ import annotations

import math
import random
import statistics
import subprocess
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import msgspec
import structlog

from asyncpolicy.bench.common import WARMUP, BenchContext, ScenarioRun, percentile, run_supervised, steady_step_s
from asyncpolicy.bench.gpu.engines import BenchEngines, engine_batch
from asyncpolicy.bench.gpu.learn import section_learn
from asyncpolicy.bench.gpu.settings import GPUBenchSettings
from asyncpolicy.bench.synthetic import fixed_batch
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.engines.protocols import GenerationRequest, GenerationResult

log = structlog.get_logger("asyncpolicy.bench.gpu")


def gpu_memory() -> list[dict[str, Any]]:
    """Per-GPU memory and utilisation from nvidia-smi; empty without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.used,memory.total,utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.strip().splitlines():
        i, name, used, total, util = [x.strip() for x in line.split(",")]
        rows.append({"gpu": int(i), "name": name, "used_GiB": round(int(used) / 1024, 1), "total_GiB": round(int(total) / 1024, 1), "util_pct": int(util)})
    return rows



async def _abort_and_continue(gen: Any, prompts: list[list[int]], s: GPUBenchSettings) -> dict[str, Any]:
    """Abort long responses mid-way (they come back partial, finish_reason 'abort'), then continue one."""
    slots: list[GenerationResult | None] = [None] * len(prompts)

    async def one(i: int, p: list[int]) -> None:
        slots[i] = await gen.generate(GenerationRequest(request_id=f"ab{i}", prompt_tokens=p, max_tokens=s.abort_len))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i, p in enumerate(prompts):
                tg.start_soon(one, i, p)
            await anyio.sleep(s.abort_after_s)
            await gen.abort_all()
    results = [r for r in slots if r is not None]
    k = next((i for i, r in enumerate(results) if r.finish_reason == "abort"), 0)
    first = results[k]
    cont = await gen.generate(GenerationRequest(
        request_id="cont", prompt_tokens=prompts[k], max_tokens=len(first.response_tokens) + 16,
        response_tokens=first.response_tokens, behaviour_logprobs=first.behaviour_logprobs, token_versions=first.token_versions,
    ))
    partial = [len(r.response_tokens) for r in results]
    return {
        "abort_reasons": sorted({r.finish_reason for r in results}), "abort_partial_lens": [min(partial), max(partial)],
        "continued_len": len(cont.response_tokens), "continued_from": len(first.response_tokens), "continued_finish": cont.finish_reason,
    }


async def section_gen(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    gen = await e.generation()
    rng = random.Random(0)
    prompts = [[rng.randrange(e.vocab) for _ in range(s.gen_prompt_len)] for _ in range(s.gen_prompts)]
    await e.bare_batch(gen, prompts[:8], 32, "warm")
    bare, engine = [], []
    for rep in range(s.gen_reps):  # alternating, same prompts: drift hits both alike
        toks, dt = await e.bare_batch(gen, prompts, s.gen_len, f"bare{rep}")
        bare.append(toks / dt)
        outs, dt = await engine_batch(gen, prompts, s.gen_len, f"eng{rep}")
        engine.append(sum(len(o.response_tokens) for o in outs) / dt)
    logprobs_ok = all(
        len(o.behaviour_logprobs) == len(o.response_tokens) == len(o.token_versions) > 0 and all(lp <= 0 for lp in o.behaviour_logprobs)
        for o in outs
    )
    ratios = sorted(a / b for a, b in zip(engine, bare, strict=True))
    return {
        "bare_tok_s": [round(x) for x in bare], "engine_tok_s": [round(x) for x in engine],
        "engine_over_bare": max(engine) / max(bare), "engine_over_bare_median_pair": ratios[len(ratios) // 2],
        "response_lens": sorted({len(o.response_tokens) for o in outs}), "logprobs_ok": logprobs_ok,
        **await _abort_and_continue(gen, prompts[:16], s), "gpu": gpu_memory(),
    }


async def _sync_checks(e: BenchEngines, gen: Any, trainer: FSDPTrainEngine, transport: Any, s: GPUBenchSettings) -> dict[str, Any]:
    """`sync_reps` × (train a step so the weights change, push); then checksums and a generation under the new weights."""
    pr, packs, totals = [], [], []
    first = gen.version + 1
    for v in range(first, first + s.sync_reps):
        await trainer.train_step(fixed_batch(2, 2, 16, 16, e.vocab, v), v)
        await transport.push(v)
        last = transport.last
        pr.append(last.pause_to_resume_s)
        packs.append(last.pack_s)
        totals.append(last.total_s)
    ck_t = await trainer.checksum()
    ck_v = (await gen.rpc("ap_checksum"))[0]
    post = await gen.generate(GenerationRequest(request_id=f"post-{transport.kind}", prompt_tokens=[1, 2, 3, 4], max_tokens=32))
    return {
        "transport": transport.kind, "pause_to_resume_s": pr, "pack_s": packs, "total_s": totals, "bytes_GB": last.bytes / 1e9,
        "checksum_trainer": ck_t, "checksum_generation": ck_v, "checksum_match": abs(ck_t - ck_v) <= 1e-6 * max(1.0, abs(ck_t)),
        "post_sync_tokens": len(post.response_tokens), "post_sync_versions": sorted(set(post.token_versions)),
        "engine_version": gen.version,
    }


async def section_ipc(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    gen = await e.generation()
    trainer = await e.trainer([0])  # the trainer rank on vLLM's GPU
    return await _sync_checks(e, gen, trainer, e.transport("ipc", gen, trainer), s)


async def section_nccl(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    gen = await e.generation()
    trainer = await e.trainer([1])
    transport = e.transport("nccl", gen, trainer)
    meta = await trainer.pack()
    link = await transport.link_seconds(5)
    nbytes = 2 * sum(n for *_, n in meta)
    figures = await _sync_checks(e, gen, trainer, transport, s)
    return {"link_init_s": transport.init_s, "link_broadcast_s": link, "link_GB_per_s": nbytes / link / 1e9, **figures}


def train_variants(s: GPUBenchSettings) -> list[tuple[bool, bool]]:
    """(packing, compile) of every trainer the train sections start, in order."""
    return [(p, c) for c in s.train_compile for p in s.train_packing]


def variant_overrides(s: GPUBenchSettings, packing: bool, compile_: bool) -> tuple[str, ...]:
    return (
        f"trainer.packing={str(packing).lower()}", f"trainer.compile={str(compile_).lower()}",
        f"trainer.max_tokens_per_micro_batch={s.train_max_tokens}", f"model.gradient_checkpointing={str(s.train_recompute).lower()}",
        f"trainer.attn_implementation={s.train_attn}",
    )


async def _train_figures(e: BenchEngines, gpus: list[int], s: GPUBenchSettings) -> dict[str, Any]:
    """Every variant × batch size on `gpus`: one trainer per variant (closed before the next)."""
    rows = []
    for packing, compile_ in train_variants(s):
        overrides = variant_overrides(s, packing, compile_)
        trainer = await e.trainer(gpus, overrides)
        try:
            for seqs in s.train_seqs:
                groups = max(1, seqs // s.train_n)
                batch = fixed_batch(groups, s.train_n, s.train_prompt_len, s.train_len, e.vocab, 1, s.train_len_min)
                ms = [await trainer.train_step(batch, step) for step in range(s.train_steps)]
                best = max(ms[1:] or ms, key=lambda m: m["perf/train_tokens_per_s"])  # the first step pays one-time costs (compile)
                rows.append({
                    "ranks": trainer.world_size, "sequences": groups * s.train_n, "seq_len": s.train_prompt_len + s.train_len,
                    "tokens": sum(len(x.prompt.tokens) + len(t.response_tokens) for x in batch for t in x.trajectories),
                    "packing": packing, "compile": compile_, "max_tokens": s.train_max_tokens, "recompute": s.train_recompute, "attn": s.train_attn,
                    "tokens_per_s": best["perf/train_tokens_per_s"], "step_s": [m["perf/train_step_s"] for m in ms],
                    "mfu": best.get("perf/mfu", 0.0), "peak_mem_GiB": max(m.get("perf/gpu_mem_peak_GB", 0.0) for m in ms),  # CUDA only
                    "loss_finite": all(math.isfinite(m["losses/loss"]) for m in ms),
                })
                log.info("bench_gpu_train", **{k: v for k, v in rows[-1].items() if k != "step_s"})
        finally:
            await e.drop_trainer(gpus, overrides)  # one variant's memory is not kept for the next
    return {"ranks": len(gpus), "rows": rows}


async def section_train(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    return await _train_figures(e, [s.trainer_gpu], s)


async def section_fsdp2(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    return await _train_figures(e, [0, 1], s)


def _steady_mean(run: ScenarioRun, key: str) -> float:
    """Mean of a metric over the steps after warm-up (the steps `steady_step_s` times)."""
    return statistics.fmean(r[key] or 0.0 for r in run.rows[WARMUP:])


async def section_async(e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext) -> dict[str, Any]:
    """The same supervised run, on-policy (staleness 0) then overlapped (staleness ≥ 1).

    At staleness 0 the rollouter admits one batch per policy version, so a step is generate →
    train → sync. The engine reports its training time t and the synchronizer the sync time;
    the rest of the synchronous step is the batch's generation g (admission, generation,
    scoring: what overlapping can hide). Overlapped, a step ideally takes max(g, t): ideal speedup
    (g + t) / max(g, t). Weight syncs are hidden by neither schedule; their time is reported.
    (Not the trainer's idle ratio × elapsed: elapsed includes the engines' start, minutes for vLLM.)
    """
    await e.release()  # each supervised run starts (and closes) its own engines: free the GPUs first
    runs: dict[tuple[int, bool], ScenarioRun] = {}
    arms = [(0, False), (s.async_staleness, False)] + ([(s.async_staleness, True)] if s.async_in_flight else [])
    for staleness, in_flight in arms:
        name = f"gpu_async_staleness_{staleness}" + ("_in_flight" if in_flight else "")
        scenario = [
            f"async_training.staleness_threshold={staleness}", "async_training.trigger_parameter_sync_step=1",
            f"trainer.total_training_steps={s.async_steps}", "trainer.test_freq=0",
            f"async_training.in_flight_updates={str(in_flight).lower()}",
        ]
        cfg = ctx.config(e.run_overrides(), scenario, name=name)
        settings = {"staleness_threshold": staleness, "in_flight_updates": in_flight}
        runs[staleness, in_flight] = await run_supervised(ctx, name, cfg, engines=e.engine_set(cfg), settings=settings)
    sync, overlapped = runs[0, False], runs[s.async_staleness, False]
    for run in runs.values():
        if not run.finished or len(run.rows) <= WARMUP:
            raise RuntimeError(f"{run.name} trained {run.steps} of {s.async_steps} steps; need more than {WARMUP}")
    step_sync, step_async = steady_step_s(sync), steady_step_s(overlapped)
    t, sync_s = _steady_mean(sync, "perf/train_step_s"), _steady_mean(sync, "sync_latency_s")
    g = step_sync - t - sync_s
    speedup, ideal = step_sync / step_async, (g + t) / max(g, t)
    return {
        "steps": s.async_steps, "staleness": s.async_staleness, "tokens_per_step": s.async_prompts * s.async_n * s.async_len,
        "gen_s": g, "train_s": t, "sync_s": sync_s, "step_sync_s": step_sync, "step_async_s": step_async,
        "wall_sync_s": sync.wall_s, "wall_async_s": overlapped.wall_s, "speedup": speedup, "ideal_speedup": ideal,
        "fraction_of_ideal": speedup / ideal, "async_age_max": overlapped.sample_age_max, "async_dropped_stale": overlapped.dropped_stale,
        "pauses": {("in_flight" if k[1] else "abort") + f"_staleness_{k[0]}": sync_pauses(run) for k, run in runs.items()},
    }


def sync_pauses(run: ScenarioRun) -> dict[str, Any]:
    """Every sync's pause (rollout stopped) and the generations running when it began, after the warm-up."""
    rows = [r for r in run.rows[WARMUP:] if r.get("sync_pause_s") is not None]
    pauses = [float(r["sync_pause_s"]) for r in rows]
    return {
        "syncs": len(pauses), "pause_s": pauses, "in_flight": [r.get("sync_in_flight") for r in rows],
        "mean_s": statistics.fmean(pauses) if pauses else math.nan, "p99_s": percentile(pauses, 99), "max_s": max(pauses, default=math.nan),
        "over_50ms": sum(p > 0.05 for p in pauses), "age_max": run.sample_age_max, "dropped_stale": run.dropped_stale,
        "step_s": steady_step_s(run),
    }


Section = Callable[[BenchEngines, GPUBenchSettings, BenchContext], Awaitable[dict[str, Any]]]
SECTIONS: dict[str, Section] = {
    "gen": section_gen,
    "ipc": section_ipc,
    "nccl": section_nccl,
    "train": section_train,
    "fsdp2": section_fsdp2,
    "async": section_async,
    "learn": section_learn,
}


# -- running and reporting -----------------------------------------------------------------------


class GPUBenchResult(msgspec.Struct, kw_only=True):
    sections: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    errors: dict[str, str] = msgspec.field(default_factory=dict)  # section → traceback
    seconds: dict[str, float] = msgspec.field(default_factory=dict)
    gpu: list[dict[str, Any]] = msgspec.field(default_factory=list)


async def run_sections(
    e: BenchEngines, s: GPUBenchSettings, ctx: BenchContext, on_section: Callable[[GPUBenchResult], None] | None = None
) -> GPUBenchResult:
    """Run the chosen sections in order; a failing section is recorded and the rest still run."""
    res = GPUBenchResult()
    for name in s.sections:
        t0 = time.perf_counter()
        try:
            res.sections[name] = await SECTIONS[name](e, s, ctx)
        except Exception as exc:  # recorded with its traceback; the exit code says a section failed
            res.errors[name] = traceback.format_exc()
            log.error("bench_gpu_section_failed", section=name, error=repr(exc))
        res.seconds[name] = time.perf_counter() - t0
        res.gpu = gpu_memory()
        log.info("bench_gpu_section", section=name, ok=name not in res.errors, seconds=round(res.seconds[name], 1))
        if on_section is not None:
            on_section(res)
    return res
