"""The black-box agent endpoint end to end: the example agent (openai client) against the simulated
engine through a real HTTP server; the trajectory is token-exact and a bad history is refused; a
run with `task.agent` trains on the agent's episodes under the Supervisor."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from asyncpolicy.agents.chat_server import ChatServer
from asyncpolicy.agents.conversation import AgentConversation
from asyncpolicy.agents.episode import AgentSpec, load_agent, run_agent_episode
from asyncpolicy.config import Config, SimulatedRolloutConfig
from asyncpolicy.engines.protocols import GenerationRequest, GenerationResult
from asyncpolicy.engines.simulated import SimulatedGenerationEngine, SimulatedTokenizer
from asyncpolicy.envs.tokens import ObservationTokens
from asyncpolicy.errors import ConfigError
from asyncpolicy.samples import Prompt, Trajectory
from asyncpolicy.tasks.base import ChatMessage

pytest.importorskip("openai")
FOLLOW_UP = "Check it, then reply with the number only."


def _request(i: int) -> GenerationRequest:
    return GenerationRequest(request_id=f"train/0:{i}/0", group=f"train/0:{i}", prompt_tokens=[], max_tokens=64, temperature=1.0, top_p=1.0, seed=i)


def test_example_agent_episodes_are_token_exact() -> None:
    engine = SimulatedGenerationEngine(SimulatedRolloutConfig(mean_latency_s=0.001), random.Random(0))
    tok = SimulatedTokenizer()
    calls: list[GenerationResult] = []

    async def generate(request: GenerationRequest) -> GenerationResult:
        result = await engine.generate(request)
        calls.append(result)
        return result

    async def main() -> None:
        spec = AgentSpec(
            name="examples.calc_agent:solve", agent=load_agent("examples.calc_agent:solve"), tokens=ObservationTokens(tok),
            decode=tok.decode, max_episode_tokens=64, timeout_s=30.0, host="127.0.0.1", port=0,
        )
        server = ChatServer()
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            for step in range(2):  # two steps' worth of episodes, the engine's version moving between them
                engine.set_version(step)
                prompt = Prompt(index=step, epoch=0, text=f"What is {step + 2} + 3?", tokens=[5, 6, 7])
                calls.clear()
                res = await run_agent_episode(spec, server, prompt, _request(step), generate)
                assert res.error == "" and res.trajectory.reward in (0.0, 1.0)
                t = res.trajectory
                first, second = calls
                follow = tok(FOLLOW_UP)["input_ids"]
                assert t.response_tokens == first.response_tokens + follow + second.response_tokens  # never re-encoded
                assert t.loss_mask == [1] * len(first.response_tokens) + [0] * len(follow) + [1] * len(second.response_tokens)
                assert second.request_id.endswith("/t3") and t.turns == 2
                assert set(t.token_versions) == {step}
                assert [lp for lp, m in zip(t.behaviour_logprobs, t.loss_mask, strict=True) if not m] == [0.0] * len(follow)
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_a_call_still_running_when_its_episode_ends_does_not_change_the_trajectory() -> None:
    """An agent that times out while the endpoint generates for it: its episode ends (its trajectory
    built) and the call finishes later; what is trained is the trajectory as the episode ended."""
    engine = SimulatedGenerationEngine(SimulatedRolloutConfig(mean_latency_s=0.0), random.Random(2))
    tok = SimulatedTokenizer()
    entered, release = anyio.Event(), anyio.Event()

    async def generate(request: GenerationRequest) -> GenerationResult:
        if not request.request_id.endswith("/t1"):  # every call after the first waits until released
            entered.set()
            await release.wait()
        return await engine.generate(request)

    async def main() -> None:
        prompt = Prompt(index=0, epoch=0, text="What is 1 + 1?", tokens=[5])
        conv = AgentConversation(prompt, _request(0), generate, ObservationTokens(tok), tok.decode, 64)
        user = ChatMessage("user", prompt.text)
        text, _ = await conv.complete([user], None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(conv.complete, [user, ChatMessage("assistant", text), ChatMessage("tool", "2")], None)
            await entered.wait()
            t = conv.trajectory(0.0, "the agent did not return within 1s")  # as run_agent_episode ends it
            ended = msgspec.msgpack.decode(msgspec.msgpack.encode(t), type=Trajectory)  # a deep copy
            release.set()
        assert len(conv.record.tokens) > len(t.response_tokens)  # the late call did add to the record ...
        assert t == ended  # ... and nothing to the trajectory

    anyio.run(main)


def test_a_history_that_does_not_extend_the_recorded_one_is_refused() -> None:
    engine = SimulatedGenerationEngine(SimulatedRolloutConfig(mean_latency_s=0.001), random.Random(1))
    tok = SimulatedTokenizer()

    async def main() -> None:
        server = ChatServer()
        prompt = Prompt(index=0, epoch=0, text="What is 1 + 1?", tokens=[5])
        conv = AgentConversation(prompt, _request(0), engine.generate, ObservationTokens(tok), tok.decode, 64)
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            with server.episode(conv) as base:
                async with httpx.AsyncClient(base_url=base, timeout=30.0) as http:
                    user = {"role": "user", "content": prompt.text}
                    ok = await http.post("/chat/completions", json={"messages": [user]})
                    assert ok.status_code == 200
                    reply = ok.json()["choices"][0]["message"]
                    edited = {"role": "assistant", "content": reply["content"] + " (edited)"}
                    bad = await http.post("/chat/completions", json={"messages": [user, edited, user]})
                    assert bad.status_code == 400 and "recorded conversation" in bad.json()["error"]["message"]
                    two = await http.post("/chat/completions", json={"messages": [user, reply, user, user]})
                    assert two.status_code == 400 and "exactly one" in two.json()["error"]["message"]
            gone = await httpx.AsyncClient(timeout=30.0).post(base + "/chat/completions", json={"messages": [user]})
            assert gone.status_code == 404
            tg.cancel_scope.cancel()
        assert conv.record.mask == [1] * len(conv.record.tokens)  # the refused calls recorded nothing

    anyio.run(main)


def test_an_agent_path_that_does_not_import_is_bad_input() -> None:
    with pytest.raises(ConfigError, match="task.agent"):
        load_agent("examples.no_such_agent:solve")


def run_agent(sim_config: Callable[..., Config], out: Path, agent: str, steps: int) -> Any:
    """A finished run of `agent` on the simulated engines: its Supervisor."""
    from asyncpolicy.supervisor import Supervisor

    cfg = sim_config(
        f"task.agent={agent}", f"trainer.total_training_steps={steps}", "data.train_batch_size=2",
        "rollout.n=2", "data.max_response_length=64", output_dir=out,
    )

    async def main() -> Supervisor:
        async with Supervisor.open(cfg) as sup:
            await sup.wait()
        return sup

    return anyio.run(main)


def test_a_run_with_task_agent_trains_on_the_agents_episodes(sim_config: Callable[..., Config], tmp_path: Path) -> None:
    """The Supervisor serves the endpoint and the rollouter runs the example agent for each of the
    `rollout.n` responses; its episodes go the env episodes' way (counters, metrics, accounting)."""
    sup = run_agent(sim_config, tmp_path / "run", "examples.calc_agent:solve", steps=3)
    result, counts = sup.result, sup.rollouter.statistics().counters
    assert result is not None and result.finished and result.steps == 3
    assert result.made == result.trained + result.dropped_stale + result.queued and result.trained >= 6
    assert counts.env_errors == 0 and counts.episodes >= 2 * result.made
    assert counts.turns == 2 * counts.episodes  # the example agent calls the model twice per episode
    follow = len(SimulatedTokenizer()(FOLLOW_UP)["input_ids"])
    rows = [msgspec.json.decode(line) for line in (tmp_path / "run" / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["episode/turns_mean"] == 2.0 and r["episode/env_tokens_mean"] == follow  # the follow-up, loss mask 0
        assert r["episode/tool_errors"] == 0.0


def test_an_agent_that_raises_scores_zero_is_counted_and_the_run_goes_on(
    sim_config: Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent failing before its first model call leaves an empty episode: scored 0, counted as an
    environment error, trained on as nothing (no token, no loss), and the run finishes."""
    (tmp_path / "broken_agent.py").write_text(
        "async def solve(base_url: str, prompt: str) -> float:\n    raise RuntimeError('broken before any call')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sup = run_agent(sim_config, tmp_path / "run", "broken_agent:solve", steps=2)
    result, counts = sup.result, sup.rollouter.statistics().counters
    assert result is not None and result.finished and result.steps == 2
    assert result.made == result.trained + result.dropped_stale + result.queued
    assert counts.env_errors == counts.episodes > 0 and counts.turns == 0
    rows = [msgspec.json.decode(line) for line in (tmp_path / "run" / "metrics.jsonl").read_bytes().splitlines()]
    assert all(r["reward_mean"] == 0.0 and r["episode/tool_errors"] > 0 for r in rows)
