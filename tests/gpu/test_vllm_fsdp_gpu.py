"""GPU tests of the vLLM + FSDP2 path (Qwen2.5-0.5B's shape, random weights). Skipped without
CUDA or vllm; run on a GPU machine with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    if importlib.util.find_spec("vllm") is None or shutil.which("nvidia-smi") is None:
        return 0
    import subprocess

    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU"))


needs_gpu = pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA GPU and vllm")
needs_2gpu = pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs and vllm")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from asyncpolicy.bench.gpu.model_dir import make_model_dir

    return make_model_dir(str(tmp_path_factory.mktemp("qwen05")), tokenizer=False)


async def _engines(model_dir: str, vllm_gpu: int, trainer_gpu: int):
    from asyncpolicy.config import load_config
    from asyncpolicy.engines.training import fsdp_worker as w
    from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
    from asyncpolicy.engines.generation.vllm import VLLMGenerationEngine, VLLMSettings

    gen = VLLMGenerationEngine(VLLMSettings(model_path=model_dir, gpus=[vllm_gpu], dummy_weights=True, stop_token_ids=[151645],
                                            max_model_len=1024, gpu_memory_utilization=0.3, enforce_eager=True))
    await gen.start()
    cfg = load_config(overrides=["model.gradient_checkpointing=true", "trainer.lr=1e-6", "trainer.warmup_steps=0", "trainer.micro_batch_size=8"])
    base = w.WorkerInit(model_path=model_dir, config=cfg)
    trainer = FSDPTrainEngine(base, [trainer_gpu], timeout_s=300)
    await trainer.start()
    return gen, trainer


async def _check_sync(gen, trainer, transport) -> None:
    from asyncpolicy.engines.protocols import GenerationRequest

    before = (await gen.rpc("ap_checksum"))[0]
    await transport.push(1)
    after = (await gen.rpc("ap_checksum"))[0]
    want = await trainer.checksum()
    assert after == pytest.approx(want, rel=1e-9) and before != pytest.approx(want, rel=1e-6)
    assert transport.last.pause_to_resume_s < 5.0
    res = await gen.generate(GenerationRequest(request_id="x", prompt_tokens=[1, 2, 3], max_tokens=16))
    assert res.token_versions == [1] * len(res.response_tokens)
    assert len(res.behaviour_logprobs) == len(res.response_tokens) and all(lp <= 0 for lp in res.behaviour_logprobs)


@needs_gpu
@pytest.mark.anyio
async def test_colocated_ipc_sync_loads_the_trainer_weights(model_dir) -> None:
    from asyncpolicy.engines.transport.cuda import IPCTransport

    gen, trainer = await _engines(model_dir, 0, 0)
    try:
        await _check_sync(gen, trainer, IPCTransport(gen, trainer))
    finally:
        await trainer.aclose()
        await gen.aclose()


@needs_2gpu
@pytest.mark.anyio
async def test_nccl_sync_across_two_gpus_loads_the_trainer_weights(model_dir) -> None:
    from asyncpolicy.engines.transport.cuda import NCCLTransport

    gen, trainer = await _engines(model_dir, 0, 1)
    try:
        await _check_sync(gen, trainer, NCCLTransport(gen, trainer))
    finally:
        await trainer.aclose()
        await gen.aclose()
