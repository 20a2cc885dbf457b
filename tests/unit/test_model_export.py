"""A checkpoint's model/ is a Hugging Face model: `export` copies it out, `from_pretrained` loads it, and
its logits are the trainer's — for the CPU trainer and for FSDP ranks over gloo."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from asyncpolicy import checkpoint
from asyncpolicy.config import load_config
from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.engines.sets.hf_torch import build_hf_torch_engines
from asyncpolicy.errors import ConfigError
from asyncpolicy.models import tiny
from asyncpolicy.samples import Prompt, Sample, Trajectory, make_sample

pytestmark = pytest.mark.anyio
IDS = torch.tensor([[1, 5, 9, 12, 3, 40, 7, 2, 30, 11]])  # (1, T) tokens of the embedded vocabulary


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def model_path(model_cache: Path) -> str:
    return str(tiny.ensure_embedded())


def batch(seed: int) -> list[Sample]:
    """Random responses with spread rewards: a step moves the weights."""
    rng = random.Random(seed)
    out = []
    for i in range(3):
        prompt = Prompt(index=i, epoch=0, text="", tokens=[1] + [rng.randrange(3, 40) for _ in range(4)])
        trajs = []
        for _ in range(3):
            n = rng.randint(1, 6)
            toks = [rng.randrange(3, 40) for _ in range(n)]
            trajs.append(Trajectory(response_tokens=toks, behaviour_logprobs=[-3.5] * n, token_versions=[0] * n,
                                    finish_reason="stop", reward=rng.random()))
        out.append(make_sample(prompt, trajs, 0))
    return out


def hf_logits(directory: Path | str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(directory)  # the tokenizer files are there and load
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def export(ckpt: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncpolicy", "export", str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=120, check=False)


async def test_torch_trainer_checkpoint_exports_its_model(model_path: str, tmp_path: Path) -> None:
    cfg = load_config(overrides=["trainer.threads=1", "trainer.lr=1e-2", f"model.path={model_path}"])
    trainer = build_hf_torch_engines(cfg).trainer
    await trainer.start()
    before = hf_logits(model_path)
    for step in range(2):
        await trainer.train_step(batch(step), step)
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    await trainer.save_model(str(ckpt / checkpoint.MODEL_DIR))
    (ckpt / checkpoint.COMPLETE_MARKER).write_text("2\n")
    with torch.no_grad():
        expected = trainer.model.eval()(IDS).logits

    done = export(tmp_path, tmp_path / "exported")  # a run directory: its latest checkpoint
    assert done.returncode == 0, done.stderr
    got = hf_logits(tmp_path / "exported")
    assert not torch.allclose(got, before)  # trained: not the initial model
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.slow
async def test_fsdp_checkpoint_exports_the_gathered_model(model_path: str, tmp_path: Path) -> None:
    """Two gloo ranks: model/ (gathered on rank 0) equals the sharded DCP weights of the same checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    cfg = load_config(overrides=["trainer.lr=1e-2", "trainer.warmup_steps=0", "trainer.micro_batch_size=2"])
    base = w.WorkerInit(model_path=model_path, config=cfg)
    eng = FSDPTrainEngine(base, [None, None], timeout_s=300)
    await eng.start()
    ckpt = tmp_path / "step-00000002"
    try:
        for step in range(2):
            await eng.train_step(batch(step), step)
        await eng.save_state(str(ckpt / checkpoint.ENGINE_DIR))
        await eng.save_model(str(ckpt / checkpoint.MODEL_DIR))
    finally:
        await eng.aclose()
    (ckpt / checkpoint.COMPLETE_MARKER).write_text("2\n")

    # the trainer's own weights, read back from every rank's shards (no gather involved)
    dcp_to_torch_save(str(ckpt / checkpoint.ENGINE_DIR), str(tmp_path / "full.pt"))
    shards = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    trainer_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    before = trainer_model(IDS).logits.detach()
    trainer_model.load_state_dict({k.removeprefix("model."): v for k, v in shards.items()})
    with torch.no_grad():
        expected = trainer_model(IDS).logits

    done = export(ckpt, tmp_path / "exported")
    assert done.returncode == 0, done.stderr
    got = hf_logits(tmp_path / "exported")
    assert not torch.allclose(got, before)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_export_refuses_what_is_not_a_model(tmp_path: Path) -> None:
    """Bad paths: exit 2, one line naming the path, nothing written."""
    cases = []
    cases.append((export(tmp_path / "missing", tmp_path / "o1"), "missing"))
    (tmp_path / "run" / "checkpoints" / "step-00000001").mkdir(parents=True)  # never completed
    cases.append((export(tmp_path / "run", tmp_path / "o2"), "run"))
    sim = tmp_path / "sim"
    (sim / "engine").mkdir(parents=True)
    (sim / checkpoint.COMPLETE_MARKER).write_text("1\n")  # complete, but a simulated run: no model
    cases.append((export(sim, tmp_path / "o3"), "no Hugging Face model"))
    for proc, named in cases:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("asyncpolicy: error: ") and named in proc.stderr
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_export_never_overwrites(tmp_path: Path) -> None:
    model = tmp_path / "ckpt" / checkpoint.MODEL_DIR
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x")
    (tmp_path / "ckpt" / checkpoint.COMPLETE_MARKER).write_text("1\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="OUT_DIR .* not empty"):
        checkpoint.export_model(tmp_path / "ckpt", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
