"""What `bench gpu` runs: the section names, every section's sizes (`GPUBenchSettings`: the recorded
GPU figures' by default, `cpu_settings`: tiny, for the CPU plumbing test) and the trainers' settings."""

from __future__ import annotations

import msgspec

from asyncpolicy.bench.common import WARMUP

# The bench's trainers: fp32 master weights, an LR small enough that random weights stay sane, decoupled PPO.
TRAINER_OVERRIDES = (
    "model.dtype=float32", "model.gradient_checkpointing=true", "trainer.lr=1e-6", "trainer.warmup_steps=0",
    "algorithm.staleness_correction=decoupled",
)

SECTION_NAMES = ("gen", "ipc", "nccl", "train", "fsdp2", "async")
VLLM_SECTIONS = {"gen", "ipc", "nccl", "async"}  # train and fsdp2 need only torch


class GPUBenchSettings(msgspec.Struct, kw_only=True):
    """Sizes of every section; the defaults are the recorded GPU figures' (benchmarks/RESULTS.md)."""

    model_dir: str = "/tmp/qwen05-shape"
    sections: list[str] = msgspec.field(default_factory=lambda: ["gen", "ipc", "train"])
    util: float = 0.35  # vLLM gpu_memory_utilization
    trainer_gpu: int = 0  # the `train` section's GPU
    eager: bool = False  # vLLM without CUDA graphs
    gen_prompts: int = 256
    gen_prompt_len: int = 128
    gen_len: int = 512
    gen_reps: int = 2  # alternating bare / engine pairs: drift hits both alike
    abort_len: int = 1800  # responses long enough to be running when abort_all comes
    abort_after_s: float = 1.0
    sync_reps: int = 6
    train_seqs: list[int] = msgspec.field(default_factory=lambda: [16, 64, 256])  # sequences per step, rollout.n = train_n
    train_n: int = 4
    train_prompt_len: int = 128
    train_len: int = 512
    train_len_min: int = 0  # > 0: response lengths uniform in [train_len_min, train_len] (packing's case); 0 = all train_len
    train_steps: int = 5
    # the fastest layout measured on one H200 within the memory of the old one (RESULTS.md); sdpa packing is slower
    train_packing: list[bool] = msgspec.field(default_factory=lambda: [False])
    train_compile: list[bool] = msgspec.field(default_factory=lambda: [True])
    train_max_tokens: int = 16384  # trainer.max_tokens_per_micro_batch; 0 = micro_batch_size sequences (the first trainer's)
    train_recompute: bool = False  # model.gradient_checkpointing
    train_attn: str = "sdpa"  # trainer.attn_implementation: packed rows want flash_attention_2 (varlen) or flex_attention
    micro_batch_size: int = 16
    async_prompts: int = 32  # data.train_batch_size of the supervised runs
    async_n: int = 4
    async_len: int = 512  # data.max_response_length
    async_steps: int = 8
    async_staleness: int = 1


def cpu_settings(model_dir: str, sections: list[str] | None = None) -> GPUBenchSettings:
    """Tiny sizes for `CPUPlumbing`: every section in well under a minute on 2 cores."""
    return GPUBenchSettings(
        model_dir=model_dir, sections=list(sections or SECTION_NAMES), gen_prompts=8, gen_prompt_len=4, gen_len=12,
        gen_reps=1, abort_len=64, abort_after_s=0.02, sync_reps=2, train_seqs=[4, 8], train_n=2, train_prompt_len=4,
        train_len=6, train_len_min=2, train_steps=2, train_packing=[False, True], train_compile=[False], train_max_tokens=24,
        micro_batch_size=4,  # compile: a minute per variant on a CPU, in the slow test
        async_prompts=2, async_n=2, async_len=6,
        async_steps=WARMUP + 3, async_staleness=1,
    )

