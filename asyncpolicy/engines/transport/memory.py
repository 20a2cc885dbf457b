"""Weight sync into an in-process HF generation model, from CPU tensors (no NCCL, no CUDA IPC).

`InMemoryTransport` (torch trainer, same process) holds the trainer's limiter during the copy, so
an optimizer update can never interleave with it; `FullStateTransport` (FSDP ranks on the CPU)
copies the full weights rank 0 gathered. The generation engine copies under its own limiter, so
no batch runs on half-copied weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from asyncpolicy.engines.generation.hf import HFGenerationEngine
from asyncpolicy.engines.training.torch_trainer import TorchTrainEngine

if TYPE_CHECKING:
    from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine

log = structlog.get_logger(__name__)


class InMemoryTransport:
    """`WeightTransport` between a TorchTrainEngine and an HFGenerationEngine in the same process."""

    def __init__(self, trainer: TorchTrainEngine, generation: HFGenerationEngine) -> None:
        self.trainer = trainer
        self.generation = generation
        self.pushes = 0

    async def stage(self, version: int) -> None:
        """Nothing to gather: the copy reads the trainer's tensors directly, under its limiter."""

    async def push(self, version: int) -> None:
        if self.trainer.model is None or self.generation.model is None:
            raise RuntimeError("weight push before both engines started")
        async with self.trainer.limiter:
            await self.generation.load_state_dict_from(self.trainer.model)
        self.generation.set_version(version)
        self.pushes += 1
        log.debug("weights_pushed", version=version)


class FullStateTransport:
    """`WeightTransport` from FSDP ranks to an in-process HF model: gather on rank 0, copy in."""

    def __init__(self, trainer: FSDPTrainEngine, generation: HFGenerationEngine) -> None:
        self.trainer = trainer
        self.generation = generation
        self._staged: tuple[int, dict[str, Any]] | None = None

    async def stage(self, version: int) -> None:
        """Gather the full weights while generation goes on (the trainer waits for the sync: they stay current)."""
        self._staged = (version, await self.trainer.full_state_dict())

    async def push(self, version: int) -> None:
        if self._staged is None or self._staged[0] != version:
            await self.stage(version)
        assert self._staged is not None
        state, self._staged = self._staged[1], None
        await self.generation.load_weights(state)
        self.generation.set_version(version)
