"""Weight sync within one process: copy the trainer's tensors into the generation model.

Holds the trainer's limiter during the copy, so an optimizer update can never interleave with it;
the generation engine copies under its own limiter, so no batch runs on half-copied weights.
"""

from __future__ import annotations

import structlog

from asyncpolicy.engines.hf_generation import HFGenerationEngine
from asyncpolicy.engines.torch_trainer import TorchTrainEngine

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
            await self.generation.load_state_dict_from(self.trainer.model, version)
        self.pushes += 1
        log.debug("weights_pushed", version=version)
