"""The cost of the multi-node relay on one machine: 1 node × 2 ranks against 2 nodes × 1 rank (gloo, CPU).

Same model (the embedded one), same batches; per layout the median time of a no-op command round
trip (Checksum of the tiny model: the relay's latency) and of a training step. Node 1 is a
`python -m asyncpolicy trainer-node` process; the layout is `asyncpolicy.bench.multinode`'s, the one
tests/unit/test_multinode_cpu.py holds equal.

    python benchmarks/multinode_cpu.py [repeats]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from asyncpolicy.bench.multinode import CPU_FSDP, LAYOUT_TRAIN, layout_batch, two_node_overrides
from asyncpolicy.config import load_config
from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.models.tiny import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


async def measure(eng: FSDPTrainEngine, repeats: int) -> tuple[float, float]:
    await eng.start()
    try:
        await eng.train_step(layout_batch(0), 0)  # warm-up
        calls, steps = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            await eng.checksum()
            calls.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await eng.train_step(layout_batch(i + 1), i + 1)
            steps.append(time.perf_counter() - t0)
        return statistics.median(calls), statistics.median(steps)
    finally:
        await eng.aclose()


async def main(repeats: int) -> None:
    os.environ.setdefault("ASYNCPOLICY_CACHE", tempfile.mkdtemp())
    model = resolve_model_path(load_config())
    one = await measure(FSDPTrainEngine(w.WorkerInit(model_path=model, config=load_config(overrides=[*CPU_FSDP, *LAYOUT_TRAIN])),
                                        [None, None], timeout_s=120), repeats)
    overrides = two_node_overrides(w.free_port(), 120)
    node = subprocess.Popen([sys.executable, "-m", "asyncpolicy", "trainer-node", *overrides, "trainer.node_rank=1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cfg = load_config(overrides=overrides)
        two = await measure(FSDPTrainEngine(w.WorkerInit(model_path=model, config=cfg), [None], timeout_s=120), repeats)
        node.wait(60)
    finally:
        node.kill()
    print("| layout | command round trip (Checksum), ms | training step, ms |")
    print("|---|---|---|")
    for name, (call, step) in (("1 node × 2 ranks", one), ("2 nodes × 1 rank (relay)", two)):
        print(f"| {name} | {call * 1e3:.1f} | {step * 1e3:.1f} |")


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 20)
