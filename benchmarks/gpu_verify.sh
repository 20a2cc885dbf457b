#!/usr/bin/env bash
# The GPU path as a user runs it, on one GPU (colocated vLLM + FSDP2, embedded model), then a table:
#   1. learning: tests/e2e/run_e2e_test.sh MODE=learn (400 steps; last tenth of reward >= 2x the first)
#   2. Ctrl-C: SIGINT to the whole process group mid-run -> exit 130, a stop checkpoint, no process left
#   3. export: the stop checkpoint's model exported, then loaded by transformers and by vLLM
# Needs vLLM importable (see docs/gpu-device.md in the shared docs for the lent machine). Usage:
#   [SKIP_LEARN=1] bash benchmarks/gpu_verify.sh
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0} VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
WORK=${TMPDIR:-/tmp}/asyncpolicy-gpu-verify
rm -rf "$WORK"; mkdir -p "$WORK"
declare -a ROWS
rates() {  # steps/s over the run's second half, sync pause, trainer/engine logprob mismatch
    "$PY" - "$1" <<'EOF'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda xs: statistics.median(xs) if xs else float("nan")
pause = [r["sync_pause_s"] for r in rows if r.get("sync_pause_s") is not None]
mkl = [r["is/mismatch_kl"] for r in rows if r.get("is/mismatch_kl") is not None]
idle = [r["trainer_idle_ratio"] for r in rows]
step_s = [r["perf/train_step_s"] for r in rows[len(rows) // 2 :] if r.get("perf/train_step_s")]
print(f"steps/s {rows[-1]['steps_per_s']:.2f} (whole run); train step median {med(step_s):.3f} s; "
      f"trainer idle {idle[-1]:.2f}; sync_pause_s median {med(pause):.4f} max {max(pause, default=float('nan')):.4f}; "
      f"is/mismatch_kl median {med(mkl):.2e} ({len(mkl)} steps)")
EOF
}


# 1. learning (SKIP_LEARN=1 leaves it out)
if [ -z "${SKIP_LEARN:-}" ]; then
t0=$(date +%s)
OUT_DIR=$WORK/learn MODE=learn NUM_GPUS=1 bash tests/e2e/run_e2e_test.sh >"$WORK/learn.log" 2>&1
rc=$?
ROWS+=("learn (400 steps, 1 GPU)|rc=$rc|$(($(date +%s) - t0)) s|$(grep -h 'e2e learning:' "$WORK/learn.log" | tail -1)")
ROWS+=("learn: rates|||$(rates "$WORK/learn/metrics.jsonl")")

fi

# 2. Ctrl-C to the whole process group
RUN=$WORK/sigint
setsid "$PY" -m asyncpolicy run rollout.engine=vllm trainer.engine=fsdp model.path=embedded \
    rollout.n_gpus_per_node=1 trainer.n_gpus_per_node=1 rollout.colocate=true rollout.gpu_memory_utilization=0.3 \
    model.dtype=float32 trainer.total_training_steps=5000 output_dir="$RUN" >"$WORK/sigint.log" 2>&1 &
pid=$!
for _ in $(seq 1 240); do
    [ -f "$RUN/metrics.jsonl" ] && [ "$(wc -l <"$RUN/metrics.jsonl")" -ge 30 ] && break
    sleep 1
done
steps_before=$(wc -l <"$RUN/metrics.jsonl" 2>/dev/null || echo 0)
t0=$(date +%s%N)
kill -INT -- "-$pid"
wait "$pid"; rc=$?
stop_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
sleep 6  # vLLM's own shutdown grace period, then nothing of the group may be left
left=$(pgrep -g "$pid" | wc -l)
ckpt=$(ls -d "$RUN"/checkpoints/step-* 2>/dev/null | tail -1)
ROWS+=("run before Ctrl-C: rates|||$(rates "$RUN/metrics.jsonl")")
ROWS+=("Ctrl-C at step $steps_before|rc=$rc (want 130)|${stop_ms} ms|stop checkpoint: ${ckpt:-none}; processes left: $left")

# 3. export and load
t0=$(date +%s)
"$PY" -m asyncpolicy export "$RUN" "$WORK/exported" >"$WORK/export.log" 2>&1
rc=$?
# the loader's output goes to a file: vLLM's engine-core process may outlive the loader for its
# shutdown grace period, and must not hold a pipe this script waits on
timeout 300 "$PY" - "$WORK/exported" >"$WORK/load.out" 2>>"$WORK/export.log" <<'EOF'
import sys
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1])
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], gpu_memory_utilization=0.2, enforce_eager=True, max_model_len=256)
out = llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=8, temperature=0))
print(f"transformers ok; vLLM generated {len(out[0].outputs[0].token_ids)} tokens", flush=True)
EOF
load=$(head -1 "$WORK/load.out")
ROWS+=("export + load|rc=$rc|$(($(date +%s) - t0)) s|${load:-load failed (see export.log)}")

echo
printf '%-28s %-18s %-8s %s\n' "check" "result" "time" "detail"
for r in "${ROWS[@]}"; do
    IFS='|' read -r a b c d <<<"$r"
    printf '%-28s %-18s %-8s %s\n' "$a" "$b" "$c" "$d"
done
