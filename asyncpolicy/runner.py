"""The CLI's run loop: the supervisor, a progress bar, and graceful handling of SIGINT/SIGTERM.

First signal: stop gracefully — the current step completes, a checkpoint is written — within
`stop_timeout_s`, then exit 128 + signal (130 for SIGINT, 143 for SIGTERM). If that bound passes,
or a second SIGINT arrives, the process exits at once with the same code; checkpoints are
written atomically, so whatever was saved before stays intact.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog
from tqdm import tqdm

from asyncpolicy.config import Config
from asyncpolicy.errors import first_failure
from asyncpolicy.supervisor import RunResult, Supervisor

log = structlog.get_logger("asyncpolicy.runner")


class Outcome:
    """How the run ended, as the CLI reports it."""

    def __init__(self) -> None:
        self.result: RunResult | None = None
        self.signal: int | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signal if self.signal is not None else 0


def _hard_exit(code: int, why: str) -> None:
    print(f"asyncpolicy: {why}; exiting now with {code}", file=sys.stderr, flush=True)
    os._exit(code)


async def _watch_signals(
    stopping: anyio.Event, signals: AsyncIterator[signal.Signals], outcome: Outcome, stop_timeout_s: float
) -> None:
    async for signum in signals:
        outcome.signal = int(signum)
        log.warning("stop_requested", signal=signal.Signals(signum).name, timeout_s=stop_timeout_s)
        tqdm.write(f"asyncpolicy: {signal.Signals(signum).name}: stopping after the current step (again to exit now)", file=sys.stderr)
        stopping.set()
        break
    with anyio.move_on_after(stop_timeout_s):
        async for signum in signals:
            if signum == signal.SIGINT:
                _hard_exit(128 + int(signum), "second SIGINT")
    assert outcome.signal is not None
    _hard_exit(128 + outcome.signal, f"the run did not stop within stop_timeout_s={stop_timeout_s}")


async def _stop_when(stopping: anyio.Event, sup: Supervisor) -> None:
    await stopping.wait()
    sup.stop()


def _show_progress(cfg: Config) -> bool:
    return cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())


async def _follow_progress(sup: Supervisor, total: int) -> None:
    bar = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        async for row in sup.events():
            bar.update(row["step"] - bar.n)
            shown: dict[str, Any] = {"reward": f"{row['reward_mean']:.3f}", "age": row["sample_age_max"], "queue": row["queue_size"]}
            if row.get("val/accuracy") is not None:
                shown["val_acc"] = f"{row['val/accuracy']:.2f}"
            bar.set_postfix(shown)
    finally:
        bar.close()


async def run_cli(cfg: Config, on_output_dir: Callable[[Path], None] | None = None) -> Outcome:
    """Run to the end or to a signal; the Outcome carries the result and the exit code.

    Signals are watched from before start-up (imports, engines: a minute with vLLM), so a Ctrl-C
    then ends the start-up instead of being lost."""
    outcome = Outcome()
    stopping = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_signals, stopping, signals, outcome, cfg.stop_timeout_s)
                sup = await Supervisor.build(cfg, on_output_dir=on_output_dir)
                if stopping.is_set():  # signalled while building: the run ends before it starts
                    sup.stop()
                tg.start_soon(_stop_when, stopping, sup)
                async with sup:
                    if _show_progress(cfg):
                        tg.start_soon(_follow_progress, sup, cfg.trainer.total_training_steps)
                    outcome.result = await sup.wait()
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the run's own error (bad input, a failed actor), as raised
            raise first_failure(group) from None
    return outcome
