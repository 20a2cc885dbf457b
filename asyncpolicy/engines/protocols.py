"""What the actors need from an engine, and nothing more.

Engines do the heavy work (sampling, forward/backward, moving weights) off the event loop, in
threads or processes; every method here is a coroutine that may be cancelled. Any engine —
simulated, Hugging Face on a CPU, vLLM + FSDP2 on GPUs — implements these protocols, so the
actors, their invariants and their tests are the same for all of them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import msgspec

from asyncpolicy.samples import Sample


class GenerationRequest(msgspec.Struct, kw_only=True):
    """Generate (or continue) one response.

    `response_tokens`/`behaviour_logprobs`/`token_versions` hold what an earlier, interrupted
    attempt produced (partial rollout); the engine continues after them, within `max_tokens` total.
    """

    request_id: str
    prompt_tokens: list[int]
    group: str = ""  # the requests of one prompt's group share it: replicated engines keep them on one replica (prefix cache)
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    response_tokens: list[int] = msgspec.field(default_factory=list)
    behaviour_logprobs: list[float] = msgspec.field(default_factory=list)
    token_versions: list[int] = msgspec.field(default_factory=list)


class GenerationResult(msgspec.Struct, kw_only=True):
    """All tokens of the response so far (earlier attempts included) and why generation ended.

    finish_reason: "stop" (end-of-sequence), "length" (max_tokens), "abort" (interrupted by
    `abort_all`; the response is partial and may be continued).
    """

    request_id: str
    response_tokens: list[int]
    behaviour_logprobs: list[float]
    token_versions: list[int]
    finish_reason: str

    @classmethod
    def so_far(cls, request: GenerationRequest, finish_reason: str) -> GenerationResult:
        """The request's own tokens, unchanged: nothing was generated this time."""
        return cls(
            request_id=request.request_id,
            response_tokens=list(request.response_tokens),
            behaviour_logprobs=list(request.behaviour_logprobs),
            token_versions=list(request.token_versions),
            finish_reason=finish_reason,
        )


@runtime_checkable
class GenerationEngine(Protocol):
    """Samples responses from the rollout copy of the policy."""

    @property
    def version(self) -> int:
        """Policy version of the weights now loaded; tokens generated from now on carry it."""
        ...

    def set_version(self, version: int) -> None:
        """Serve as policy `version` from now on: the one way a weights version is set.

        Weight transports call it once `version`'s weights are loaded (how they load them is the
        engine's own business), with generation paused; a fake whose weights are its version
        (simulated) needs nothing else.
        """
        ...

    async def start(self) -> None:
        """Load the model and get ready to generate."""
        ...

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate until EOS, max_tokens or `abort_all`. Cancelling the call abandons the request."""
        ...

    async def abort_all(self) -> None:
        """Make every running `generate` return promptly with finish_reason 'abort' and its tokens so far."""
        ...

    async def aclose(self) -> None:
        """Release the engine's threads, processes and memory."""
        ...


@runtime_checkable
class TrainEngine(Protocol):
    """Owns the trained policy, its optimizer and schedule."""

    async def start(self) -> None:
        """Load the model, build the optimizer."""
        ...

    async def train_step(self, batch: list[Sample], version: int) -> dict[str, float]:
        """One training step on a batch of samples taken at trainer `version`; returns its metrics."""
        ...

    async def aclose(self) -> None:
        ...


@runtime_checkable
class WeightTransport(Protocol):
    """Moves the trainer's current weights into the generation engine."""

    async def stage(self, version: int) -> None:
        """Gather `version`'s weights where the hand-over can take them; runs while generation goes on.

        Whatever needs no pause happens here, so `push` holds generation up for the hand-over alone.
        """
        ...

    async def push(self, version: int) -> None:
        """Load the trainer's weights into the generation engine as policy `version`.

        Called with generation paused; raises on failure (the synchronizer retries).
        """
        ...


@runtime_checkable
class Checkpointable(Protocol):
    """An engine whose state a checkpoint can hold."""

    async def save_state(self, directory: str) -> None: ...

    async def load_state(self, directory: str) -> None: ...


@runtime_checkable
class ModelExporter(Protocol):
    """A trainer engine that can write its policy as a Hugging Face model directory."""

    async def save_model(self, directory: str) -> None:
        """safetensors weights + config.json + tokenizer files: `from_pretrained` and vLLM load it as it is."""
        ...


class EngineSet(msgspec.Struct, kw_only=True):
    """The engines of one run, built together because their transport joins them."""

    generation: Any  # GenerationEngine
    trainer: Any  # TrainEngine
    transport: Any  # WeightTransport
    tokenizer: Any = None  # a transformers tokenizer for real models; None for simulated engines
    sync_at_start: bool = False  # push the trainer's weights before a fresh run (remote servers may hold others)
