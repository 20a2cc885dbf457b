"""The FSDP trainer over several nodes, on one machine: node 0 is this process's engine, node 1 a
`python -m asyncpolicy trainer-node` process, both over gloo on 127.0.0.1.

Two nodes × 1 rank train exactly as one node × 2 ranks; a node that never joins, or that dies,
fails the run with a message naming it, within trainer.worker_timeout_s; a full `run` with a
trainer-node finishes, both exit 0, and its checkpoint holds both ranks' shards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import torch

from asyncpolicy.config import load_config
from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine, WorkerDied
from asyncpolicy.errors import RunFailed
from asyncpolicy.bench.multinode import CPU_FSDP, LAYOUT_TRAIN, layout_batch, two_node_overrides

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The embedded model's directory; node 1 (a child process, same environment) resolves the same one."""
    from asyncpolicy.models.tiny import resolve_model_path

    monkeypatch.setenv("ASYNCPOLICY_CACHE", str(tmp_path / "cache"))
    return resolve_model_path(load_config())


def _start_node(overrides: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Node 1 as its own process (and process group, so a test can kill all of it)."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "asyncpolicy", "trainer-node", *overrides, "trainer.node_rank=1"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _dcp_weights(directory: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(directory), str(directory) + ".pt")
    return torch.load(str(directory) + ".pt", weights_only=False)["model"]


async def _train(eng: FSDPTrainEngine, out: Path) -> list[dict[str, float]]:
    await eng.start()
    try:
        rows = [await eng.train_step(layout_batch(s), s) for s in range(2)]
        await eng.save_state(str(out))
        return rows
    finally:
        await eng.aclose()


@pytest.mark.slow
async def test_two_nodes_of_one_rank_train_as_one_node_of_two(tmp_path: Path, model: str) -> None:
    one_cfg = load_config(overrides=[*CPU_FSDP, *LAYOUT_TRAIN])
    one = await _train(FSDPTrainEngine(w.WorkerInit(model_path=model, config=one_cfg), [None, None], timeout_s=120),
                       tmp_path / "one")

    port = w.free_port()
    overrides = two_node_overrides(port, 120)
    node = _start_node(overrides, tmp_path / "node1.log")
    try:
        cfg = load_config(overrides=overrides)
        two = await _train(FSDPTrainEngine(w.WorkerInit(model_path=model, config=cfg), [None], timeout_s=120),
                           tmp_path / "two")
        assert await anyio.to_thread.run_sync(node.wait, 60) == 0, (tmp_path / "node1.log").read_text()
    finally:
        node.kill()
    assert two[1]["losses/kl_ref"] > 0 and two[1]["is/mismatch_tokens"] > 0
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b)
        for key in a:
            if not key.startswith("perf/"):
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    assert sorted(p.name for p in (tmp_path / "two").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (tmp_path / "two" / w.SHARED_CHECK_FILE).exists()
    wa, wb = _dcp_weights(tmp_path / "one"), _dcp_weights(tmp_path / "two")
    assert set(wa) == set(wb) and wa
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-9), name


async def test_a_node_that_never_joins_fails_the_start_naming_it(model: str) -> None:
    """The start itself may take 120 s; the rendezvous gives up after worker_timeout_s and says who is missing."""
    port = w.free_port()
    cfg = load_config(overrides=two_node_overrides(port, 2))
    eng = FSDPTrainEngine(w.WorkerInit(model_path=model, config=cfg), [None], timeout_s=120,
                          start_timeout_s=120)
    try:
        with pytest.raises(WorkerDied) as info:
            await eng.start()
    finally:
        await eng.aclose()
    assert str(info.value) == (
        "FSDP worker rank 0 (node 0) failed during start:\n"
        f"trainer node(s) 1 (rank(s) 1) did not join the rendezvous at 127.0.0.1:{port} within "
        "trainer.worker_timeout_s=2s; start `python -m asyncpolicy trainer-node` with the run's config and "
        "trainer.node_rank=N on each of them"
    )


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
async def test_a_node_that_dies_fails_the_next_command_naming_it(tmp_path: Path, model: str) -> None:
    port = w.free_port()
    overrides = two_node_overrides(port, 60)
    node = _start_node(overrides, tmp_path / "node1.log")
    eng = FSDPTrainEngine(w.WorkerInit(model_path=model, config=load_config(overrides=overrides)), [None], timeout_s=60)
    try:
        await eng.start()
        await eng.train_step(layout_batch(0), 0)
        os.killpg(node.pid, signal.SIGKILL)  # the node's process and its rank, as a machine that goes down
        await anyio.to_thread.run_sync(node.wait)
        while not _gone(node.pid):  # its rank, reparented, is reaped once dead
            await anyio.sleep(0.05)
        with pytest.raises(WorkerDied, match=r"rank 0 \(node 0\) failed during Checksum:\n.*rank 1 \(node 1\) failed"):
            await eng.checksum()
        with pytest.raises(RunFailed, match="unusable"):
            await eng.checksum()
    finally:
        await eng.aclose()
        node.kill()
        node.wait()


@pytest.mark.slow
async def test_idle_nodes_outlive_the_worker_timeout(tmp_path: Path, model: str) -> None:
    """Node 1 bounds its wait for each command by worker_timeout_s; while the supervisor sends
    nothing (waiting for a batch), rank 0's pings keep it from giving up."""
    overrides = two_node_overrides(w.free_port(), 6)
    node = _start_node(overrides, tmp_path / "node1.log")
    eng = FSDPTrainEngine(w.WorkerInit(model_path=model, config=load_config(overrides=overrides)), [None], timeout_s=60)
    try:
        await eng.start()
        before = await eng.checksum()
        await anyio.sleep(3 * 6)  # idle for three timeouts
        assert await eng.checksum() == before
        assert node.poll() is None
    finally:
        await eng.aclose()
        assert await anyio.to_thread.run_sync(node.wait, 60) == 0, (tmp_path / "node1.log").read_text()[-3000:]


def _run_keys(port: int, steps: int) -> list[str]:
    return [*CPU_FSDP, "trainer.nnodes=2", f"trainer.master_port={port}", "trainer.worker_timeout_s=120",
            f"trainer.total_training_steps={steps}", "data.train_batch_size=4", "rollout.n=4",
            "async_training.max_queue_size=8", "progress=off", "seed=3"]


def _shards(out: Path) -> list[str]:
    engine = next(out.glob("checkpoints/step-*/engine"))
    return sorted(p.name for p in engine.glob("*.distcp"))


@pytest.mark.slow
def test_run_with_a_trainer_node_finishes_and_checkpoints_both_ranks(tmp_path: Path, model: str) -> None:
    """The launch path as documented: `run` on node 0, `trainer-node` on node 1, same config."""
    out = tmp_path / "run"
    keys = _run_keys(w.free_port(), 3)
    node = _start_node(keys, tmp_path / "node1.log")
    try:
        head = subprocess.run([sys.executable, "-m", "asyncpolicy", "run", *keys, f"output_dir={out}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert head.returncode == 0, head.stderr[-3000:]
        assert node.wait(60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        node.kill()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert _shards(out) == ["__0_0.distcp", "__1_0.distcp"]
    assert "trainer_node_finished" in (tmp_path / "node1.log").read_text()


@pytest.mark.slow
def test_ctrl_c_on_every_node_stops_with_a_checkpoint_of_both_ranks(tmp_path: Path, model: str) -> None:
    """srun and a terminal send SIGINT to every process of every node: node 0 writes its stop
    checkpoint (node 1's rank writes its shards), then Stop ends node 1 cleanly."""
    out = tmp_path / "run"
    keys = _run_keys(w.free_port(), 400)
    node = _start_node(keys, tmp_path / "node1.log")
    with open(tmp_path / "head.log", "wb") as log:
        head = subprocess.Popen([sys.executable, "-m", "asyncpolicy", "run", *keys, f"output_dir={out}"], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 300  # a bound on a broken run, not a speed target
        while not (metrics.exists() and metrics.read_text().strip()):
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.1)
        os.killpg(head.pid, signal.SIGINT)
        os.killpg(node.pid, signal.SIGINT)
        assert head.wait(300) == 130, (tmp_path / "head.log").read_text()[-3000:]
        assert node.wait(60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        head.kill()
        node.kill()
    assert _shards(out) == ["__0_0.distcp", "__1_0.distcp"]
    assert "trainer_node_signal" in (tmp_path / "node1.log").read_text()


def test_a_checkpoint_directory_a_rank_cannot_see_fails_the_command(tmp_path: Path) -> None:
    """Before DCP writes or reads shards, every rank must read back node 0's token from the directory."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        init = w.WorkerInit(model_path="", config=load_config())
        w._agree_directory_is_shared(init, dist, str(tmp_path), "")  # one node: no check
        with pytest.raises(RunFailed) as info:
            w._agree_directory_is_shared(init, dist, str(tmp_path), "token")  # nothing written there: another disk
        assert str(info.value) == (
            f"checkpoint directory {tmp_path} is not shared: node(s) 0 (rank(s) 0) do not see what node 0 wrote there; "
            "with trainer.nnodes > 1, output_dir (and a resume path) must be on a filesystem every node mounts at the same path"
        )
        (tmp_path / w.SHARED_CHECK_FILE).write_text("token")
        w._agree_directory_is_shared(init, dist, str(tmp_path), "token")
    finally:
        dist.destroy_process_group()
