"""Where a weight sync's time goes on the GPU path: one short training run, then a table.

Runs `python -m asyncpolicy run` with vLLM + FSDP on the embedded model (colocated on one GPU by
default, NUM_GPUS=2 for disjoint GPUs) at log level debug, then splits every sync from its events:
rollout pause (abort/drain of in-flight generations), engine pause, transfer + load, prefix-cache
reset, engine resume. Usage on a GPU machine:

    python benchmarks/gpu_sync_probe.py [STEPS] [key=value ...]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from asyncpolicy.bench.common import read_metrics


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str]) -> int:
    steps = int(argv[0]) if argv and argv[0].isdigit() else 40
    extra = [a for a in argv if "=" in a]
    gpus = int(os.environ.get("NUM_GPUS", "1"))
    from asyncpolicy.models.tiny import ensure_embedded

    model = ensure_embedded()
    out = Path(tempfile.mkdtemp(prefix="sync-probe-"))
    layout = ["rollout.n_gpus_per_node=1", "trainer.n_gpus_per_node=1", f"rollout.colocate={str(gpus == 1).lower()}"]
    cmd = [
        sys.executable, "-m", "asyncpolicy", "run",
        "rollout.engine=vllm", "trainer.engine=fsdp", f"model.path={model}",
        *layout, "rollout.gpu_memory_utilization=0.3",
        f"trainer.total_training_steps={steps}", f"output_dir={out}", "log_level=debug", *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    pushes = [e for e in events if e.get("event") == "weights_pushed"][1:]  # the first pays one-off set-up
    syncs = [e for e in events if e.get("event") == "weights_synced"][1:]
    rows = read_metrics(out)
    print(f"\nrc={rc} wall={wall:.1f}s steps={len(rows)} gpus={gpus} syncs={len(syncs)} out={out}")
    print(f"{'part of a sync':<30}{'median s':>10}{'max s':>10}")
    for label, src, key in [
        ("stage (pack, rollout runs)", syncs, "stage_s"),
        ("rollout pause (stop gens)", syncs, "rollout_pause_s"),
        ("  engine pause", pushes, "engine_pause_s"),
        ("  transfer + load", pushes, "transfer_load_s"),
        ("  engine resume", pushes, "resume_s"),
        ("  pause_to_resume", pushes, "pause_to_resume_s"),
        ("rollout stopped (pause_s)", syncs, "pause_s"),
        ("whole sync (latency)", syncs, "latency_s"),
        ("train step (perf)", rows, "perf/train_step_s"),
    ]:
        xs = [float(e[key]) for e in src if e.get(key) is not None]
        print(f"{label:<30}{_median(xs):>10.4f}{max(xs, default=float('nan')):>10.4f}")
    stamps = [e["timestamp"] for e in events if e.get("event") == "step"]
    steady = float("nan")
    if len(stamps) >= 4:
        from datetime import datetime

        half = [datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() for t in stamps[len(stamps) // 2 :]]
        steady = (len(half) - 1) / max(1e-9, half[-1] - half[0])
    print(f"{'steps/s, second half':<30}{steady:>10.2f}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
