"""GPU checks of the trainer's throughput choices that the CPU cannot make (torch + CUDA only, no vLLM).
Run on a GPU machine with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import pytest
import torch

from asyncpolicy.config import load_config
from asyncpolicy.engines.training.step import head_logprobs, make_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_optimizer_takes_adamw_fused_kernel_on_cuda() -> None:
    params = [torch.nn.Parameter(torch.randn(8, 8, device="cuda"))]
    opt = make_optimizer(params, load_config(overrides=[]))
    assert opt.defaults["fused"] is True


def test_the_compiled_head_on_bf16_logits_gives_the_eager_fp32_maths() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(300, 151936, device="cuda") * 3).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 151936, (300,), device="cuda")
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for fn in (head_logprobs, torch.compile(head_logprobs)):
        logits.grad = None
        lp, ent = fn(logits, targets, 0.7, True)
        lp.sum().backward()
        assert logits.grad is not None
        out.append((lp.detach(), ent, logits.grad.float()))
    (lp0, ent0, g0), (lp1, ent1, g1) = out
    assert lp1.dtype == torch.float32
    assert torch.allclose(lp0, lp1, atol=1e-4) and torch.allclose(ent0, ent1, atol=1e-4)
    assert torch.allclose(g0, g1, atol=1e-3)
