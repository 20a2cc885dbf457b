"""Everything one GPU experiment of asyncpolicy's GPU path needs, ending with a short table.

Sections (each independent; a failing one is recorded and the rest still run):
  gen    generation tokens/s: bare vLLM AsyncLLM vs asyncpolicy's VLLMGenerationEngine, same
         engine, same prompts, fixed lengths (EOS ignored)
  ipc    colocated: trainer rank on vLLM's GPU, CUDA IPC weight sync (pause → resume), checksum
  train  FSDP2 trainer tokens/s and MFU on 16 × 640-token sequences (the baseline's batch)
  nccl   disjoint: vLLM on GPU 0, trainer on GPU 1, NCCL weight sync vs the bare link time
  fsdp2  FSDP2 over 2 ranks (GPUs 0,1; no vLLM): tokens/s and MFU
  async  async (generation of step k+1 overlaps training of step k) vs synchronous
         (generate → train → sync), same GPUs, fixed response lengths
Model: Qwen2.5-0.5B's shape with random weights (config only; vLLM gets dummy weights and the
real ones through the sync). `--make-model DIR` writes that directory (+ a small local
tokenizer) and exits: the e2e script uses it.

Run on the GPU machine:
  PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_bench.py --sections gen,ipc,train --out $OUT/bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN05: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21, "attention_dropout": 0.0,
}


def make_model_dir(path: str, tokenizer: bool = True) -> str:
    """Qwen2.5-0.5B's config (random weights) and a small byte-level BPE tokenizer built here, no hub."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(QWEN05, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": QWEN05["eos_token_id"], "bos_token_id": QWEN05["bos_token_id"]}, f)
    if tokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        corpus = [" ".join(str(i) for i in range(k, k + 50)) + " reverse copy add the = + - ?" for k in range(0, 2000, 50)]
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>")
        fast.save_pretrained(path)
        # the ids of the tokenizer's specials replace Qwen's in the config, so EOS means the same to both
        cfg = dict(QWEN05, eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id, pad_token_id=fast.pad_token_id)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": fast.eos_token_id, "bos_token_id": fast.bos_token_id}, f)
    return path


def gpu_memory() -> list[dict[str, Any]]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.used,memory.total,utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = []
    for line in out.strip().splitlines():
        i, name, used, total, util = [x.strip() for x in line.split(",")]
        rows.append({"gpu": int(i), "name": name, "used_GiB": round(int(used) / 1024, 1), "total_GiB": round(int(total) / 1024, 1), "util_pct": int(util)})
    return rows


def samples_fixed(n_prompts: int, n: int, prompt_len: int, resp_len: int, seed: int) -> list[Any]:
    from asyncpolicy.samples import Prompt, Trajectory, make_sample

    rng = random.Random(seed)
    out = []
    for i in range(n_prompts):
        p = Prompt(index=i, epoch=0, text="", tokens=[rng.randrange(150000) for _ in range(prompt_len)])
        trajs = [
            Trajectory(response_tokens=[rng.randrange(150000) for _ in range(resp_len)], behaviour_logprobs=[-11.9] * resp_len,
                       token_versions=[0] * resp_len, finish_reason="length", reward=rng.random())
            for _ in range(n)
        ]
        out.append(make_sample(p, trajs, 0))
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.R: dict[str, Any] = {"sections": {}, "errors": {}}
        self.gen: Any = None
        self.trainer: Any = None

    def record(self, section: str, **kv: Any) -> None:
        self.R["sections"].setdefault(section, {}).update(kv)
        print(f"[{section}] " + json.dumps(kv), flush=True)

    # -- engines --

    async def start_vllm(self, gpus: list[int], util: float) -> Any:
        from asyncpolicy.engines.vllm_generation import VLLMGenerationEngine, VLLMSettings

        if self.gen is not None:
            return self.gen
        self.gen = VLLMGenerationEngine(VLLMSettings(
            model_path=self.args.model_dir, gpus=gpus, dummy_weights=True, stop_token_ids=[QWEN05["eos_token_id"]],
            max_model_len=2048, gpu_memory_utilization=util, max_num_seqs=256, ignore_eos=True,
            enforce_eager=self.args.eager,
        ))
        await self.gen.start()
        self.record("engine", vllm_start_s=round(self.gen.start_s, 1), vllm_gpus=gpus)
        return self.gen

    async def start_trainer(self, gpus: list[int], mbs: int = 16) -> Any:
        from asyncpolicy.engines import fsdp_worker as w
        from asyncpolicy.engines.fsdp_trainer import FSDPTrainEngine

        base = w.WorkerInit(rank=0, world_size=1, gpu=None, master_port=0, model_path=self.args.model_dir, dtype="float32",
                            gradient_checkpointing=True, lr=1e-6, micro_batch_size=mbs, staleness_correction="decoupled")
        t = FSDPTrainEngine(base, gpus, timeout_s=600)
        t0 = time.perf_counter()
        await t.start()
        self.record(f"trainer_{'_'.join(map(str, gpus))}", start_s=round(time.perf_counter() - t0, 1), params_M=round(t.n_params / 1e6, 1))
        return t

    # -- sections --

    async def gen_batch_engine(self, prompts: list[list[int]], resp_len: int, tag: str) -> tuple[int, float, list[Any]]:
        from asyncpolicy.engines.protocols import GenerationRequest

        async def one(i: int, p: list[int]) -> Any:
            return await self.gen.generate(GenerationRequest(request_id=f"{tag}-{i}", prompt_tokens=p, max_tokens=resp_len))

        t = time.perf_counter()
        outs = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
        dt = time.perf_counter() - t
        return sum(len(o.response_tokens) for o in outs), dt, outs

    async def gen_batch_bare(self, prompts: list[list[int]], resp_len: int, tag: str) -> tuple[int, float]:
        from vllm import SamplingParams, TokensPrompt

        sp = SamplingParams(max_tokens=resp_len, temperature=1.0, logprobs=0, detokenize=False, ignore_eos=True)
        llm = self.gen.llm

        async def one(i: int, p: list[int]) -> int:
            last = None
            async for o in llm.generate(TokensPrompt(prompt_token_ids=p), sp, request_id=f"{tag}-{i}"):
                last = o
            assert last is not None, f"vLLM returned no output for request {tag}-{i}"
            c = last.outputs[0]
            assert len(c.logprobs) == len(c.token_ids)
            return len(c.token_ids)

        t = time.perf_counter()
        toks = sum(await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)]))
        return toks, time.perf_counter() - t

    async def section_gen(self) -> None:
        await self.start_vllm([0], self.args.util)
        rng = random.Random(0)
        prompts = [[rng.randrange(150000) for _ in range(128)] for _ in range(256)]
        await self.gen_batch_bare(prompts[:8], 32, "warm")
        res: dict[str, list[float]] = {"bare": [], "engine": []}
        for rep in range(self.args.gen_reps):  # alternating, same prompts: drift hits both alike
            toks, dt = await self.gen_batch_bare(prompts, 512, f"bare{rep}")
            res["bare"].append(toks / dt)
            toks, dt, outs = await self.gen_batch_engine(prompts, 512, f"eng{rep}")
            res["engine"].append(toks / dt)
        o = outs[0]
        ok = len(o.behaviour_logprobs) == len(o.response_tokens) == 512 and all(lp <= 0 for lp in o.behaviour_logprobs)
        # abort: partial responses come back with finish_reason "abort", then continue to full length
        from asyncpolicy.engines.protocols import GenerationRequest

        async def aborted() -> list[Any]:
            tasks = [self.gen.generate(GenerationRequest(request_id=f"ab{i}", prompt_tokens=p, max_tokens=2000 - 200)) for i, p in enumerate(prompts[:16])]
            fut = asyncio.gather(*tasks)
            await asyncio.sleep(1.0)
            await self.gen.abort_all()
            return await asyncio.wait_for(fut, 30)

        outs_ab = await aborted()
        partial = [len(o.response_tokens) for o in outs_ab]
        reasons = sorted({o.finish_reason for o in outs_ab})
        cont = await self.gen.generate(GenerationRequest(request_id="cont", prompt_tokens=prompts[0], max_tokens=outs_ab[0].response_tokens.__len__() + 16,
                                                         response_tokens=outs_ab[0].response_tokens, behaviour_logprobs=outs_ab[0].behaviour_logprobs,
                                                         token_versions=outs_ab[0].token_versions))
        ratios = sorted(e / b for e, b in zip(res["engine"], res["bare"], strict=True))
        self.record("gen", bare_tok_s=[round(x) for x in res["bare"]], engine_tok_s=[round(x) for x in res["engine"]],
                    engine_over_bare=round(max(res["engine"]) / max(res["bare"]), 3),
                    engine_over_bare_median_pair=round(ratios[len(ratios) // 2], 3), logprobs_ok=ok,
                    abort_reasons=reasons, abort_partial_lens=[min(partial), max(partial)],
                    continued_len=len(cont.response_tokens), continued_finish=cont.finish_reason, gpu=gpu_memory())

    async def sync_checks(self, transport: Any, name: str, reps: int) -> None:
        times, pr, packs = [], [], []
        from asyncpolicy.engines.protocols import GenerationRequest

        for v in range(1, reps + 1):
            await self.trainer.train_step(samples_fixed(2, 2, 16, 16, v), v)  # weights change between syncs
            await transport.push(v)
            last = transport.last
            times.append(round(last.total_s, 4))
            pr.append(round(last.pause_to_resume_s, 4))
            packs.append(round(last.pack_s, 4))
        ck_t = await self.trainer.checksum()
        ck_v = (await self.gen.rpc("ap_checksum"))[0]
        post = await self.gen.generate(GenerationRequest(request_id=f"post-{name}", prompt_tokens=[1, 2, 3, 4], max_tokens=32))
        self.record(name, pause_to_resume_s=pr, pack_s=packs, total_s=times, bytes_GB=round(last.bytes / 1e9, 3),
                    checksum_trainer=ck_t, checksum_vllm=ck_v, checksum_match=abs(ck_t - ck_v) <= 1e-6 * max(1.0, abs(ck_t)),
                    post_sync_tokens=len(post.response_tokens), post_sync_versions=sorted(set(post.token_versions)),
                    engine_version=self.gen.version)

    async def section_ipc(self) -> None:
        from asyncpolicy.engines.weight_sync import IPCTransport

        await self.start_vllm([0], self.args.util)
        if self.trainer is None:
            self.trainer = await self.start_trainer([0])
        await self.sync_checks(IPCTransport(self.gen, self.trainer), "ipc", 6)

    async def train_figures(self, trainer: Any, name: str) -> None:
        batch = samples_fixed(4, 4, 128, 512, 1)  # 16 sequences × 640 tokens, as the baseline
        ms = []
        for step in range(5):
            ms.append(await trainer.train_step(batch, step))
        best = max(ms[1:], key=lambda m: m["perf/train_tokens_per_s"])
        self.record(name, tokens_per_s=round(best["perf/train_tokens_per_s"]), step_s=[round(m["perf/train_step_s"], 3) for m in ms],
                    mfu=round(best["perf/mfu"], 3), peak_mem_GiB=round(best.get("perf/gpu_mem_peak_GB", 0), 1), ranks=trainer.world_size,
                    loss_finite=all(m["losses/loss"] == m["losses/loss"] for m in ms))

    async def section_train(self) -> None:
        if self.trainer is None:
            self.trainer = await self.start_trainer([self.args.trainer_gpu])
        await self.train_figures(self.trainer, "train")

    async def section_nccl(self) -> None:
        from asyncpolicy.engines.weight_sync import NCCLTransport

        await self.start_vllm([0], self.args.util)
        if self.trainer is None:
            self.trainer = await self.start_trainer([1])
        tr = NCCLTransport(self.gen, self.trainer)
        await self.trainer.pack()
        link = await tr.link_seconds(5)
        self.record("nccl_link", init_s=round(tr.init_s, 3), broadcast_1buf_s=round(link, 5),
                    GB_per_s=round(2 * sum(n for *_, n in self.trainer.meta) / link / 1e9, 1))
        await self.sync_checks(tr, "nccl", 6)
        self.nccl = tr

    async def section_fsdp2(self) -> None:
        t = await self.start_trainer([0, 1])
        try:
            await self.train_figures(t, "fsdp2")
        finally:
            await t.aclose()

    async def section_async(self) -> None:
        """Engine-level loop: K steps of (B prompts × n responses of L tokens) with training and sync."""
        from asyncpolicy.engines.protocols import GenerationRequest
        from asyncpolicy.engines.weight_sync import NCCLTransport
        from asyncpolicy.samples import Trajectory, make_sample

        await self.start_vllm([0], self.args.util)
        if self.trainer is None:
            self.trainer = await self.start_trainer([1])
        tr = getattr(self, "nccl", None) or NCCLTransport(self.gen, self.trainer)
        B, n, P, L, K = self.args.async_prompts, 4, 128, self.args.async_len, self.args.async_steps
        rng = random.Random(5)
        from asyncpolicy.samples import Prompt

        async def gen_step(k: int) -> tuple[list[Any], float]:
            t = time.perf_counter()
            prompts = [Prompt(index=i, epoch=k, text="", tokens=[rng.randrange(150000) for _ in range(P)]) for i in range(B)]

            async def group(p: Any) -> Any:
                outs = await asyncio.gather(*[self.gen.generate(GenerationRequest(request_id=f"s{k}-{p.index}-{j}", prompt_tokens=p.tokens, max_tokens=L)) for j in range(n)])
                trajs = [Trajectory(response_tokens=o.response_tokens, behaviour_logprobs=o.behaviour_logprobs, token_versions=o.token_versions,
                                    finish_reason=o.finish_reason, reward=rng.random()) for o in outs]
                return make_sample(p, trajs, self.gen.version)

            return await asyncio.gather(*[group(p) for p in prompts]), time.perf_counter() - t

        version = 100
        await tr.push(version)  # one-time set-up (NCCL group, first pack) must not land in either arm
        # synchronous: generate → train → sync, one after the other
        t0 = time.perf_counter()
        gtimes, ttimes, stimes = [], [], []
        for k in range(K):
            batch, g = await gen_step(k)
            t = time.perf_counter()
            await self.trainer.train_step(batch, version)
            ttimes.append(time.perf_counter() - t)
            version += 1
            t = time.perf_counter()
            await tr.push(version)
            stimes.append(time.perf_counter() - t)
            gtimes.append(g)
        sync_total = time.perf_counter() - t0
        # asynchronous (one step off-policy): generation of batch k+1 runs while batch k trains
        t0 = time.perf_counter()
        batch, _ = await gen_step(100)
        for k in range(K):
            async def train_then_sync(b: list[Any]) -> None:
                nonlocal version
                await self.trainer.train_step(b, version)
                version += 1
            nxt = asyncio.ensure_future(gen_step(101 + k)) if k < K - 1 else None
            await train_then_sync(batch)
            if nxt is not None:
                batch, _ = await nxt
            await tr.push(version)
        async_total = time.perf_counter() - t0
        g, tt, s = sum(gtimes) / K, sum(ttimes) / K, sum(stimes) / K
        # the async loop: first batch generated alone, then K-1 steps of max(gen, train), the last
        # training alone; syncs are never hidden
        ideal_async = g + (K - 1) * max(g, tt) + tt + K * s
        self.record("async", steps=K, tokens_per_step=B * n * L, gen_s=round(g, 2), train_s=round(tt, 2), sync_s=round(s, 3),
                    sync_total_s=round(sync_total, 2), async_total_s=round(async_total, 2),
                    speedup=round(sync_total / async_total, 3), ideal_speedup=round(sync_total / ideal_async, 3),
                    fraction_of_ideal=round(ideal_async / async_total, 3), gpu=gpu_memory())

    async def run(self) -> None:
        for sec in self.args.sections.split(","):
            t = time.perf_counter()
            try:
                await getattr(self, f"section_{sec}")()
            except Exception:
                self.R["errors"][sec] = traceback.format_exc()
                print(f"[{sec}] FAILED\n{self.R['errors'][sec]}", flush=True)
            print(f"[{sec}] took {time.perf_counter() - t:.1f}s", flush=True)
            self.save()
        for eng in (self.trainer, self.gen):
            if eng is not None:
                try:
                    await asyncio.wait_for(eng.aclose(), 60)
                except Exception as e:
                    print("close failed", repr(e), flush=True)

    def save(self) -> None:
        self.R["gpu"] = gpu_memory()
        if self.args.out:
            with open(self.args.out, "w") as f:
                json.dump(self.R, f, indent=1)

    def table(self) -> str:
        s, rows = self.R["sections"], []
        card = (self.R.get("gpu") or [{}])[0].get("name", "?")
        if "gen" in s:
            rows.append(("generation tok/s, bare vLLM / asyncpolicy (256×512, EOS ignored), best; median pair ratio", f"{max(s['gen']['bare_tok_s'])} / {max(s['gen']['engine_tok_s'])} ({s['gen']['engine_over_bare']:.1%}); {s['gen']['engine_over_bare_median_pair']:.1%}"))
        for k in ("ipc", "nccl"):
            if k in s:
                rows.append((f"weight sync {k}, pause→resume s (min / median)", f"{min(s[k]['pause_to_resume_s'])} / {sorted(s[k]['pause_to_resume_s'])[len(s[k]['pause_to_resume_s']) // 2]}; pack {min(s[k]['pack_s'])} s; checksum {s[k]['checksum_match']}"))
        if "nccl_link" in s:
            rows.append(("NCCL link: one broadcast of the flat buffer", f"{s['nccl_link']['broadcast_1buf_s']} s ({s['nccl_link']['GB_per_s']} GB/s)"))
        for k in ("train", "fsdp2"):
            if k in s:
                rows.append((f"trainer {k} ({s[k]['ranks']} rank(s)) 16×640 tok", f"{s[k]['tokens_per_s']} tok/s, MFU {s[k]['mfu']}, peak {s[k]['peak_mem_GiB']} GiB"))
        if "async" in s:
            a = s["async"]
            rows.append(("async vs sync", f"{a['speedup']}× (ideal {a['ideal_speedup']}×, {a['fraction_of_ideal']:.0%} of ideal); gen {a['gen_s']} s, train {a['train_s']} s, sync {a['sync_s']} s"))
        out = [f"card: {card}"] + [f"| {k} | {v} |" for k, v in rows]
        if self.R["errors"]:
            out.append("FAILED sections: " + ", ".join(self.R["errors"]))
        return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/qwen05-shape")
    ap.add_argument("--make-model", metavar="DIR", help="write the Qwen2.5-0.5B-shaped model dir (+ tokenizer) and exit")
    ap.add_argument("--sections", default="gen,ipc,train")
    ap.add_argument("--util", type=float, default=0.35, help="vLLM gpu_memory_utilization")
    ap.add_argument("--trainer-gpu", type=int, default=0)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--gen-reps", type=int, default=2)
    ap.add_argument("--async-prompts", type=int, default=32)
    ap.add_argument("--async-len", type=int, default=512)
    ap.add_argument("--async-steps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.make_model:
        make_model_dir(args.make_model, tokenizer=True)
        print("model dir", args.make_model)
        return
    make_model_dir(args.model_dir, tokenizer=False)
    b = Bench(args)
    try:
        asyncio.run(b.run())
    finally:
        b.save()
        print("RESULT " + json.dumps(b.R["sections"]), flush=True)
        print(b.table(), flush=True)
    sys.exit(1 if b.R["errors"] else 0)


if __name__ == "__main__":
    main()
