"""A real, fully asynchronous CPU run of the embedded tiny model: it must learn, keep the
staleness bound on every sample it trains on, move its rollout versions forward, and answer a
pause/resume in the middle of training.

About a minute on 2 cores (staleness_threshold=2, partial rollout on, seeded).
"""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest

from asyncpolicy.bench.learning import tenth_means
from asyncpolicy.config import load_config
from asyncpolicy.supervisor import Supervisor

pytestmark = pytest.mark.anyio

STEPS = 300
THRESHOLD = 2


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_async_cpu_run_learns_within_the_staleness_bound(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"trainer.total_training_steps={STEPS}",
            f"async_training.staleness_threshold={THRESHOLD}",
            "async_training.partial_rollout=true",
            "seed=0",
            f"output_dir={tmp_path}",
            "log_level=warning",
        ],
    )
    assert (cfg.rollout.engine, cfg.trainer.engine) == ("hf", "torch")  # the real CPU path, not a simulation
    paused_at = STEPS // 2
    made_during_pause: int | None = None
    with anyio.fail_after(300):
        async with Supervisor.open(cfg) as sup:
            async for row in sup.events():
                if row["step"] == paused_at:
                    assert await sup.pause() is True
                    assert sup.rollouter.statistics().running == 0  # nothing runs on the engine once pause() returns
                    made = sup.channel.statistics().produced
                    await anyio.sleep(0.5)
                    made_during_pause = sup.channel.statistics().produced - made
                    assert await sup.resume() is True
            result = await sup.wait()

    assert result.finished and result.steps == STEPS
    assert made_during_pause == 0, "samples were generated while paused"
    assert result.made == result.trained + result.dropped_stale + result.queued
    rows = [msgspec.json.decode(line) for line in (tmp_path / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # every consumed sample within the bound, never silently exceeded
    assert max(r["sample_age_max"] for r in rows) <= THRESHOLD
    assert rows[-1]["staleness_max"] <= THRESHOLD
    # the rollout is fed new weights as training goes
    rollout_versions = [r["rollout_version"] for r in rows]
    assert rollout_versions == sorted(rollout_versions) and rollout_versions[-1] >= STEPS - 1
    # asynchrony really happened: some samples were trained on after their policy had moved on
    assert any(r["sample_age_max"] >= 1 for r in rows)
    # and it learned
    first, last = tenth_means(rows, "reward_mean")
    assert last >= 2 * first and last >= first + 0.1, (first, last)
