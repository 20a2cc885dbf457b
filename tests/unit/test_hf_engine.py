"""The HF generation engine: exact logprobs, aborts at token boundaries, continuation, batching, a free event loop."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from asyncpolicy.config import AlgorithmConfig, load_config
from asyncpolicy.engines.generation.hf import HFGenerationEngine, sampling_distribution
from asyncpolicy.engines.protocols import GenerationEngine, GenerationRequest, GenerationResult
from asyncpolicy.engines.training.step import collate, token_logprobs
from asyncpolicy.models import tiny
from asyncpolicy.samples import Prompt, Trajectory, make_sample

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def model_path(model_cache: Path) -> str:
    return tiny.resolve_model_path(load_config())


async def started(path: str, ignore_eos: bool = False) -> HFGenerationEngine:
    engine = HFGenerationEngine(path, threads=1, ignore_eos=ignore_eos)
    await engine.start()
    return engine


def prompt_tokens(i: int) -> list[int]:
    return [1] + [3 + (i * 7 + j) % 8 for j in range(2 + i % 3)] + [43]  # <bos>, letters, '>'


def trainer_logprobs(
    model: Any, pairs: list[tuple[list[int], GenerationResult]], temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    samples = [
        make_sample(
            Prompt(index=i, epoch=0, text="", tokens=p),
            [
                Trajectory(
                    response_tokens=r.response_tokens,
                    behaviour_logprobs=r.behaviour_logprobs,
                    token_versions=r.token_versions,
                    finish_reason=r.finish_reason,
                )
            ],
            0,
        )
        for i, (p, r) in enumerate(pairs)
    ]
    batch = collate(samples, 0, AlgorithmConfig(), pad_id=0)
    with torch.no_grad():
        logprobs = token_logprobs(model, batch, temperature)
    return logprobs, batch.behaviour_logprobs, batch.response_mask


async def generate_all(engine: HFGenerationEngine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    results: list[GenerationResult | None] = [None] * len(requests)

    async def one(i: int) -> None:
        results[i] = await engine.generate(requests[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(requests)):
            tg.start_soon(one, i)
    return [r for r in results if r is not None]


async def test_implements_the_protocol(model_path: str) -> None:
    engine = await started(model_path)
    assert isinstance(engine, GenerationEngine)
    await engine.aclose()


async def test_behaviour_logprobs_equal_the_trainers_recomputation(model_path: str) -> None:
    engine = await started(model_path)
    requests = [
        GenerationRequest(request_id=str(i), prompt_tokens=prompt_tokens(i), max_tokens=10, temperature=0.7, seed=i)
        for i in range(12)
    ]
    results = await generate_all(engine, requests)
    assert list(engine.batch_sizes) == [12]  # left-padded prompts of different lengths in one batch
    logprobs, behaviour, mask = trainer_logprobs(
        tiny.load_model(model_path), [(r.prompt_tokens, res) for r, res in zip(requests, results, strict=True)], 0.7
    )
    assert mask.sum() == sum(len(r.response_tokens) for r in results) > 12
    assert float(((logprobs - behaviour).abs() * mask).max()) < 1e-4
    assert all(v == [0] * len(r.response_tokens) for r in results for v in [r.token_versions])
    await engine.aclose()


async def test_seeded_sampling_is_reproducible(model_path: str) -> None:
    engine = await started(model_path)
    request = GenerationRequest(request_id="a", prompt_tokens=prompt_tokens(1), max_tokens=12, seed=42)
    first, second = await engine.generate(request), await engine.generate(request)
    other = await engine.generate(
        GenerationRequest(request_id="b", prompt_tokens=prompt_tokens(1), max_tokens=12, seed=43)
    )
    assert first.response_tokens == second.response_tokens
    assert other.response_tokens != first.response_tokens
    await engine.aclose()


def test_top_p_keeps_the_nucleus_and_renormalises() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    logp = sampling_distribution(logits, torch.tensor([1.0]), torch.tensor([0.7]))
    # 0.5 < 0.7 so 0.3 stays too; then 0.8 ≥ 0.7: the rest go. Renormalised: 0.5/0.8, 0.3/0.8.
    assert logp.exp().tolist()[0] == pytest.approx([0.625, 0.375, 0.0, 0.0], abs=1e-6)
    full = sampling_distribution(logits, torch.tensor([2.0]), torch.tensor([1.0]))
    assert torch.allclose(full, torch.log_softmax(logits / 2.0, dim=-1))


async def test_tiny_top_p_is_greedy_with_logprob_zero(model_path: str) -> None:
    engine = await started(model_path)
    result = await engine.generate(
        GenerationRequest(request_id="g", prompt_tokens=prompt_tokens(2), max_tokens=8, top_p=1e-6, seed=1)
    )
    assert result.behaviour_logprobs == [0.0] * len(result.response_tokens)
    model = tiny.load_model(model_path)
    ids = torch.tensor([prompt_tokens(2) + result.response_tokens])
    with torch.no_grad():
        greedy = model(input_ids=ids).logits[0, len(prompt_tokens(2)) - 1 : -1].argmax(-1)
    assert greedy.tolist()[: len(result.response_tokens)] == result.response_tokens
    await engine.aclose()


async def test_abort_returns_partial_tokens_and_continuation_extends_them(model_path: str) -> None:
    engine = await started(model_path, ignore_eos=True)  # this test needs a long response to interrupt
    request = GenerationRequest(request_id="long", prompt_tokens=prompt_tokens(0), max_tokens=200, seed=7)
    holder: list[GenerationResult] = []

    async def run() -> None:
        holder.append(await engine.generate(request))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(10):
            while engine.generated_tokens < 5:
                await anyio.sleep(0.001)
        at_abort = engine.generated_tokens
        await engine.abort_all()
    partial = holder[0]
    # stopped at the next token boundary: at most the one decode step then in progress was added
    assert len(partial.response_tokens) <= at_abort + 1
    assert partial.finish_reason == "abort"
    assert 5 <= len(partial.response_tokens) < 200
    assert len(partial.behaviour_logprobs) == len(partial.token_versions) == len(partial.response_tokens)

    await engine.load_state_dict_from(tiny.load_model(model_path))  # same weights, new version
    engine.set_version(1)
    cont_request = GenerationRequest(
        request_id="long",
        prompt_tokens=request.prompt_tokens,
        max_tokens=len(partial.response_tokens) + 6,
        seed=7,
        response_tokens=partial.response_tokens,
        behaviour_logprobs=partial.behaviour_logprobs,
        token_versions=partial.token_versions,
    )
    cont = await engine.generate(cont_request)
    n = len(partial.response_tokens)
    assert cont.finish_reason == "length"
    assert cont.response_tokens[:n] == partial.response_tokens
    assert cont.behaviour_logprobs[:n] == partial.behaviour_logprobs
    assert cont.token_versions == [0] * n + [1] * 6
    logprobs, behaviour, mask = trainer_logprobs(tiny.load_model(model_path), [(request.prompt_tokens, cont)], 1.0)
    assert float(((logprobs - behaviour).abs() * mask).max()) < 1e-4
    await engine.aclose()


async def test_a_request_submitted_before_abort_returns_abort_with_its_tokens(model_path: str) -> None:
    engine = await started(model_path)
    done = GenerationRequest(
        request_id="x",
        prompt_tokens=prompt_tokens(0),
        max_tokens=4,
        response_tokens=[3, 4],
        behaviour_logprobs=[-1.0, -2.0],
        token_versions=[0, 0],
    )
    results: list[GenerationResult] = []

    async def run() -> None:
        results.append(await engine.generate(done))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.lowlevel.checkpoint()  # queued, not yet run (the batch gathers for a moment)
        await engine.abort_all()
    assert results[0].finish_reason == "abort"
    assert results[0].response_tokens == [3, 4]
    await engine.aclose()


async def test_requests_at_max_tokens_finish_with_length(model_path: str) -> None:
    engine = await started(model_path)
    full = GenerationRequest(
        request_id="f",
        prompt_tokens=prompt_tokens(0),
        max_tokens=2,
        response_tokens=[3, 4],
        behaviour_logprobs=[-1.0, -2.0],
        token_versions=[0, 0],
    )
    result = await engine.generate(full)
    assert (result.finish_reason, result.response_tokens) == ("length", [3, 4])
    await engine.aclose()


async def test_requests_arriving_during_a_batch_form_the_next_batch(model_path: str) -> None:
    engine = await started(model_path, ignore_eos=True)

    async def late_arrivals() -> None:
        while not engine.batch_sizes:
            await anyio.sleep(0.001)
        await generate_all(
            engine,
            [
                GenerationRequest(request_id=f"late{i}", prompt_tokens=prompt_tokens(i), max_tokens=5, seed=i)
                for i in range(5)
            ],
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            generate_all,
            engine,
            [
                GenerationRequest(request_id=f"early{i}", prompt_tokens=prompt_tokens(i), max_tokens=60, seed=i)
                for i in range(3)
            ],
        )
        tg.start_soon(late_arrivals)
    assert list(engine.batch_sizes) == [3, 5]
    await engine.aclose()


async def test_event_loop_runs_while_a_generation_is_in_progress(model_path: str) -> None:
    """Generation runs in the worker thread: the loop keeps running while the model is mid-generation.

    Independent of machine speed: the model's forward pass at a decode step in the middle of the
    batch waits (in the worker thread, GIL released) until the event loop has ticked TICKS times.
    Were the batch generated on the loop's thread, no tick could happen during that wait; it would
    run out its hang guard and the test fails naming it.
    """
    TICKS, GATE_AT_CALL, MAX_TOKENS = 20, 10, 20
    engine = await started(model_path, ignore_eos=True)
    worker_waiting = threading.Event()  # set by the worker thread inside the gated forward pass
    ticks_seen = threading.Event()  # set by the loop after TICKS ticks during that wait
    forward_calls: list[str] = []
    tokens_seen_by_loop: set[int] = set()

    def gate(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        forward_calls.append(threading.current_thread().name)
        if len(forward_calls) == GATE_AT_CALL:
            worker_waiting.set()
            if not ticks_seen.wait(timeout=30):  # a hang guard, not a speed assertion
                forward_calls.append("timed out waiting for the event loop")

    hook = engine.model.register_forward_pre_hook(gate, with_kwargs=True)
    finished = anyio.Event()

    async def ticker() -> None:
        ticks = 0
        while not finished.is_set():
            await anyio.sleep(0.001)
            if worker_waiting.is_set():
                tokens_seen_by_loop.add(engine.generated_tokens)
                ticks += 1
                if ticks == TICKS:
                    ticks_seen.set()

    async def work() -> None:
        requests = [
            GenerationRequest(request_id=str(i), prompt_tokens=prompt_tokens(i), max_tokens=MAX_TOKENS, seed=i)
            for i in range(4)
        ]
        results.extend(await generate_all(engine, requests))
        finished.set()

    results: list[GenerationResult] = []
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            tg.start_soon(work)
    finally:
        hook.remove()
    loop_thread = threading.current_thread().name
    assert "timed out waiting for the event loop" not in forward_calls, "the event loop did not run during generation"
    assert loop_thread not in forward_calls, "a forward pass ran on the event loop's thread"
    assert ticks_seen.is_set()
    # the loop saw the batch half-done: (GATE_AT_CALL - 1) decode steps × 4 requests, not 0 nor all
    assert 0 < min(tokens_seen_by_loop) < 4 * MAX_TOKENS
    assert [len(r.response_tokens) for r in results] == [MAX_TOKENS] * 4
    await engine.aclose()


async def test_cancelled_caller_does_not_disturb_others_in_its_batch(model_path: str) -> None:
    engine = await started(model_path, ignore_eos=True)
    results: list[GenerationResult] = []

    async def survivor() -> None:
        results.append(
            await engine.generate(
                GenerationRequest(request_id="s", prompt_tokens=prompt_tokens(1), max_tokens=30, seed=1)
            )
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(survivor)
        with anyio.move_on_after(0.05):
            await engine.generate(
                GenerationRequest(request_id="c", prompt_tokens=prompt_tokens(2), max_tokens=200, seed=2)
            )
    assert results[0].finish_reason == "length"
    assert len(results[0].response_tokens) == 30
    await engine.aclose()


async def test_aclose_aborts_running_generations_then_releases_the_model(model_path: str) -> None:
    engine = await started(model_path, ignore_eos=True)
    results: list[GenerationResult] = []

    async def run() -> None:
        request = GenerationRequest(request_id="a", prompt_tokens=prompt_tokens(0), max_tokens=200, seed=3)
        results.append(await engine.generate(request))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(10):
            while engine.generated_tokens == 0:
                await anyio.sleep(0.001)
            await engine.aclose()
    assert results[0].finish_reason == "abort"
    assert 0 < len(results[0].response_tokens) < 200
    assert engine.model is None
    with pytest.raises(RuntimeError, match="after aclose"):
        await engine.generate(GenerationRequest(request_id="b", prompt_tokens=prompt_tokens(0), max_tokens=2))


def test_temperature_zero_is_greedy_row_by_row() -> None:
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]], dtype=torch.float64))
    logp = sampling_distribution(logits, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert logp[0].tolist() == [float("-inf"), 0.0, float("-inf")]  # all mass on the argmax: log 1 = 0
    assert torch.allclose(logp[1], torch.log_softmax(logits[1].float(), dim=-1))  # the sampled row is untouched
