"""The CLI's run loop: the supervisor plus a progress bar fed by its metric events."""

from __future__ import annotations

import sys

import anyio
from tqdm import tqdm

from asyncpolicy.config import Config
from asyncpolicy.supervisor import RunResult, Supervisor


def _show_progress(cfg: Config) -> bool:
    return cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())


async def run_with_progress(cfg: Config) -> RunResult:
    """Run to the end; on an interactive console, show steps, reward and staleness as they come."""
    async with Supervisor(cfg) as sup:
        if not _show_progress(cfg):
            return await sup.wait()
        async with anyio.create_task_group() as tg:
            bar = tqdm(total=cfg.trainer.total_training_steps, unit="step", file=sys.stderr, dynamic_ncols=True)

            async def follow() -> None:
                async for row in sup.events():
                    bar.update(row["step"] - bar.n)
                    bar.set_postfix(reward=f"{row['reward_mean']:.3f}", age=row["sample_age_max"], queue=row["queue_size"])

            tg.start_soon(follow)
            try:
                result = await sup.wait()
            finally:
                bar.close()
            tg.cancel_scope.cancel()
        return result
