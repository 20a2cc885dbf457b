"""Generation replicas: the routing policy alone, the replica set over simulated engines (failover,
restart, abort), config keys and placement, and a whole run in which replicas die."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncpolicy import checkpoint
from asyncpolicy.config import SimulatedRolloutConfig, load_config, replica_count
from asyncpolicy.engines.factory import build_engines
from asyncpolicy.engines.protocols import GenerationRequest
from asyncpolicy.engines.generation import replicas
from asyncpolicy.engines.generation.replicas import NoReplicaAvailable, ReplicaRouter, ReplicatedGeneration
from asyncpolicy.engines.simulated import SimulatedEngineError, SimulatedGenerationEngine
from asyncpolicy.engines.sets.vllm_fsdp import place, replica_gpus
from asyncpolicy.errors import ConfigError
from asyncpolicy.supervisor import Supervisor

# -- the policy ---------------------------------------------------------------------------------


def test_least_tokens_in_flight_wins_and_ties_go_to_the_lowest_index() -> None:
    r = ReplicaRouter(3)
    assert r.pick("a") == 0
    r.begin(0, "a", 100)
    assert r.pick("b") == 1  # 1 and 2 are idle: the lower index
    r.begin(1, "b", 30)
    r.begin(2, "c", 50)
    assert r.pick("d") == 1  # 30 < 50 < 100 tokens still to generate
    assert r.load == [100, 30, 50]


def test_a_group_sticks_to_its_replica_while_it_is_up_then_moves() -> None:
    r = ReplicaRouter(2)
    t = r.begin(r.pick("g") or 0, "g", 500)  # replica 0, now the busier one
    assert r.pick("g") == 0, "a group's second request left its replica (prefix cache lost)"
    assert r.pick("other") == 1
    r.mark_down(0)
    assert r.pick("g") == 1  # its replica is down: the least-loaded live one
    r.begin(1, "g", 10)
    assert r.replica_of("g") == 1
    r.end(t, ok=None)  # the request on the dead replica ends (cancelled): the group stays on 1
    assert r.replica_of("g") == 1 and r.load == [0, 10]


def test_a_group_with_nothing_running_goes_back_to_its_last_replica_and_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agentic episode's next turn comes after a tool call, when none of its group's requests may
    run: it still goes to the replica that holds the group's prefix cache, while that one is up."""
    monkeypatch.setattr(replicas, "RECENT_GROUPS", 2)
    r = ReplicaRouter(2)
    r.end(r.begin(r.pick("g") or 0, "g", 5), ok=True)  # g ran on 0, and ended
    busy = r.begin(0, "h", 500)  # replica 0 is now the busier one
    assert r.pick("g") == 0, "an episode's next turn left its group's replica"
    assert r.pick("new") == 1  # a group never seen: the least loaded
    r.mark_down(0)
    assert r.pick("g") == 1  # its replica is down: the least-loaded live one
    r.end(busy, ok=None)  # cancelled with its replica
    assert r.mark_up(0)
    r.end(r.begin(1, "a", 1), ok=True)  # g, h, a ended: g, the oldest of three, is forgotten
    r.begin(0, "load", 10)
    assert r.pick("g") == 1  # forgotten: the least loaded, not its old replica
    assert r.pick("h") == 0 and r.pick("a") == 1  # remembered, whatever the load


def test_a_replica_goes_down_when_dead_or_after_consecutive_failures_and_comes_back_up() -> None:
    r = ReplicaRouter(2, failures_to_down=2)
    assert not r.end(r.begin(0, "a", 1), ok=False)  # one failure: still up
    assert not r.end(r.begin(0, "a", 1), ok=True)  # a success resets the count
    assert not r.end(r.begin(0, "a", 1), ok=False)
    assert r.end(r.begin(0, "a", 1), ok=False)  # two in a row: down
    assert r.up == [False, True] and r.pick("a") == 1
    assert r.end(r.begin(1, "b", 1), ok=False, dead=True)  # reports itself dead: down at once
    assert r.pick("x") is None
    r.mark_up(0)
    assert r.pick("x") == 0 and r.consecutive_failures[0] == 0


ops = st.lists(
    st.one_of(
        st.tuples(st.just("begin"), st.integers(0, 5), st.integers(0, 64)),  # group, cost
        st.tuples(st.just("end"), st.integers(0, 1000), st.sampled_from([True, False, None])),
        st.tuples(st.just("down"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("up"), st.integers(0, 3), st.just(0)),
    ),
    max_size=80,
)


@given(n=st.integers(1, 4), script=ops)
def test_router_invariants_under_any_sequence(n: int, script: list[tuple[str, int, Any]]) -> None:
    """Loads are the sums of running costs; a pick is an up replica, the group's own while it is up,
    else that of its last request while that one is up, else the least loaded; a group's running
    requests never span two up replicas."""
    r = ReplicaRouter(n, failures_to_down=2)
    running: dict[int, tuple[int, str, int]] = {}
    last: dict[str, int] = {}  # group → replica of its latest request (6 groups: never forgotten)
    for op, a, b in script:
        if op == "begin":
            group = f"g{a}"
            k = r.pick(group)
            live = [i for i in range(n) if r.up[i]]
            if not live:
                assert k is None
                continue
            assert k is not None and r.up[k]
            own = {rk for rk, g, _ in running.values() if g == group and r.up[rk]}
            if own:
                assert own == {k}, "a group was sent to a second replica while its own is up"
            elif not any(g == group for _, g, _ in running.values()) and group in last and r.up[last[group]]:
                assert k == last[group], "a group with nothing running left the replica of its last request"
            else:
                assert r.load[k] == min(r.load[i] for i in live) and k == min(i for i in live if r.load[i] == r.load[k])
            running[r.begin(k, group, b)] = (k, group, b)
            last[group] = k
        elif op == "end" and running:
            ticket = sorted(running)[a % len(running)]
            r.end(ticket, ok=b)
            del running[ticket]
        elif op == "down":
            r.mark_down(a % n)
        elif op == "up":
            r.mark_up(a % n)
        for i in range(n):
            assert r.load[i] == sum(c for rk, _, c in running.values() if rk == i)
        for group in {g for _, g, _ in running.values()}:
            assert len({rk for rk, g, _ in running.values() if g == group and r.up[rk]}) <= 1


# -- the replica set over simulated engines ------------------------------------------------------


def _sim(die_after: int = 0, latency: float = 0.002, seed: int = 0) -> SimulatedGenerationEngine:
    return SimulatedGenerationEngine(
        SimulatedRolloutConfig(mean_latency_s=latency, latency_sigma=0.5, die_after_requests=die_after), random.Random(seed)
    )


class Recorded:
    """A replica that records which requests it was asked to serve (and passes them on)."""

    def __init__(self, inner: SimulatedGenerationEngine, log: list[tuple[str, str, int]], index: int) -> None:
        self.inner, self.log, self.index = inner, log, index

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def errored(self) -> bool:
        return self.inner.errored

    def set_version(self, version: int) -> None:
        self.inner.set_version(version)

    async def start(self) -> None:
        await self.inner.start()

    async def generate(self, request: GenerationRequest) -> Any:
        self.log.append((request.request_id, request.group, self.index))
        return await self.inner.generate(request)

    async def abort_all(self) -> None:
        await self.inner.abort_all()

    async def aclose(self) -> None:
        await self.inner.aclose()


def _requests(groups: int, n: int, max_tokens: int = 8) -> list[GenerationRequest]:
    return [
        GenerationRequest(request_id=f"train/{g}/{i}", group=f"train/{g}", prompt_tokens=[1, 2], max_tokens=max_tokens)
        for g in range(groups)
        for i in range(n)
    ]


async def _serve_all(gen: ReplicatedGeneration, requests: list[GenerationRequest]) -> list[Any]:
    """Start every request at once while `serve` restarts replicas (reload = load the current version)."""
    results: list[Any] = []

    async def reload() -> None:
        gen.set_version(gen.version)

    async def one(req: GenerationRequest) -> None:
        results.append(await gen.generate(req))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(gen.serve, reload)
            async with anyio.create_task_group() as calls:
                for req in requests:
                    calls.start_soon(one, req)
            tg.cancel_scope.cancel()
    return results


@pytest.mark.anyio
@given(
    n_replicas=st.integers(2, 4),
    groups=st.integers(1, 8),
    n=st.integers(1, 4),
    dying=st.integers(0, 3),
    die_after=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
async def test_every_request_is_answered_exactly_once_when_a_replica_dies_mid_flight(
    n_replicas: int, groups: int, n: int, dying: int, die_after: int, seed: int
) -> None:
    calls: list[tuple[str, str, int]] = []
    dying %= n_replicas
    replicas = [
        Recorded(_sim(die_after if k == dying else 0, seed=seed + k), calls, k) for k in range(n_replicas)
    ]
    gen = ReplicatedGeneration(replicas, max_restarts=100)
    await gen.start()
    requests = _requests(groups, n)
    results = await _serve_all(gen, requests)
    assert Counter(r.request_id for r in results) == Counter(q.request_id for q in requests)
    assert all(r.finish_reason in ("stop", "length") for r in results)
    died = replicas[dying].inner.requests > die_after
    assert (gen.statistics().counters.failovers > 0) == died and (gen.statistics().counters.restarts > 0) == died
    if not died:  # no death: each group was served by one replica (its prefix cache)
        for g in {grp for _, grp, _ in calls}:
            assert len({k for _, grp, k in calls if grp == g}) == 1


@pytest.mark.anyio
async def test_a_restarted_replica_gets_the_current_weights_before_it_serves_again() -> None:
    replicas = [_sim(die_after=2), _sim()]
    gen = ReplicatedGeneration(replicas, max_restarts=3)
    await gen.start()
    gen.set_version(5)
    seen_at_reload: list[list[int]] = []

    async def reload() -> None:  # what the supervisor's forced sync does: every push target
        seen_at_reload.append([k for k, _ in gen.push_targets()])
        gen.set_version(7)

    async with anyio.create_task_group() as tg:
        await tg.start(gen.serve, reload)
        for req in _requests(4, 1):  # the first replica dies on its third request
            await gen.generate(req)
        with anyio.fail_after(10):
            while not all(gen.router.up):
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert gen.statistics().counters.restarts == 1 and gen.statistics().counters.failovers == 1
    assert seen_at_reload == [[0, 1]]  # the restarted replica (loading) and the live one
    assert [r.version for r in replicas] == [7, 7] and gen.version == 7
    assert (await gen.generate(_requests(1, 1)[0])).token_versions[-1] == 7


@pytest.mark.anyio
async def test_a_restarted_replica_whose_reload_failed_stays_down() -> None:
    """The forced sync went ahead without it (its push failed): it must not serve its initial weights."""
    replicas = [_sim(die_after=2), _sim()]
    gen = ReplicatedGeneration(replicas, max_restarts=1)
    await gen.start()
    gen.set_version(5)

    async def reload() -> None:  # the transport saw replica 0 fail, dropped it, and loaded the rest
        gen.report_failure(0, RuntimeError("load failed"))
        gen.set_version(7)

    async with anyio.create_task_group() as tg:
        await tg.start(gen.serve, reload)
        for req in _requests(4, 1):  # the first replica dies on its third request
            await gen.generate(req)
        with anyio.fail_after(10):
            while gen.statistics().counters.restarts < 1 or gen._restarting:
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert gen.router.up == [False, True]  # its one restart is spent: it stays out of routing
    assert replicas[1].version == 7 and replicas[0].version != 7


@pytest.mark.anyio
async def test_a_hung_replica_is_taken_down_by_its_callers_timeouts() -> None:
    """The rollouter's generation_timeout cancels the call: past that bound it counts as the replica's failure."""
    hung = SimulatedGenerationEngine(SimulatedRolloutConfig(hang_rate=1.0), random.Random(0))
    gen = ReplicatedGeneration([hung, _sim()], max_restarts=0, failures_to_down=2, call_timeout_s=0.2)
    await gen.start()
    requests = _requests(4, 1)
    timeouts = 0
    with anyio.fail_after(10):
        for req in requests:  # as the rollouter calls: each call bounded, a timeout retried
            while True:
                with anyio.move_on_after(0.2) as scope:
                    result = await gen.generate(req)
                if not scope.cancelled_caught:
                    break
                timeouts += 1
            assert result.finish_reason in ("stop", "length")
    assert gen.router.up == [False, True] and gen.statistics().counters.downs == 1
    assert timeouts >= 2  # two took it down; after that every call went to the live replica


@pytest.mark.anyio
async def test_a_failure_on_a_replica_that_stays_up_goes_to_the_callers_retry_path() -> None:
    """An isolated failure is the rollouter's to retry (on the same replica), not a failover."""
    flaky = SimulatedGenerationEngine(SimulatedRolloutConfig(failure_rate=1.0), random.Random(0))
    gen = ReplicatedGeneration([flaky, _sim()], max_restarts=1, failures_to_down=3)
    await gen.start()
    with pytest.raises(SimulatedEngineError, match="simulated generation failure"):
        await gen.generate(_requests(1, 1)[0])
    assert gen.router.up == [True, True] and gen.statistics().counters.failovers == 0


@pytest.mark.anyio
async def test_with_every_replica_down_a_request_waits_for_a_restart_or_an_abort() -> None:
    gen = ReplicatedGeneration([_sim(), _sim()], max_restarts=1)
    await gen.start()
    for k in range(2):
        gen.report_failure(k, RuntimeError("gone"))
    with pytest.raises(NoReplicaAvailable, match="all 2 generation replicas are down"):  # nothing restarts them
        await gen.generate(_requests(1, 1)[0])

    gate = anyio.Event()

    async def reload() -> None:
        await gate.wait()  # the restart's weight push is held back: no replica is routable yet

    results: list[Any] = []
    async with anyio.create_task_group() as tg:
        await tg.start(gen.serve, reload)

        async def one() -> None:
            req = msgspec.structs.replace(_requests(1, 1)[0], response_tokens=[5], behaviour_logprobs=[-1.0], token_versions=[0])
            results.append(await gen.generate(req))

        tg.start_soon(one)
        with anyio.fail_after(10):
            while not gen._loading:  # both restarted, held at their weight push
                await anyio.sleep(0.001)
        await gen.abort_all()  # a weight sync's pause: the waiting request answers 'abort' with its tokens
        with anyio.fail_after(10):
            while not results:
                await anyio.sleep(0.001)
        gate.set()
        tg.cancel_scope.cancel()
    assert results[0].finish_reason == "abort" and results[0].response_tokens == [5]


# -- configuration and placement -----------------------------------------------------------------

GPU = ["rollout.engine=vllm", "trainer.engine=fsdp"]


def test_replica_count_per_engine_and_consecutive_gpu_slices() -> None:
    cfg = load_config(overrides=[*GPU, "rollout.n_gpus_per_node=6", "rollout.tensor_parallel_size=2", "trainer.n_gpus_per_node=2"])
    assert replica_count(cfg) == 3
    rollout, trainer = place(cfg, 8)
    assert replica_gpus(cfg, rollout) == [[0, 1], [2, 3], [4, 5]] and trainer == [6, 7]
    assert replica_count(load_config(overrides=[*GPU, "rollout.n_gpus_per_node=2"])) == 2
    assert replica_count(load_config(overrides=["rollout.engine=simulated", "trainer.engine=simulated", "rollout.replicas=3"])) == 3
    assert replica_count(load_config()) == 1


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ([*GPU, "rollout.n_gpus_per_node=3", "rollout.tensor_parallel_size=2"], "rollout.n_gpus_per_node"),
        ([*GPU, "rollout.n_gpus_per_node=4", "rollout.tensor_parallel_size=2", "rollout.replicas=4"], "rollout.replicas"),
        ([*GPU, "rollout.n_gpus_per_node=2", "rollout.colocate=true"], "rollout.colocate"),
        (["rollout.replicas=2"], "rollout.replicas"),  # the hf engine runs one
        (["rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size"),
        ([*GPU, "rollout.tensor_parallel_size=0"], "rollout.tensor_parallel_size"),
    ],
)
def test_impossible_replica_settings_name_their_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert info.value.key == key and f"'{key}'" in str(info.value)


def test_simulated_replicas_are_built_from_rollout_replicas() -> None:
    cfg = load_config(overrides=["rollout.engine=simulated", "trainer.engine=simulated", "rollout.replicas=3"])
    engines = build_engines(cfg, rng=random.Random(0))
    assert isinstance(engines.generation, ReplicatedGeneration) and len(engines.generation.replicas) == 3
    assert engines.transport.generation is engines.generation
    one = build_engines(load_config(overrides=["rollout.engine=simulated", "trainer.engine=simulated"]), rng=random.Random(0))
    assert isinstance(one.generation, SimulatedGenerationEngine)


# -- a whole run -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_run_on_three_replicas_survives_their_deaths_and_accounts_for_every_sample(sim_config: Any, tmp_path: Path) -> None:
    cfg = sim_config(
        "rollout.replicas=3",
        "trainer.total_training_steps=12",
        "rollout.simulated.die_after_requests=15",
        "rollout.max_restarts=20",
        output_dir=tmp_path,
    )
    with anyio.fail_after(60):
        async with Supervisor.open(cfg) as sup:
            result = await sup.wait()
            trained = sup.engines.trainer.trained_prompts
            counters = sup.engines.generation.statistics().counters
    assert result.finished and result.steps == 12
    assert result.made == result.trained + result.dropped_stale + result.queued
    assert len(trained) == len(set(trained)), "a prompt was trained twice"
    rows = [msgspec.json.decode(line) for line in (tmp_path / "metrics.jsonl").read_bytes().splitlines()]
    assert rows[-1]["rollout/replica_failovers"] > 0 and rows[-1]["rollout/replica_restarts"] > 0
    assert rows[-1]["rollout/replica_restarts"] <= counters.restarts
    assert all(r["rollout/replica_failovers"] <= s["rollout/replica_failovers"] for r, s in zip(rows, rows[1:], strict=False))


    more = sim_config(
        "rollout.replicas=3", "trainer.total_training_steps=14", "rollout.simulated.die_after_requests=15",
        "rollout.max_restarts=20", "resume=auto", output_dir=tmp_path,
    )
    with anyio.fail_after(60):
        async with Supervisor.open(more) as sup:
            await sup.wait()
    rows = [msgspec.json.decode(line) for line in (tmp_path / "metrics.jsonl").read_bytes().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 15))
    for key in ("rollout/replica_failovers", "rollout/replica_restarts"):  # resumed from the checkpoint, not from 0
        assert rows[12][key] >= counters_at(tmp_path, 12, key) >= rows[11][key]


def counters_at(output_dir: Path, step: int, key: str) -> int:
    """A replica counter as the checkpoint of `step` holds it."""
    state = checkpoint.load_state(output_dir / "checkpoints" / f"step-{step:08d}")
    return {"rollout/replica_failovers": state.replicas.failovers, "rollout/replica_restarts": state.replicas.restarts}[key]


# -- one weight push to every replica (NCCL plumbing over fake vLLM engines) ------------------------


class FakeReplicaLLM:
    """The AsyncLLM calls a push makes: pause/resume and worker RPCs, recorded; `fail` makes one raise."""

    def __init__(self, everyone: list[FakeReplicaLLM], fail: str = "") -> None:
        self.everyone = everyone
        self.fail = fail
        self.paused = False
        self.rpcs: list[tuple[str, tuple[Any, ...], bool]] = []  # method, args, every replica paused then
        everyone.append(self)

    async def pause_generation(self, mode: str, clear_cache: bool) -> None:
        await anyio.lowlevel.checkpoint()
        if self.fail == "pause":
            raise RuntimeError("engine core gone")
        self.paused = True

    async def resume_generation(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.paused = False

    async def collective_rpc(self, method: str, timeout: float, args: tuple[Any, ...]) -> list[Any]:
        self.rpcs.append((method, args, all(llm.paused for llm in self.everyone)))
        await anyio.lowlevel.checkpoint()
        if method == "ap_nccl_load" and self.fail == "load":
            raise RuntimeError("worker died")
        return [None]


class FakeFSDP:
    """The two calls a transport makes of the trainer: pack, and typed commands to rank 0."""

    def __init__(self) -> None:
        self.meta = [("w", [2, 2], 0, 4)]
        self.commands: list[Any] = []

    async def pack(self) -> list[tuple[str, list[int], int, int]]:
        return self.meta

    async def call(self, cmd: Any) -> list[Any]:
        from asyncpolicy.engines.training import fsdp_worker as w

        self.commands.append(cmd)
        await anyio.lowlevel.checkpoint()
        return [w.Reply(rank=0, ok=True)]


def _vllm_replicas(fails: dict[int, str], n: int = 3, tp: int = 2) -> tuple[ReplicatedGeneration, list[Any]]:
    from asyncpolicy.engines.generation.vllm import VLLMGenerationEngine, VLLMSettings

    everyone: list[FakeReplicaLLM] = []
    engines = []
    for k in range(n):
        eng = VLLMGenerationEngine(
            VLLMSettings(model_path="x", gpus=list(range(k * tp, k * tp + tp)), dummy_weights=True, stop_token_ids=[1], max_model_len=8)
        )
        eng._llm = FakeReplicaLLM(everyone, fails.get(k, ""))
        eng._abort = anyio.Event()
        eng._ready.set()
        eng.incarnation = 1
        engines.append(eng)
    return ReplicatedGeneration(engines, max_restarts=1), engines


def _sent(trainer: FakeFSDP, kind: str) -> list[Any]:
    return [c for c in trainer.commands if type(c).__name__ == kind]


@pytest.mark.anyio
async def test_one_nccl_group_and_one_broadcast_reach_every_replica() -> None:
    from asyncpolicy.engines.transport.cuda import NCCLTransport

    gen, engines = _vllm_replicas({})
    trainer = FakeFSDP()
    transport = NCCLTransport(gen, trainer)  # type: ignore[arg-type]
    await transport.stage(1)
    await transport.push(1)
    (init,) = _sent(trainer, "NcclInit")
    assert init.world_size == 1 + 3 * 2 and transport.rank_offsets == {0: 1, 1: 3, 2: 5}
    for k, eng in enumerate(engines):
        method, args, _ = eng.llm.rpcs[0]
        assert method == "ap_nccl_init" and args == ("127.0.0.1", init.port, 1 + 2 * k, 7)
        loads = [paused for m, _, paused in eng.llm.rpcs if m == "ap_nccl_load"]
        assert loads == [True], "a replica loaded weights while another still generated"
        assert not eng.llm.paused and eng.version == 1
    assert len(_sent(trainer, "NcclSend")) == 1 and gen.version == 1
    timing = transport.last
    assert timing is not None and [r.replica for r in timing.replicas] == [0, 1, 2]
    await transport.push(2)  # the same replicas: the group is kept, one more broadcast
    assert len(_sent(trainer, "NcclInit")) == 1 and len(_sent(trainer, "NcclSend")) == 2
    assert [e.version for e in engines] == [2, 2, 2]


@pytest.mark.anyio
@pytest.mark.parametrize("fail", ["pause", "load"])
async def test_a_replica_failing_its_push_leaves_every_other_one_resumed_and_the_retry_skips_it(fail: str) -> None:
    from asyncpolicy.engines.transport.cuda import NCCLTransport, ReplicaSyncError

    gen, engines = _vllm_replicas({1: fail})
    trainer = FakeFSDP()
    transport = NCCLTransport(gen, trainer)  # type: ignore[arg-type]
    with pytest.raises(ReplicaSyncError, match=r"failed on replica\(s\) 1: RuntimeError"):
        await transport.push(1)
    assert not any(e.llm.paused for e in engines), "a replica was left paused"
    assert [e.version for e in engines] == [0, 0, 0] and gen.version == 0
    assert gen.router.up == [True, False, True]  # out of routing; `serve` restarts it
    await transport.push(1)  # the synchronizer's retry: a new group of the replicas still up
    assert _sent(trainer, "NcclInit")[-1].world_size == 5 and transport.rank_offsets == {0: 1, 2: 3}
    assert [e.version for e in engines] == [1, 0, 1] and gen.version == 1
