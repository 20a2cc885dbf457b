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

SECTION_NAMES = ("gen", "ipc", "nccl", "train", "fsdp2", "async", "learn")
VLLM_SECTIONS = {"gen", "ipc", "nccl", "async", "learn"}  # train and fsdp2 need only torch

# The learn section's GRPO run: SmolLM2-135M-Instruct on arith level 1 (one-step +/- stories), as measured
# on one H200 (benchmarks/RESULTS.md: held-out 20 % → 84 % in 150 s on-policy): 32 prompts × 8 responses a
# step; 128-token responses (the base model answers in ~75; longer ones are cut, unscored, and it learns to
# be brief); LR 1e-5 constant (3e-6 moved a 135M model too slowly for a budget of minutes); a greedy
# validation of 128 held-out problems every 10 steps (seconds on vLLM; move it with trainer.test_freq=).
# The budget, not the step count, ends each arm. Overridable: `bench gpu --sections learn key=value ...`.
LEARN_RUN = (
    "task.name=arith", "task.difficulty=1", "task.num_val_prompts=128",
    "data.train_batch_size=32", "rollout.n=8", "data.max_prompt_length=256", "data.max_response_length=128",
    "trainer.lr=1e-5", "trainer.warmup_steps=0", "trainer.lr_schedule=constant", "algorithm.adv_estimator=grpo",
    "trainer.test_freq=10", "rollout.val_temperature=0", "rollout.max_concurrency=512",
    "async_training.max_queue_size=128", "async_training.trigger_parameter_sync_step=1",
    "trainer.total_training_steps=1000000", "seed=0", "progress=off",
)


class LearnArmSpec(msgspec.Struct, frozen=True):
    """One arm of the learn section: a name (its log's and run's) and the config words it adds over the
    shared run (`LEARN_RUN` ← the user's words): a staleness, `async_training.autotune=true`, another task."""

    name: str
    words: list[str]


def staleness_arms(thresholds: list[int]) -> list[LearnArmSpec]:
    """`--learn-staleness 0,1,2`: an arm per staleness threshold, named `staleness_N`."""
    return [LearnArmSpec(f"staleness_{t}", [f"async_training.staleness_threshold={t}"]) for t in thresholds]


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
    async_in_flight: bool = False  # also run the overlapped case with async_training.in_flight_updates (no abort at a sync)
    learn_model: str = "smollm2-135m-instruct"  # model.path of the learn section
    learn_budget_s: float = 600.0  # seconds of training per arm (from its first step's start); then a graceful stop
    learn_gpus: int = 1  # 1: vLLM and the trainer share GPU 0 (CUDA IPC); 2: GPU 0 and GPU 1 (NCCL)
    # the arms, one after another; the first one's final accuracy is the target every arm's time is read against
    learn_arms: list[LearnArmSpec] = msgspec.field(default_factory=lambda: staleness_arms([0, 1, 2]))
    learn_overrides: list[str] = msgspec.field(default_factory=list)  # key=value words: over LEARN_RUN, under each arm's words
    learn_start_s: float = 600.0  # an arm's allowance to start (engines, first sync) within its hard bound
    learn_stop_s: float = 300.0  # and to stop after its budget (the step in progress, the checkpoint, closing engines)


def cpu_settings(model_dir: str, sections: list[str] | None = None) -> GPUBenchSettings:
    """Tiny sizes for `CPUPlumbing`: every section in well under a minute on 2 cores."""
    return GPUBenchSettings(
        model_dir=model_dir, sections=list(sections or SECTION_NAMES), gen_prompts=8, gen_prompt_len=4, gen_len=12,
        gen_reps=1, abort_len=64, abort_after_s=0.02, sync_reps=2, train_seqs=[4, 8], train_n=2, train_prompt_len=4,
        train_len=6, train_len_min=2, train_steps=2, train_packing=[False, True], train_compile=[False], train_max_tokens=24,
        micro_batch_size=4,  # compile: a minute per variant on a CPU, in the slow test
        async_prompts=2, async_n=2, async_len=6,
        async_steps=WARMUP + 3, async_staleness=1, async_in_flight=True,
        learn_budget_s=2.0, learn_overrides=list(CPU_LEARN_RUN),
    )


# The learn section on the CPU stand-ins: a few steps of two-prompt batches, validation every other step.
CPU_LEARN_RUN = (
    "data.train_batch_size=2", "rollout.n=2", "data.max_response_length=4", "task.num_val_prompts=2", "trainer.test_freq=2",
    "rollout.max_concurrency=8", "async_training.max_queue_size=8",
)

