"""Channel overhead: our VersionedChannel vs a bare asyncio.Queue (the floor) vs a Ray actor queue.

All three run side by side in one process and one event loop, interleaved over several rounds
(medians reported), so CPU noise hits them alike. Two measurements each:

* throughput: one producer puts N items as fast as it can, one consumer gets them one by one,
  capacity `CAPACITY` — items/s from the first put to the last get;
* latency: ping-pong, one item in flight — put→get time as the consumer sees it (p50/p99).

The Ray queue is built like the seed system's MessageQueue: an async Ray actor holding a deque
guarded by an asyncio.Condition, one remote call per sample for put and for get. Ray is an
optional, bench-only dependency; without it that column is skipped with a note.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import structlog

from asyncpolicy.bench.common import (
    BenchContext,
    Figure,
    SuiteResult,
    Table,
    check,
    percentile,
    scenario_log,
    write_log_record,
)
from asyncpolicy.bench.plots import new_figure, save
from asyncpolicy.channels import VersionedChannel

log = structlog.get_logger("asyncpolicy.bench.channel")

CAPACITY = 1000
TARGET_VS_BARE = 0.5
TARGET_VS_RAY = 100.0


def _sizes(ctx: BenchContext) -> dict[str, int]:
    if ctx.quick:
        return {"n": 30_000, "ping": 3_000, "rounds": 2, "ray_n": 300, "ray_ping": 100}
    return {"n": 200_000, "ping": 20_000, "rounds": 3, "ray_n": 1_000, "ray_ping": 300}


class Endpoints:
    """A queue under test, reduced to the two calls the benchmark makes."""

    def __init__(self, name: str, put: Callable[[Any], Awaitable[Any]], get: Callable[[], Awaitable[Any]]) -> None:
        self.name = name
        self.put = put
        self.get = get


def bare_queue() -> Endpoints:
    q: asyncio.Queue[Any] = asyncio.Queue(maxsize=CAPACITY)
    return Endpoints("asyncio.Queue", q.put, q.get)


def anyio_stream() -> Endpoints:
    """anyio's memory object stream: the structured-concurrency reference (it checkpoints on every call)."""
    send, receive = anyio.create_memory_object_stream[Any](CAPACITY)
    return Endpoints("anyio memory stream", send.send, receive.receive)


def versioned_channel() -> Endpoints:
    ch: VersionedChannel[Any] = VersionedChannel(CAPACITY, max_staleness=1, name="bench")
    return Endpoints("VersionedChannel", lambda item: ch.put(item, 0), lambda: ch.get(0))


async def throughput(ep: Endpoints, n: int) -> float:
    """Items per second through `ep` with a free-running producer and a one-at-a-time consumer."""
    started = time.perf_counter()

    async def produce() -> None:
        for i in range(n):
            await ep.put(i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        for _ in range(n):
            await ep.get()
    return n / (time.perf_counter() - started)


async def batch_throughput(n: int, batch: int) -> float:
    """Items per second when the consumer takes `batch` at a time (how the trainer reads)."""
    ch: VersionedChannel[Any] = VersionedChannel(CAPACITY, max_staleness=1, name="bench")
    started = time.perf_counter()

    async def produce() -> None:
        for i in range(n):
            await ch.put(i, 0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        for _ in range(n // batch):
            await ch.get_batch(batch, 0)
    return n // batch * batch / (time.perf_counter() - started)


async def ping_pong(ep: Endpoints, n: int) -> list[float]:
    """put→get latencies (seconds) with one item in flight; the acknowledgement is outside the timing."""
    latencies: list[float] = []
    acked = anyio.Event()

    async def consume() -> None:
        nonlocal acked
        for _ in range(n):
            sent = await ep.get()
            latencies.append(time.perf_counter() - sent)
            acked.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        for _ in range(n):
            acked = anyio.Event()
            waiting = acked
            await ep.put(time.perf_counter())
            await waiting.wait()
    return latencies


# -- the Ray queue -----------------------------------------------------------------------------


class SeedMessageQueue:
    """The seed's MessageQueue shape: a deque behind an asyncio.Condition, served as an async Ray actor."""

    def __init__(self, max_queue_size: int) -> None:
        self.max_queue_size = max_queue_size
        self.queue: deque[tuple[Any, int]] = deque()
        self.cond = asyncio.Condition()
        self.dropped = 0

    async def put_sample(self, sample: Any, param_version: int) -> bool:
        async with self.cond:
            if len(self.queue) >= self.max_queue_size:  # the seed drops the oldest when full
                self.queue.popleft()
                self.dropped += 1
            self.queue.append((sample, param_version))
            self.cond.notify_all()
        return True

    async def get_sample(self) -> Any:
        async with self.cond:
            while not self.queue:
                await self.cond.wait()
            return self.queue.popleft()[0]


async def _ray_rows(ctx: BenchContext, sizes: dict[str, int]) -> tuple[float, list[float], float] | str:
    """(items/s, latencies, our items/s measured just before and after) through a Ray actor queue, or why not.

    Ours is measured again beside the Ray run, with Ray's processes up: the ratio then compares
    the two under the same machine load.
    """
    try:
        import ray
    except ImportError:
        return "ray is not installed (pip install ray; it is an optional, bench-only dependency)"
    await anyio.to_thread.run_sync(
        lambda: ray.init(num_cpus=ctx.machine.cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    )
    try:
        # Capacity above N: the seed's queue drops the oldest when full, which would lose items here.
        actor = ray.remote(SeedMessageQueue).remote(sizes["ray_n"] + 1)
        await actor.put_sample.remote(None, 0)  # the actor is up before the clock starts
        await actor.get_sample.remote()
        ep = Endpoints("Ray actor queue", lambda item: actor.put_sample.remote(item, 0), lambda: actor.get_sample.remote())
        ours_before = await throughput(versioned_channel(), sizes["n"] // 10)
        rate = await throughput(ep, sizes["ray_n"])
        ours_after = await throughput(versioned_channel(), sizes["n"] // 10)
        lat = await ping_pong(ep, sizes["ray_ping"])
        return rate, lat, (ours_before + ours_after) / 2
    finally:
        await anyio.to_thread.run_sync(ray.shutdown)


# -- the suite ---------------------------------------------------------------------------------


async def run(ctx: BenchContext) -> SuiteResult:
    sizes = _sizes(ctx)
    rates: dict[str, list[float]] = {"asyncio.Queue": [], "anyio memory stream": [], "VersionedChannel": [], "VersionedChannel get_batch(8)": []}
    lats: dict[str, list[float]] = {"asyncio.Queue": [], "anyio memory stream": [], "VersionedChannel": []}
    with scenario_log(ctx, "channel_local", sizes=sizes, capacity=CAPACITY) as logf:
        for rnd in range(sizes["rounds"]):  # interleaved, so drift hits every queue alike
            for make in (bare_queue, anyio_stream, versioned_channel):
                ep = make()
                rates[ep.name].append(await throughput(ep, sizes["n"]))
                lats[ep.name] += await ping_pong(make(), sizes["ping"])
            rates["VersionedChannel get_batch(8)"].append(await batch_throughput(sizes["n"], 8))
            write_log_record(logf, "bench_channel_round", {"round": rnd, "items_per_s": {k: v[-1] for k, v in rates.items()}})
    with scenario_log(ctx, "channel_ray", sizes={"n": sizes["ray_n"], "ping": sizes["ray_ping"]}) as logf:
        ray = await _ray_rows(ctx, sizes)
        write_log_record(logf, "bench_channel_ray", {"result": ray if isinstance(ray, str) else {"items_per_s": ray[0], "ours_beside": ray[2]}})
    rate = {k: statistics.median(v) for k, v in rates.items()}
    res = _result(ctx, rate, lats, ray)
    res.tables.append(
        Table(
            title="Where the time of a put and a get goes (µs per call, no contention)",
            columns=["operation", "µs per call"],
            rows=await cost_breakdown(20_000),
            note="Each row is timed alone in a loop in the same event loop; the parts add up to roughly the whole calls.",
        )
    )
    if rate["VersionedChannel"] < TARGET_VS_BARE * rate["asyncio.Queue"]:
        res.notes.append(await _profile(ctx, sizes["n"] // 4))
    return res


async def _profile(ctx: BenchContext, n: int) -> str:
    """cProfile of our channel's throughput run, by cumulative time, into channel_profile.log."""
    prof = cProfile.Profile()
    prof.enable()
    await throughput(versioned_channel(), n)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    (ctx.out_dir / "channel_profile.log").write_text(f"# {ctx.command}\n# {ctx.machine.describe()}\n{buf.getvalue()}")
    return "VersionedChannel misses 0.5× asyncio.Queue: channel_profile.log holds a cProfile of its throughput run; the cost table above splits a put and a get into their parts."


async def cost_breakdown(n: int) -> list[list[Any]]:
    """Microseconds per call of each part of a put and a get, next to asyncio.Queue's whole put+get."""
    ch: VersionedChannel[Any] = VersionedChannel(n + 1, max_staleness=1, name="bench")
    q: asyncio.Queue[Any] = asyncio.Queue()

    async def timed(label: str, op: Callable[[], Awaitable[Any]] | Callable[[], Any], is_async: bool) -> list[Any]:
        t = time.perf_counter()
        for _ in range(n):
            if is_async:
                await op()
            else:
                op()
        return [label, (time.perf_counter() - t) / n * 1e6]

    def fail_after_none() -> None:
        with anyio.fail_after(None):  # noqa: ASYNC100  (the scope itself is what is timed)
            pass

    rows = [
        await timed("asyncio.Queue: await put + await get (the floor)", lambda: _bare_pair(q), True),
        await timed("VersionedChannel: await put(item, 0)", lambda: ch.put(0, 0), True),
        await timed("VersionedChannel: await get(0)", lambda: ch.get(0), True),
        await timed("VersionedChannel: put_nowait(item, 0)", lambda: ch.put_nowait(0, 0), False),
        await timed("VersionedChannel: get_nowait(0)", lambda: ch.get_nowait(0), False),
        await timed("anyio.lowlevel.checkpoint_if_cancelled() (in put and in get)", anyio.lowlevel.checkpoint_if_cancelled, True),
        await timed("with anyio.fail_after(None): pass (in get_batch)", fail_after_none, False),
    ]
    return rows


async def _bare_pair(q: asyncio.Queue[Any]) -> None:
    await q.put(0)
    await q.get()


def _result(
    ctx: BenchContext, rate: dict[str, float], lats: dict[str, list[float]], ray: tuple[float, list[float], float] | str
) -> SuiteResult:
    res = SuiteResult(suite="channel", title="Channel overhead")
    rows = []
    for name, r in rate.items():
        lat = lats.get(name, [])
        rows.append([name, r, r / rate["asyncio.Queue"], percentile(lat, 50) * 1e6, percentile(lat, 99) * 1e6])
    if isinstance(ray, str):
        res.notes.append(f"Ray actor queue not measured: {ray}.")
        ray_rate, ours_beside = None, None
    else:
        ray_rate, ray_lat, ours_beside = ray
        rows.append(["Ray actor queue (seed MessageQueue shape)", ray_rate, ray_rate / rate["asyncio.Queue"], percentile(ray_lat, 50) * 1e6, percentile(ray_lat, 99) * 1e6])
    res.tables.append(
        Table(
            title="Items/s and put→get latency, side by side in one process",
            columns=["queue", "items/s", "× asyncio.Queue", "p50 latency µs", "p99 latency µs"],
            rows=rows,
            note=f"capacity {CAPACITY}; throughput: free-running producer, one consumer; latency: ping-pong with one item in flight. Medians of interleaved rounds.",
        )
    )
    ours, bare = rate["VersionedChannel"], rate["asyncio.Queue"]
    res.figures.append(
        Figure(suite="channel", name="VersionedChannel / asyncio.Queue items/s", value=ours / bare, unit="×", target=f">= {TARGET_VS_BARE}", met=check(ours / bare, ">=", TARGET_VS_BARE), note=f"{ours:,.0f} vs {bare:,.0f} items/s")
    )
    res.figures.append(
        Figure(
            suite="channel",
            name="VersionedChannel / Ray actor queue items/s",
            value=ours_beside / ray_rate if ray_rate and ours_beside else None,
            unit="×",
            target=f">= {TARGET_VS_RAY:g}",
            met=check(ours_beside / ray_rate, ">=", TARGET_VS_RAY) if ray_rate and ours_beside else None,
            note=f"{ours_beside:,.0f} vs {ray_rate:,.0f} items/s, ours measured just before and after the Ray run" if ray_rate and ours_beside else "ray not installed",
        )
    )
    res.figures.append(Figure(suite="channel", name="VersionedChannel put→get p99", value=percentile(lats["VersionedChannel"], 99) * 1e6, unit="µs"))
    res.plots.append(_plot(ctx, rows))
    return res


def _plot(ctx: BenchContext, rows: list[list[Any]]) -> str:
    fig, axes = new_figure(1, 1, width=7.0)
    ax = axes[0][0]
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("items/s (log scale)")
    ax.set_title("channel throughput, one process")
    return save(fig, ctx.out_dir, "channel", ctx.caption())
