"""Soak: a long simulated run, watching for leaks (resident memory, live tasks, open files).

    python benchmarks/soak.py                 # 20 000 steps (a few minutes on 2 cores)
    python benchmarks/soak.py --steps 2000    # a quick look

Targets (issue 5): resident memory grows < 5 % from the end of warm-up (10 % of the steps) to
the end; the number of live tasks and of open file descriptors does not grow. Prints a table
last; exit 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import anyio
import msgspec
import psutil

from asyncpolicy.bench.common import detect_machine
from asyncpolicy.config import load_config
from asyncpolicy.supervisor import Supervisor


# Task names (anyio names a task by its function) of the Rollouter's per-group and per-response
# tasks: their number moves with the groups in flight, so they are left out of the leak count.
ROLLOUT_TASKS = ("Rollouter._rollout_group", "Rollouter._generate_into")


class Probe(msgspec.Struct):
    step: int
    rss_bytes: int
    tasks: int  # every live task in the process
    other_tasks: int  # live tasks other than in-flight generations: must stay constant
    open_files: int


def probe(step: int) -> Probe:
    proc = psutil.Process(os.getpid())
    names = [t.name or "" for t in anyio.get_running_tasks()]
    return Probe(
        step=step,
        rss_bytes=proc.memory_info().rss,
        tasks=len(names),
        other_tasks=sum(1 for n in names if not n.endswith(ROLLOUT_TASKS)),
        open_files=proc.num_fds(),
    )


async def soak(steps: int, out: str) -> list[Probe]:
    cfg = load_config(
        None,
        [
            "rollout.engine=simulated",
            "trainer.engine=simulated",
            "rollout.simulated.mean_latency_s=0.0005",
            "trainer.simulated.step_latency_s=0.0",
            "trainer.simulated.sync_latency_s=0.0",
            "trainer.simulated.record_prompts=false",
            f"trainer.total_training_steps={steps}",
            "trainer.save_freq=0",
            "trainer.test_freq=0",
            "log_level=error",
            f"output_dir={out}",
        ],
    )
    probes: list[Probe] = []
    every = max(1, steps // 50)
    async with Supervisor.open(cfg) as sup:
        async for row in sup.events():
            if row["step"] % every == 0:
                probes.append(probe(row["step"]))
            if row["step"] >= steps:
                break
        await sup.wait()
    return probes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000)
    args = parser.parse_args()
    from asyncpolicy.logging import configure_logging

    configure_logging("error")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as out:
        probes = anyio.run(soak, args.steps, out)
    wall = time.monotonic() - started
    if all(p.tasks == p.other_tasks for p in probes):  # the names no longer match: the leak count would be wrong
        print(f"soak: no live task named *{' or *'.join(ROLLOUT_TASKS)}: update ROLLOUT_TASKS to the Rollouter's task names")
        return 1
    warm = next(p for p in probes if p.step >= args.steps // 10)
    last = probes[-1]
    growth = (last.rss_bytes - warm.rss_bytes) / warm.rss_bytes
    after = [p for p in probes if p.step >= warm.step]
    other_first, other_max = warm.other_tasks, max(p.other_tasks for p in after)
    ok_rss, ok_tasks, ok_files = growth < 0.05, other_max <= other_first, last.open_files <= warm.open_files
    print(f"machine: {detect_machine().describe()}; python {platform.python_version()}")
    print(f"command: python benchmarks/soak.py --steps {args.steps}; wall {wall:.0f}s ({args.steps / wall:.0f} steps/s)")
    print(f"| what | after warm-up (step {warm.step}) | end (step {last.step}) | target | met |")
    print("|---|---|---|---|---|")
    print(f"| resident memory | {warm.rss_bytes / 2**20:.1f} MiB | {last.rss_bytes / 2**20:.1f} MiB ({growth:+.1%}) | < +5 % | {'yes' if ok_rss else 'NO'} |")
    print(f"| live tasks other than in-flight generations (max after warm-up) | {other_first} | {other_max} | no growth | {'yes' if ok_tasks else 'NO'} |")
    print(f"| live tasks, all (varies with groups in flight) | {warm.tasks} | {last.tasks} | - | - |")
    print(f"| open files | {warm.open_files} | {last.open_files} | no growth | {'yes' if ok_files else 'NO'} |")
    return 0 if ok_rss and ok_tasks and ok_files else 1


if __name__ == "__main__":
    raise SystemExit(main())
