"""A `task.agent` run stopped and resumed: the agents' episodes in flight at the stop are replayed
from their start (counted in `requeued`), finished ones stay queued as they were, and the two
halves together train every step once, accounting for every sample. The agent here speaks the
endpoint's HTTP with httpx (no `openai` needed); latencies are the simulated engine's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from asyncpolicy import checkpoint
from asyncpolicy.config import Config
from asyncpolicy.errors import ConfigError
from asyncpolicy.supervisor import Supervisor

pytestmark = pytest.mark.anyio

AGENT = '''
import httpx


async def solve(base_url: str, prompt: str) -> float:
    """Two calls, the history resent as the OpenAI API does; reward: the first reply's length is odd."""
    async with httpx.AsyncClient(timeout=30.0) as client:
        messages = [{"role": "user", "content": prompt}]
        first = await client.post(f"{base_url}/chat/completions", json={"model": "policy", "messages": messages, "max_tokens": 6})
        text = first.json()["choices"][0]["message"]["content"]
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "again"}]
        await client.post(f"{base_url}/chat/completions", json={"model": "policy", "messages": messages, "max_tokens": 4})
    return float(len(text) % 2)
'''


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the endpoint is uvicorn's: asyncio only (trio: below)
async def test_an_agent_run_stopped_mid_way_resumes_and_loses_no_episode(
    sim_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "http_agent.py").write_text(AGENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    keys = ("task.agent=http_agent:solve", "trainer.total_training_steps=8", "data.max_response_length=32",
            "rollout.simulated.mean_latency_s=0.01")  # fmt: skip

    with anyio.fail_after(120):
        async with Supervisor.open(sim_config(*keys, output_dir=out)) as sup:
            async for row in sup.events():
                if row["step"] >= 3:
                    sup.stop()
                    break
            first = await sup.wait()
    assert not first.finished and first.steps >= 3
    assert first.made == first.trained + first.dropped_stale + first.queued
    saved = checkpoint.load_state(checkpoint.latest_checkpoint(out) or out)
    assert saved.reason == "stop" and saved.trainer.step == first.steps
    in_flight, requeued_before = len(saved.in_flight), saved.rollout.requeued

    with anyio.fail_after(120):
        async with Supervisor.open(sim_config(*keys, "resume=auto", output_dir=out)) as sup:
            second = await sup.wait()
            counters = sup.rollouter.statistics().counters
    assert second.finished and second.steps == 8
    assert second.made == second.trained + second.dropped_stale + second.queued  # the counts continue across the resume
    assert second.trained == 8 * 4  # every step of 4 groups trained once over both halves
    assert counters.requeued == requeued_before + in_flight  # each group in flight at the stop replayed once
    assert counters.env_errors == 0  # the agents' episodes all ran (none lost to the stop as a failure)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_an_agent_run_on_trio_is_refused_naming_the_key(
    sim_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn serves on asyncio only: a host on trio gets a clear error, not a crash inside uvicorn."""
    (tmp_path / "http_agent.py").write_text(AGENT)
    monkeypatch.syspath_prepend(str(tmp_path))
    with anyio.fail_after(60), pytest.raises(ConfigError, match="task.agent.*asyncio"):
        async with Supervisor.open(sim_config("task.agent=http_agent:solve", output_dir=tmp_path / "run")) as sup:
            await sup.wait()
