#!/usr/bin/env bash
# The GPU path as a user runs it, on one GPU (colocated vLLM + FSDP2, embedded model), then a table:
#   1. learning: tests/e2e/run_e2e_test.sh MODE=learn (400 steps; last tenth of reward >= 2x the first)
#   2. Ctrl-C: SIGINT to the whole process group mid-run -> exit 130, a stop checkpoint, no process left
#   3. export: the stop checkpoint's model exported, then loaded by transformers and by vLLM
# Needs vLLM importable (see docs/gpu-device.md in the shared docs for the lent machine). Usage:
#   [SKIP_LEARN=1] [BUDGET_S=540] bash benchmarks/gpu_verify.sh
#
# The table is printed on every way out, from the steps that finished: every step runs in its own
# process group under `timeout --kill-after`, bounded by its own limit and by what is left of
# BUDGET_S, and whatever it leaves behind (vLLM's engine core) is killed with it; a step that fails,
# runs out of time or gets no time is a row saying so. Exit 0 only if every step passed.
#
# SKIP_LEARN=1       leave out step 1
# BUDGET_S           the whole script's seconds (default 540: it ends, table printed, within a 9-minute call)
# LEARN_S RUN_S EXPORT_S LOAD_S VLLM_LOAD_S   each step's own limit (defaults 300 240 120 120 240)
# KILL_AFTER_S       from a step's SIGTERM at its limit to SIGKILL (default 10: vLLM's engine core
#                    blocks SIGTERM for its shutdown grace period)
# STOP_AFTER         training steps before the Ctrl-C (default 30)
# RUN_ENGINES        step 2's engine and placement overrides (default: vLLM + FSDP colocated on GPU 0;
#                    the CPU test of this script's plumbing passes "rollout.engine=hf trainer.engine=torch")
# PYTHON             interpreter (default: python3)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0} VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-540}
STOP_AFTER=${STOP_AFTER:-30}
RUN_ENGINES=${RUN_ENGINES:-"rollout.engine=vllm trainer.engine=fsdp rollout.n_gpus_per_node=1 trainer.n_gpus_per_node=1 rollout.colocate=true rollout.gpu_memory_utilization=0.3"}
KILL_AFTER_S=${KILL_AFTER_S:-10}
MARGIN_S=$((KILL_AFTER_S + 5))  # kept back from every step for the kill and the table
WORK=${TMPDIR:-/tmp}/asyncpolicy-gpu-verify
rm -rf "$WORK"; mkdir -p "$WORK"
START=$(date +%s)
declare -a ROWS
CURRENT=""  # process group of the step running now: killed if the script is stopped
PRINTED=""
FAILED=0

row() {  # check | result | time | detail
    ROWS+=("$1|$2|$3|$4")
    case "$2" in ok* | "") ;; *) FAILED=1 ;; esac
}

print_table() {
    [ -n "$PRINTED" ] && return
    PRINTED=1
    {
        echo
        printf '%-28s %-22s %-8s %s\n' "check" "result" "time" "detail"
        for r in "${ROWS[@]}"; do
            IFS='|' read -r a b c d <<<"$r"
            printf '%-28s %-22s %-8s %s\n' "$a" "$b" "$c" "$d"
        done
    } | tee "$WORK/table.txt"
}

on_exit() {
    if [ -n "$CURRENT" ]; then
        kill -KILL -- "-$CURRENT" 2>/dev/null
        row "$CURRENT_NAME" "interrupted" "" "the script was stopped while this step ran"
    fi
    print_table
}
trap on_exit EXIT
trap 'exit 130' INT TERM HUP

left() {  # seconds a step may take now: its own limit, capped by what is left of the budget
    local own=$1 rest=$((BUDGET_S - ($(date +%s) - START) - MARGIN_S))
    echo $((own < rest ? own : rest))
}

verdict() {  # rc of `timeout` -> result column
    case "$1" in
        0) echo "ok" ;;
        124 | 137) echo "TIMED OUT ($2 s)" ;;
        *) echo "failed (rc=$1)" ;;
    esac
}

# step NAME LIMIT_S LOG CMD...: run CMD in its own process group, bounded; sets RC (-1: no time
# left to run it), SECS and LIMIT
step() {
    local name=$1 limit log=$3
    limit=$(left "$2")
    shift 3
    LIMIT=$limit SECS=""
    if [ "$limit" -lt 1 ]; then
        RC=-1
        return
    fi
    local t0=$(date +%s)
    CURRENT_NAME=$name
    # timeout makes itself the leader of a new process group, and signals all of it at the deadline
    timeout --kill-after="$KILL_AFTER_S" "$limit" "$@" >"$log" 2>&1 </dev/null &
    CURRENT=$!
    wait "$CURRENT" 2>/dev/null  # (not bash's "Killed" notice: timeout's group kill takes timeout too)
    RC=$?
    kill -KILL -- "-$CURRENT" 2>/dev/null  # what outlived the command (an orphaned engine core)
    CURRENT=""
    SECS=$(($(date +%s) - t0))
}

result() {  # the result column of the last step
    if [ "$RC" -eq -1 ]; then echo "SKIPPED (no time left)"; else verdict "$RC" "$LIMIT"; fi
}

rates() {  # steps/s over the run's second half, sync pause, trainer/engine logprob mismatch
    timeout 60 "$PY" - "$1" <<'EOF' 2>/dev/null || echo "(no metrics)"
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
    step learn "${LEARN_S:-300}" "$WORK/learn.log" env OUT_DIR="$WORK/learn" MODE=learn NUM_GPUS=1 bash tests/e2e/run_e2e_test.sh
    row "learn (400 steps, 1 GPU)" "$(result)" "${SECS:+$SECS s}" "$(grep -h 'e2e learning:' "$WORK/learn.log" 2>/dev/null | tail -1)"
    row "learn: rates" "" "" "$(rates "$WORK/learn/metrics.jsonl")"
fi

# 2. Ctrl-C to the whole process group: the run has its own session, as a terminal's foreground job
RUN=$WORK/sigint
limit=$(left "${RUN_S:-240}")
if [ "$limit" -lt 1 ]; then
    row "Ctrl-C" "SKIPPED (no time left)" "" ""
else
    deadline=$(($(date +%s) + limit))
    stop_at=$((deadline - (limit > 240 ? 60 : limit / 4)))  # the rest of the limit is the stop's
    # shellcheck disable=SC2086  # RUN_ENGINES is a list of words
    setsid "$PY" -m asyncpolicy run $RUN_ENGINES model.path=embedded model.dtype=float32 \
        trainer.total_training_steps=5000 output_dir="$RUN" >"$WORK/sigint.log" 2>&1 </dev/null &
    pid=$!
    CURRENT=$pid CURRENT_NAME="Ctrl-C"
    steps_before=0
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$stop_at" ]; do
        steps_before=$(wc -l 2>/dev/null <"$RUN/metrics.jsonl" || echo 0)
        [ "$steps_before" -ge "$STOP_AFTER" ] && break
        sleep 1
    done
    t0=$(date +%s%N)
    kill -INT -- "-$pid" 2>/dev/null
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
    stop_ms=$((($(date +%s%N) - t0) / 1000000))
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null
        wait "$pid"
        res="TIMED OUT ($limit s)"
    else
        wait "$pid"
        rc=$?
        res="rc=$rc (want 130)"
        [ "$rc" -eq 130 ] && res="ok: $res"
    fi
    # vLLM's own shutdown grace period, then nothing of the group may be left
    grace=$((deadline - $(date +%s)))
    sleep $((grace < 6 ? (grace > 0 ? grace : 0) : 6))
    left_procs=$(pgrep -g "$pid" | wc -l)
    kill -KILL -- "-$pid" 2>/dev/null
    CURRENT=""
    [ "$left_procs" -eq 0 ] || res="$res; $left_procs left"
    ckpt=$(ls -d "$RUN"/checkpoints/step-* 2>/dev/null | tail -1)
    row "run before Ctrl-C: rates" "" "" "$(rates "$RUN/metrics.jsonl")"
    row "Ctrl-C at step $steps_before" "$res" "${stop_ms} ms" "stop checkpoint: ${ckpt:-none}; processes left: $left_procs"
fi

# 3. export, then loads of it: each loader a child process ending itself once it has answered
# (vLLM's engine core may outlive it; the step's process group goes with it)
step export "${EXPORT_S:-120}" "$WORK/export.log" "$PY" -m asyncpolicy export "$RUN" "$WORK/exported"
row "export" "$(result)" "${SECS:+$SECS s}" "$(tail -1 "$WORK/export.log" 2>/dev/null)"

cat >"$WORK/load_transformers.py" <<'EOF'
import os, sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(f"transformers loaded {sum(p.numel() for p in model.parameters())} parameters", flush=True)
os._exit(0)
EOF
step "load: transformers" "${LOAD_S:-120}" "$WORK/load_transformers.log" "$PY" "$WORK/load_transformers.py" "$WORK/exported"
row "load: transformers" "$(result)" "${SECS:+$SECS s}" "$(grep -h 'transformers loaded' "$WORK/load_transformers.log" 2>/dev/null | tail -1)"

cat >"$WORK/load_vllm.py" <<'EOF'
import os, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], gpu_memory_utilization=0.2, enforce_eager=True, max_model_len=256)
out = llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=8, temperature=0))
print(f"vLLM generated {len(out[0].outputs[0].token_ids)} tokens", flush=True)
os._exit(0)  # LLM's shutdown has kept the process alive past the caller's limit: nothing is left to save
EOF
step "load: vLLM" "${VLLM_LOAD_S:-240}" "$WORK/load_vllm.log" "$PY" "$WORK/load_vllm.py" "$WORK/exported"
row "load: vLLM" "$(result)" "${SECS:+$SECS s}" "$(grep -h 'vLLM generated' "$WORK/load_vllm.log" 2>/dev/null | tail -1)"

print_table
echo "logs: $WORK"
exit "$FAILED"
