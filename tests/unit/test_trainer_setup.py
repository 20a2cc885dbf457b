"""One trainer set-up for the CPU trainer and an FSDP rank: the same settings take effect in both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from asyncpolicy.bench.synthetic import random_batch
from asyncpolicy.config import load_config
from asyncpolicy.engines.training import fsdp_worker as w
from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
from asyncpolicy.engines.training.torch_trainer import TorchTrainEngine
from asyncpolicy.engines.training.setup import padding_id
from asyncpolicy.models import tiny


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _model_dir_without_a_pad_id(target: Path) -> str:
    """The embedded model, with no pad_token_id in its config and a tokenizer that pads with <eos>:
    where the trainers' pad ids once came from different places (tokenizer vs model config)."""
    shutil.copytree(tiny.ensure_embedded(), target)
    config = json.loads((target / "config.json").read_text())
    config.pop("pad_token_id", None)
    (target / "config.json").write_text(json.dumps(config))
    tokenizer = tiny.load_tokenizer(str(target))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(target)
    assert tiny.load_tokenizer(str(target)).pad_token_id != 0
    return str(target)


@pytest.mark.anyio
async def test_the_cpu_trainer_and_an_fsdp_rank_are_set_up_alike(tmp_path, model_cache) -> None:
    """Gradient checkpointing, the reference, dtype, attention, threads, the pad id and the optimizer
    come out the same in both trainers, and so does a step trained with recomputation on."""
    path = _model_dir_without_a_pad_id(tmp_path / "model")
    cfg = load_config(overrides=[
        "model.gradient_checkpointing=true", "algorithm.kl_coef=0.1", "model.dtype=float64", "trainer.threads=1",
        "trainer.micro_batch_size=2", "trainer.lr=1e-3", "trainer.warmup_steps=2", "data.train_batch_size=3", "rollout.n=3",
    ])
    cpu = TorchTrainEngine(cfg, path, tiny.load_tokenizer(path))
    await cpu.start()
    fsdp = FSDPTrainEngine(w.WorkerInit(model_path=path, config=cfg), [None], timeout_s=120)
    try:
        await fsdp.start()
        batch = random_batch(0, tokens=range(40), versions=(0, 1))
        a, b = await cpu.train_step(batch, 1), await fsdp.train_step(batch, 1)
    finally:
        await fsdp.aclose()
        await cpu.aclose()
    assert cpu.summary is not None and cpu.summary == fsdp.summary
    s = cpu.summary
    assert s.gradient_checkpointing and s.reference and s.dtype == "float64" and s.threads == 1
    assert s.pad_id == 0  # the model config has none: 0, not the tokenizer's <eos>
    assert 0 < s.lr < 1e-3  # the warm-up's first value
    assert set(a) == set(b)
    for key in a:
        if not key.startswith("perf/"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key


def test_the_pad_id_is_the_model_configs_or_0() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def model(pad: int | None) -> Qwen2ForCausalLM:
        config = Qwen2Config(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, pad_token_id=pad)
        with torch.random.fork_rng():
            return Qwen2ForCausalLM(config)

    assert [padding_id(model(p)) for p in (7, None)] == [7, 0]
