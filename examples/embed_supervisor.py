"""Embed asyncpolicy in a larger async application.

The host keeps its own task running (a heartbeat standing in for a web server or an
orchestrator) while a training run starts and goes on in the same event loop; it pauses and
resumes generation mid-run and follows the metric events. It prints only its result: the sample
accounting and how late the heartbeat woke, during start-up and during training. Runs under
asyncio or trio, any number of times (each run writes to a fresh temporary directory unless
output_dir=... is given):

    python examples/embed_supervisor.py                      # simulated engines, asyncio
    python examples/embed_supervisor.py --backend trio
    python examples/embed_supervisor.py rollout.engine=hf trainer.engine=torch   # the tiny real model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import anyio

from asyncpolicy.config import Config, load_config
from asyncpolicy.errors import ConfigError, RunFailed
from asyncpolicy.supervisor import RunResult, Supervisor

HEARTBEAT_S = 0.01


class Heartbeat:
    """The host's own work: wakes every HEARTBEAT_S and records how late it woke, per phase."""

    def __init__(self) -> None:
        self.lags: dict[str, list[float]] = {"start-up": [], "training": []}
        self.phase = "start-up"

    async def run(self) -> None:
        while True:
            due = time.monotonic() + HEARTBEAT_S
            await anyio.sleep(HEARTBEAT_S)
            self.lags[self.phase].append(time.monotonic() - due)


async def main(cfg: Config) -> tuple[RunResult, Heartbeat]:
    beat = Heartbeat()
    async with anyio.create_task_group() as host:
        host.start_soon(beat.run)  # beating before the supervisor starts: start-up must not block it
        async with Supervisor.open(cfg) as sup:
            beat.phase = "training"

            async def follow() -> None:
                async for row in sup.events():
                    if row["step"] == 10:
                        await sup.pause()  # e.g. the host needs the accelerator for a moment
                        await anyio.sleep(0.2)
                        await sup.resume()

            host.start_soon(follow)
            result = await sup.wait()
        host.cancel_scope.cancel()
    return result, beat


def report(result: RunResult, beat: Heartbeat) -> None:
    print(
        f"trained {result.steps} steps; samples made {result.made} = trained {result.trained}"
        f" + dropped {result.dropped_stale} + queued {result.queued}"
    )
    for phase, lags in beat.lags.items():
        if not lags:  # over before one beat was due; the beat then running counts in the next phase
            print(f"host heartbeat lag during {phase}, 0 beats: shorter than one beat ({HEARTBEAT_S * 1000:g} ms)")
            continue
        ms = sorted(lag * 1000 for lag in lags)
        print(f"host heartbeat lag during {phase}, {len(lags)} beats: p50 {statistics.median(ms):.2f} ms, max {ms[-1]:.2f} ms")


def _named_failure(exc: BaseException) -> BaseException:
    """The ConfigError or RunFailed itself, out of the host task group's exception group."""
    if isinstance(exc, BaseExceptionGroup):
        found = exc.subgroup(lambda e: isinstance(e, (ConfigError, RunFailed)))
        if found is None:
            raise exc
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        return found
    return exc


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="asyncpolicy-embed-") as tmp:
        try:
            defaults = ["rollout.engine=simulated", "trainer.engine=simulated", "trainer.total_training_steps=40"]
            cfg = load_config(None, [*defaults, f"output_dir={tmp}", *args.overrides])
            result, beat = anyio.run(main, cfg, backend=args.backend)
        except (ConfigError, RunFailed, BaseExceptionGroup) as exc:
            failure = _named_failure(exc)
            print(f"embed_supervisor: {failure}", file=sys.stderr)
            return 2 if isinstance(failure, ConfigError) else 1
    report(result, beat)
    return 0


if __name__ == "__main__":
    sys.exit(run())
