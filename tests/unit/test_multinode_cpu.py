"""The FSDP trainer over several nodes, on one machine: node 0 is this process's engine, node 1 a
`python -m asyncpolicy trainer-node` process, both over gloo on 127.0.0.1.

Two nodes × 1 rank train exactly as one node × 2 ranks; a node that never joins, or that dies,
fails the run with a message naming it, within trainer.worker_timeout_s; a full `run` with a
trainer-node finishes, both exit 0, and its checkpoint holds both ranks' shards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import torch

from asyncpolicy.config import Config, load_config
from asyncpolicy.engines import fsdp_worker as w
from asyncpolicy.engines.fsdp_trainer import FSDPTrainEngine, WorkerDied
from asyncpolicy.errors import RunFailed
from asyncpolicy.samples import Prompt, Sample, Trajectory, make_sample

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]
CPU_FSDP = ["rollout.engine=hf", "trainer.engine=fsdp", "trainer.n_gpus_per_node=0"]
TRAIN = ["trainer.threads=1", "trainer.micro_batch_size=2", "trainer.lr=1e-2", "trainer.warmup_steps=0",
         "data.train_batch_size=3", "rollout.n=3", "async_training.require_batches=3", "algorithm.kl_coef=0.1"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _tiny_model(directory: Path) -> str:
    """A config-only Qwen2 directory: the same seeded random weights on every rank."""
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 200,
        "max_position_embeddings": 64, "tie_word_embeddings": True,
    }))
    return str(directory)


def _batch(seed: int) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(3):
        prompt = Prompt(index=i, epoch=0, text="", tokens=[rng.randrange(200) for _ in range(4)])
        trajs = []
        for _ in range(3):
            n = rng.randint(1, 6)
            trajs.append(Trajectory(response_tokens=[rng.randrange(200) for _ in range(n)],
                                    behaviour_logprobs=[rng.uniform(-5.0, -3.0) for _ in range(n)],
                                    token_versions=[rng.choice((0, 1)) for _ in range(n)], finish_reason="stop",
                                    reward=rng.random()))
        out.append(make_sample(prompt, trajs, 0))
    return out


def _two_node_config(port: int, timeout_s: float, *extra: str) -> list[str]:
    return [*CPU_FSDP, *TRAIN, "trainer.nnodes=2", f"trainer.master_port={port}",
            f"trainer.worker_timeout_s={timeout_s}", *extra]


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
        rows = [await eng.train_step(_batch(s), s) for s in range(2)]
        await eng.save_state(str(out))
        return rows
    finally:
        await eng.aclose()


@pytest.mark.slow
async def test_two_nodes_of_one_rank_train_as_one_node_of_two(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path)
    one_cfg = load_config(overrides=[*CPU_FSDP, *TRAIN])
    one = await _train(FSDPTrainEngine(w.WorkerInit(model_path=model, config=one_cfg), [None, None], timeout_s=120),
                       tmp_path / "one")

    port = w.free_port()
    overrides = _two_node_config(port, 120, f"model.path={model}")
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
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert sorted(p.name for p in (tmp_path / "two").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (tmp_path / "two" / w.SHARED_CHECK_FILE).exists()
    wa, wb = _dcp_weights(tmp_path / "one"), _dcp_weights(tmp_path / "two")
    assert set(wa) == set(wb) and wa
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-4, atol=1e-6), name


async def test_a_node_that_never_joins_fails_the_start_naming_it(tmp_path: Path) -> None:
    """The start itself may take 120 s; the rendezvous gives up after worker_timeout_s and says who is missing."""
    port = w.free_port()
    cfg = load_config(overrides=_two_node_config(port, 2))
    eng = FSDPTrainEngine(w.WorkerInit(model_path=_tiny_model(tmp_path), config=cfg), [None], timeout_s=120,
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
async def test_a_node_that_dies_fails_the_next_command_naming_it(tmp_path: Path) -> None:
    port = w.free_port()
    model = _tiny_model(tmp_path)
    overrides = _two_node_config(port, 60, f"model.path={model}")
    node = _start_node(overrides, tmp_path / "node1.log")
    eng = FSDPTrainEngine(w.WorkerInit(model_path=model, config=load_config(overrides=overrides)), [None], timeout_s=60)
    try:
        await eng.start()
        await eng.train_step(_batch(0), 0)
        os.killpg(node.pid, signal.SIGKILL)  # the node's process and its rank, as a machine that goes down
        while not _gone(node.pid):
            await anyio.sleep(0.05)
        with pytest.raises(WorkerDied, match=r"rank 0 \(node 0\) failed during Checksum:\n.*rank 1 \(node 1\) failed"):
            await eng.checksum()
        with pytest.raises(RunFailed, match="unusable"):
            await eng.checksum()
    finally:
        await eng.aclose()
        node.kill()
        node.wait()


def _config_keys(cfg: Config) -> tuple[int, int, str, int]:
    t = cfg.trainer
    return t.nnodes, t.node_rank, t.master_addr, t.master_port


@pytest.mark.slow
def test_run_with_a_trainer_node_finishes_and_checkpoints_both_ranks(tmp_path: Path) -> None:
    """The launch path as documented: `run` on node 0, `trainer-node` on node 1, same config."""
    port = w.free_port()
    out = tmp_path / "run"
    keys = [*CPU_FSDP, "trainer.nnodes=2", f"trainer.master_port={port}", "trainer.worker_timeout_s=120",
            "trainer.total_training_steps=3", "data.train_batch_size=4", "rollout.n=4", "async_training.max_queue_size=8",
            "progress=off", "seed=3"]
    assert _config_keys(load_config(overrides=keys)) == (2, 0, "127.0.0.1", port)
    node = _start_node(keys, tmp_path / "node1.log")
    try:
        head = subprocess.run([sys.executable, "-m", "asyncpolicy", "run", *keys, f"output_dir={out}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert head.returncode == 0, head.stderr[-3000:]
        assert node.wait(60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        node.kill()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    engine = next(out.glob("checkpoints/step-*/engine"))
    assert sorted(p.name for p in engine.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert "trainer_node_finished" in (tmp_path / "node1.log").read_text()
