#!/usr/bin/env bash
# The seed's `./run_benchmark.sh`, asyncpolicy's form: the CPU suites always, the GPU sections when
# there are GPUs. Writes benchmark_results_<time>/ in the current directory.
#
#   ./benchmarks/run_benchmark.sh                      # all CPU suites (< 15 min on 2 cores)
#   QUICK=1 ./benchmarks/run_benchmark.sh              # --quick sizes (< 3 min)
#   ./benchmarks/run_benchmark.sh sweep channel        # named suites; key=value words are config overrides
#   NUM_GPUS=8 ACTOR_STRATEGY=fsdp2 ./benchmarks/run_benchmark.sh
#
# NUM_GPUS        GPUs to use (default: as many as nvidia-smi lists; 0 without a GPU)
# ACTOR_STRATEGY  the seed's trainer backend name: fsdp2 (default) or fsdp, both asyncpolicy's FSDP2 trainer
# QUICK           1 = pass --quick
# PYTHON          interpreter (default: python3)
set -euo pipefail

PYTHON="${PYTHON:-python3}"
if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
fi
ACTOR_STRATEGY="${ACTOR_STRATEGY:-fsdp2}"
case "$ACTOR_STRATEGY" in
    fsdp2 | fsdp) ;;
    *)
        echo "run_benchmark.sh: ACTOR_STRATEGY=$ACTOR_STRATEGY is not supported; asyncpolicy's GPU trainer is FSDP2 (fsdp2 or fsdp)" >&2
        exit 2
        ;;
esac
quick=()
if [[ "${QUICK:-0}" == 1 ]]; then quick=(--quick); fi

echo "run_benchmark.sh: NUM_GPUS=$NUM_GPUS ACTOR_STRATEGY=$ACTOR_STRATEGY; CPU suites first" >&2
status=0
# `--` lets options through the top-level parser (its REMAINDER argument stops at a leading option)
"$PYTHON" -m asyncpolicy bench -- "${quick[@]}" "$@" || status=$?
results="$(ls -td benchmark_results_*/ 2>/dev/null | head -n 1)"

if [[ "$NUM_GPUS" -gt 0 ]]; then
    sections="gen,ipc,train,async"
    if [[ "$NUM_GPUS" -ge 2 ]]; then sections="gen,ipc,train,nccl,fsdp2,async"; fi
    echo "run_benchmark.sh: GPU sections ($sections) with python -m asyncpolicy bench gpu" >&2
    gpu_out="${results:-benchmark_results_gpu}"
    mkdir -p "$gpu_out"
    "$PYTHON" -m asyncpolicy bench gpu --sections "$sections" --out-dir "$gpu_out" \
        2>&1 | tee "$gpu_out/gpu_bench.log" || status=$?
else
    echo "run_benchmark.sh: no GPU (NUM_GPUS=0): the GPU sections (vLLM generation, weight sync, FSDP2 training) are skipped" >&2
    if [[ -n "$results" ]]; then
        echo "gpu: skipped: no GPU on this machine (NUM_GPUS=0)" >>"$results/summary.txt"
    fi
fi
echo "run_benchmark.sh: results in ${results:-<none>}" >&2
exit "$status"
