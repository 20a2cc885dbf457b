"""FSDPTrainEngine's command protocol against fake ranks (real processes speaking the real messages):
a cancelled wait does not poison the engine; a failure found while draining does."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncpolicy.config import load_config
from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine, WorkerDied
from asyncpolicy.errors import RunFailed

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def fake_rank(conn: Any, rank: int, gate: str, fail_pack: bool, die_on_pack: bool) -> None:
    """Answers every command; holds Pack until `gate` exists, announcing it by `gate`.held (or dies
    on it with exit code 3)."""
    while True:
        try:
            cmd = w._cmd_decoder.decode(conn.recv_bytes())
        except EOFError:
            return
        if isinstance(cmd, w.Pack) and die_on_pack:
            os._exit(3)
        if isinstance(cmd, w.Pack):
            open(gate + ".held", "w").close()
            while not os.path.exists(gate):
                time.sleep(0.01)
            reply = w.Reply(rank=rank, ok=not fail_pack, error="pack exploded" if fail_pack else "", value=1.0)
        else:
            reply = w.Reply(rank=rank, ok=True, value=2.0 if isinstance(cmd, w.Checksum) else 0.0)
        conn.send_bytes(w.encode(reply))
        if isinstance(cmd, w.Stop):
            return


def engine_with_fake_ranks(tmp_path: Path, fail_pack: bool, dying_rank: int | None = None) -> tuple[FSDPTrainEngine, Path]:
    base = w.WorkerInit(model_path=str(tmp_path), config=load_config())
    eng = FSDPTrainEngine(base, [None, None], timeout_s=120)
    ctx = multiprocessing.get_context("spawn")
    gate = tmp_path / "gate"
    for rank in range(2):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=fake_rank, args=(child, rank, str(gate), fail_pack, rank == dying_rank), daemon=True)
        proc.start()
        child.close()
        eng._procs.append(proc)
        eng._conns.append(parent)
    return eng, gate


async def cancel_pack_once_held(eng: FSDPTrainEngine, gate: Path) -> None:
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(eng.call, w.Pack())
            while not Path(str(gate) + ".held").exists():  # the rank is inside the command now
                await anyio.sleep(0.01)
            scope.cancel()
    assert scope.cancelled_caught


async def test_a_cancelled_command_is_drained_and_the_engine_stays_usable(tmp_path: Path) -> None:
    eng, gate = engine_with_fake_ranks(tmp_path, fail_pack=False)
    try:
        await cancel_pack_once_held(eng, gate)
        gate.touch()
        replies = await eng.call(w.Checksum())  # Pack's replies are drained first, not mistaken for these
        assert [r.value for r in replies] == [2.0, 2.0]
        assert await eng.checksum() == 2.0
    finally:
        await eng.aclose()


async def test_a_failure_found_while_draining_fails_the_next_command(tmp_path: Path) -> None:
    eng, gate = engine_with_fake_ranks(tmp_path, fail_pack=True)
    try:
        await cancel_pack_once_held(eng, gate)
        gate.touch()
        with pytest.raises(WorkerDied, match="failed during Pack:\npack exploded"):
            await eng.call(w.Checksum())
        with pytest.raises(RunFailed, match="unusable"):
            await eng.call(w.Checksum())
    finally:
        await eng.aclose()


async def test_a_cancelled_wait_lets_go_of_the_pipes_before_any_reply(tmp_path: Path) -> None:
    """The collecting thread of a cancelled call is woken by the cancellation itself: it lets go of
    the pipes while the ranks still hold the command (no reply, no deadline has woken it)."""
    eng, gate = engine_with_fake_ranks(tmp_path, fail_pack=False)
    try:
        await cancel_pack_once_held(eng, gate)
        pending = eng._pending
        assert pending is not None
        released = await anyio.to_thread.run_sync(pending.reader.acquire, True, 60)  # 60 s: a hang guard
        assert released, "the cancelled collector still holds the pipes"
        pending.reader.release()
        assert pending.replies == [None, None] and not gate.exists()  # woken by the cancellation, not a reply
        gate.touch()
        assert await eng.checksum() == 2.0
    finally:
        await eng.aclose()


async def test_a_rank_that_dies_fails_the_command_while_the_others_still_work(tmp_path: Path) -> None:
    """A dead rank is seen through its process sentinel as it dies: the call fails naming it and its
    exit code before the other rank answered and long before the command's deadline."""
    eng, gate = engine_with_fake_ranks(tmp_path, fail_pack=False, dying_rank=0)
    try:
        with anyio.fail_after(60):  # a hang guard, half the engine's 120 s deadline
            with pytest.raises(WorkerDied, match=r"rank 0 died \(exit code 3\)"):
                await eng.call(w.Pack())
        assert not gate.exists() and eng._procs[1].is_alive()  # rank 1 is still inside Pack
    finally:
        gate.touch()
        await eng.aclose()
