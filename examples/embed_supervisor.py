"""Embed asyncpolicy in a larger async application.

The host keeps its own task running (a heartbeat standing in for a web server or an
orchestrator) while a training run goes on in the same event loop; it pauses and resumes
generation mid-run and follows the metric events. Runs under asyncio or trio:

    python examples/embed_supervisor.py                      # simulated engines, asyncio
    python examples/embed_supervisor.py --backend trio
    python examples/embed_supervisor.py rollout.engine=hf trainer.engine=torch   # the tiny real model
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio

from asyncpolicy.config import load_config
from asyncpolicy.supervisor import Supervisor


async def heartbeat(period: float, lags: list[float]) -> None:
    """The host's own work: wakes every `period` s and records how late it woke."""
    while True:
        due = time.monotonic() + period
        await anyio.sleep(period)
        lags.append(time.monotonic() - due)


async def main(overrides: list[str]) -> None:
    cfg = load_config(
        None,
        ["rollout.engine=simulated", "trainer.engine=simulated", "trainer.total_training_steps=40", "output_dir=outputs/embed-example", *overrides],
    )
    lags: list[float] = []
    async with anyio.create_task_group() as host:
        host.start_soon(heartbeat, 0.01, lags)
        async with Supervisor(cfg) as sup:

            async def follow() -> None:
                async for row in sup.events():
                    if row["step"] == 10:
                        await sup.pause()  # e.g. the host needs the accelerator for a moment
                        print("host: paused generation at step 10")
                        await anyio.sleep(0.2)
                        await sup.resume()
                        print("host: resumed")

            host.start_soon(follow)
            result = await sup.wait()
        host.cancel_scope.cancel()
    lags_ms = sorted(lag * 1000 for lag in lags)
    print(f"trained {result.steps} steps; samples made {result.made} = trained {result.trained} + dropped {result.dropped_stale} + queued {result.queued}")
    print(f"host heartbeat lag over {len(lags_ms)} beats: p50 {statistics.median(lags_ms):.2f} ms, max {lags_ms[-1]:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    anyio.run(main, args.overrides, backend=args.backend)
