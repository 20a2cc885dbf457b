"""The rollout-server client against real `serve-rollout` processes (simulated engine), under asyncio and trio."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import anyio
import pytest

from asyncpolicy.config import load_config
from asyncpolicy.engines.protocols import GenerationEngine, GenerationRequest
from asyncpolicy.engines.generation.remote_client import RemoteGenerationEngine, RemoteServerError, _Server, probe_servers
from asyncpolicy.errors import ConfigError, RunFailed
from asyncpolicy.engines.generation.remote_server import load_server_config
from asyncpolicy.engines.transport.http import RemoteStateTransport

pytestmark = pytest.mark.anyio

SIM = ("rollout.engine=simulated", "rollout.simulated.latency_sigma=0")
SLOW = (*SIM, "rollout.simulated.mean_latency_s=1000")  # a generation that only an abort or a cancel ends
HANG_GUARD_S = 60  # only ever reached if the behaviour under test is broken


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused, and nobody else can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def engine_for(*servers: str) -> RemoteGenerationEngine:
    return RemoteGenerationEngine(list(servers), "simulated", generation_timeout=HANG_GUARD_S, control_timeout=HANG_GUARD_S)


def request(uid: str, i: int = 0, **kw: object) -> GenerationRequest:
    return GenerationRequest(request_id=f"train/{uid}/{i}", prompt_tokens=[1, 2, 3], max_tokens=8, **kw)  # type: ignore[arg-type]


def test_config_names_a_bad_server_entry() -> None:
    for bad in ("[nohost]", "[host:notaport]", "[host:70000]", "[a:1,a:1]"):
        with pytest.raises(ConfigError, match="rollout.servers"):
            load_config(None, [f"rollout.servers={bad}"])
    with pytest.raises(ConfigError, match="rollout.colocate"):
        load_config(None, ["rollout.servers=[a:1]", "rollout.engine=vllm", "trainer.engine=fsdp", "rollout.colocate=true"])
    assert load_config(None, ["rollout.servers=[127.0.0.1:8100,'[::1]:8101']"]).rollout.servers == ["127.0.0.1:8100", "[::1]:8101"]


def test_server_config_fills_in_the_partner_trainer() -> None:
    assert load_server_config(None, ["rollout.engine=vllm"]).trainer.engine == "fsdp"
    assert load_server_config(None, ["rollout.engine=simulated"]).trainer.engine == "simulated"
    assert load_server_config(None, []).rollout.engine == "hf"
    with pytest.raises(ConfigError, match="rollout.servers"):
        load_server_config(None, ["rollout.servers=[a:1]"])
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size': a rollout server runs one engine"):
        load_server_config(None, ["rollout.engine=vllm", "rollout.n_gpus_per_node=2"])  # 2 replicas of TP 1
    two_gpu = load_server_config(None, ["rollout.engine=vllm", "rollout.n_gpus_per_node=2", "rollout.tensor_parallel_size=2"])
    assert two_gpu.rollout.tensor_parallel_size == 2


def test_a_group_stays_on_one_server_and_new_groups_go_to_the_least_busy() -> None:
    engine = engine_for("a:1", "b:2")
    a, b = engine.servers
    assert engine._pick("train/g1") is a  # both idle: the first
    a.in_flight += 1
    assert engine._pick("train/g2") is b  # fewer in flight
    b.in_flight += 1
    b.in_flight += 5
    assert engine._pick("train/g2") is b  # its group is there, busy or not
    assert engine._pick("train/g3") is a
    for group, server in (("train/g1", a), ("train/g2", b), ("train/g2", b), ("train/g3", a)):
        engine._release(group, server)
    assert engine._groups == {}
    a.lost = "gone"
    assert engine._pick("train/g1") is b  # a lost server gets nothing


async def test_requests_spread_over_servers_and_come_back_whole(rollout_servers) -> None:
    servers = [rollout_servers.start(*SIM, "rollout.simulated.mean_latency_s=0.05") for _ in range(2)]
    engine = engine_for(*servers)
    assert isinstance(engine, GenerationEngine)
    await engine.start()
    try:
        results = {}

        async def one(uid: str, i: int) -> None:
            results[(uid, i)] = await engine.generate(request(uid, i, seed=i))

        async with anyio.create_task_group() as tg:
            for g in range(8):
                for i in range(2):
                    tg.start_soon(one, f"0:{g}", i)
        assert all(r.request_id == f"train/{uid}/{i}" and r.finish_reason in ("stop", "length") for (uid, i), r in results.items())
        assert len(results) == 16
        health = await engine.healths()
        assert [h.requests > 0 for h in health] == [True, True]
        assert sum(h.requests for h in health) == 16
        await RemoteStateTransport(engine, None).push(3)  # simulated servers: the version alone moves
        assert engine.version == 3 and [h.version for h in await engine.healths()] == [3, 3]
    finally:
        await engine.aclose()


async def test_abort_all_returns_running_generations_with_their_tokens(rollout_servers) -> None:
    engine = engine_for(rollout_servers.start(*SLOW))
    await engine.start()
    try:
        got = []

        async def generate() -> None:
            got.append(await engine.generate(request("0:1", response_tokens=[5, 6], behaviour_logprobs=[-1.0, -2.0], token_versions=[0, 0])))

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(generate)
                while (await engine.healths())[0].in_flight == 0:
                    await anyio.sleep(0.02)
                await engine.abort_all()
        assert got[0].finish_reason == "abort"
        assert got[0].response_tokens[:2] == [5, 6] and got[0].token_versions[:2] == [0, 0]
    finally:
        await engine.aclose()


async def test_a_cancelled_client_call_abandons_the_generation_on_the_server(rollout_servers) -> None:
    engine = engine_for(rollout_servers.start(*SLOW))
    await engine.start()
    try:
        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.generate, request("0:1"))
                while (await engine.healths())[0].in_flight == 0:
                    await anyio.sleep(0.02)
                tg.cancel_scope.cancel()
            while (await engine.healths())[0].in_flight:  # the server saw the hang-up and stopped it
                await anyio.sleep(0.02)
    finally:
        await engine.aclose()


async def test_a_lost_server_is_dropped_and_the_rest_carry_on(rollout_servers) -> None:
    first, second = (rollout_servers.start(*SIM, "rollout.simulated.mean_latency_s=0.001") for _ in range(2))
    engine = engine_for(first, second)
    await engine.start()
    try:
        rollout_servers.kill(first)
        with pytest.raises(RemoteServerError, match=f"rollout server {first}"):
            await engine.generate(request("0:1"))  # both idle: goes to the first, which is gone
        assert [s.address for s in engine.live] == [second]
        assert (await engine.generate(request("0:1"))).finish_reason != "abort"  # the retry lands on the second
        await RemoteStateTransport(engine, None).push(1)
        assert engine.version == 1
        rollout_servers.kill(second)
        with pytest.raises(RemoteServerError, match=f"rollout server {second}"):
            await engine.generate(request("0:2"))
        with pytest.raises(RemoteServerError, match=f"every rollout server is lost: {first} .*; {second} "):
            await engine.generate(request("0:2"))
        with pytest.raises(RunFailed, match=f"no rollout server answers: {first} .*; {second} "):
            await engine.start()  # what the supervisor's engine restart does
    finally:
        await engine.aclose()


async def test_an_unreachable_server_is_named(closed_port: int) -> None:
    address = f"127.0.0.1:{closed_port}"
    cfg = load_config(None, [*SIM, "trainer.engine=simulated", f"rollout.servers=[{address}]"])
    with pytest.raises(ConfigError, match=f"rollout server {address} does not answer GET /health"):
        probe_servers(cfg)
    engine = engine_for(address)
    with pytest.raises(RunFailed, match=f"no rollout server answers: {address} "):
        await engine.start()
    await engine.aclose()


def test_server_bookkeeping_starts_clean() -> None:
    s = _Server("h:1")
    assert (s.url, s.in_flight, s.sent, s.lost) == ("http://h:1", 0, 0, "")


def test_a_trainer_on_vllm_servers_imports_no_vllm() -> None:
    """vLLM runs on the servers: the trainer's start-up imports the client and the FSDP trainer, never vllm."""
    import sys

    from asyncpolicy.engines.factory import import_engine_modules

    cfg = load_config(None, ["rollout.engine=vllm", "trainer.engine=fsdp", "rollout.servers=[127.0.0.1:8100]"])
    import_engine_modules(cfg)  # without the servers' rewiring this asks for vllm (a ConfigError where it is absent)
    assert "asyncpolicy.engines.generation.remote_client" in sys.modules and "asyncpolicy.engines.training.fsdp_trainer" in sys.modules
    assert "vllm" not in sys.modules
