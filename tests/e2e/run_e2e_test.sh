#!/usr/bin/env bash
# The seed's GPU end-to-end test: vLLM rollout + FSDP2 trainer; exit 0 = passed.
#   MODE        smoke (default): STEPS training steps of a Qwen2.5-0.5B-shaped model, checks that
#               weights were synced and served;
#               learn: proof of learning: STEPS (default 400) steps of the embedded tiny model on
#               the task `reverse` with the CPU default run's settings; the training reward's last
#               tenth must be at least 2x its first
#   NUM_GPUS    GPUs to use (default 4: half rollout, half trainer; 1 = colocated on one GPU)
#   MODEL_ID    name of the model (default Qwen/Qwen2.5-0.5B-Instruct); only labels the run here
#   MODEL_PATH  smoke mode: local Hugging Face model dir; unset = build one of Qwen2.5-0.5B's shape
#               with random weights (config + a small tokenizer made locally: no hub)
#   STEPS       training steps (default 4, or 400 in learn mode); extra arguments are passed on as
#               config overrides
# With no GPU it says so and exits 0 (skipped).
set -euo pipefail
MODE=${MODE:-smoke}
NUM_GPUS=${NUM_GPUS:-4}
MODEL_ID=${MODEL_ID:-Qwen/Qwen2.5-0.5B-Instruct}
MODEL_PATH=${MODEL_PATH:-}
case "$MODE" in
    smoke) STEPS=${STEPS:-4} ;;
    learn) STEPS=${STEPS:-400} ;;
    *)
        echo "run_e2e_test.sh: MODE=$MODE: choose smoke or learn" >&2
        exit 2
        ;;
esac
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}

visible=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${visible:-0}" -eq 0 ]; then
    echo "run_e2e_test.sh: no GPU visible (nvidia-smi found none): skipped"
    exit 0
fi
if [ "$visible" -lt "$NUM_GPUS" ]; then
    echo "run_e2e_test.sh: NUM_GPUS=$NUM_GPUS but only $visible GPU(s) visible" >&2
    exit 1
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
export VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "$MODE" = learn ]; then
    # the embedded model is built (once) and saved in Hugging Face format; vLLM loads that directory.
    # Batch, lengths, learning rate and staleness stay the CPU default run's, which learns in 400 steps.
    MODEL_ID=embedded
    MODEL_PATH=embedded
    SETTINGS=(model.dtype=float32)
else
    if [ -z "$MODEL_PATH" ]; then
        MODEL_PATH=${TMPDIR:-/tmp}/asyncpolicy-e2e-$(echo "$MODEL_ID" | tr '/' '_')-random
        "$PY" -m asyncpolicy bench gpu --make-model "$MODEL_PATH"
    fi
    SETTINGS=(
        model.dtype=float32 model.gradient_checkpointing=true
        trainer.lr=1e-6 trainer.warmup_steps=0 trainer.micro_batch_size=16
        data.train_batch_size=16 rollout.n=4 data.max_prompt_length=64 data.max_response_length=128
        async_training.staleness_threshold=1 async_training.max_queue_size=64
    )
fi
if [ "$NUM_GPUS" -ge 2 ]; then
    ROLLOUT=$((NUM_GPUS / 2)); TRAINER=$((NUM_GPUS - ROLLOUT)); COLOCATE=false
else
    ROLLOUT=1; TRAINER=1; COLOCATE=true
fi
OUT_DIR=${OUT_DIR:-${TMPDIR:-/tmp}/asyncpolicy-e2e-run}
rm -rf "$OUT_DIR"
echo "e2e ($MODE): $MODEL_ID from $MODEL_PATH, rollout GPUs $ROLLOUT, trainer GPUs $TRAINER, colocate=$COLOCATE, $STEPS steps"
"$PY" -m asyncpolicy run \
    rollout.engine=vllm trainer.engine=fsdp model.path="$MODEL_PATH" \
    rollout.n_gpus_per_node=$ROLLOUT trainer.n_gpus_per_node=$TRAINER rollout.colocate=$COLOCATE \
    rollout.gpu_memory_utilization=0.4 "${SETTINGS[@]}" \
    trainer.total_training_steps="$STEPS" output_dir="$OUT_DIR" seed=0 "$@"

"$PY" - "$OUT_DIR/metrics.jsonl" "$STEPS" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r for r in rows if "step" in r and "param_version" in r]
want = int(sys.argv[2])
assert len(steps) >= want, f"{len(steps)} step lines in metrics.jsonl, expected {want}"
syncs = [r["sync_latency_s"] for r in steps if r.get("sync_latency_s") is not None]
assert syncs, "no weight sync was recorded"
assert steps[-1]["rollout_version"] >= 1, "the rollout never served trained weights"
print(f"e2e passed: {len(steps)} steps, {len(syncs)} syncs, sync latency min {min(syncs):.4f} s, "
      f"max staleness {steps[-1]['staleness_max']}, train tok/s {steps[-1].get('perf/train_tokens_per_s', 0):.0f}")
PYEOF

if [ "$MODE" = learn ]; then
    "$PY" - "$OUT_DIR" <<'PYEOF'
import sys
from asyncpolicy.bench.learning import reward_rise
rise = reward_rise(sys.argv[1], factor=2.0)
print(f"e2e learning: {rise.describe()}")
sys.exit(0 if rise.learned else 1)
PYEOF
fi
