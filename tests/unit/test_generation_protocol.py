"""Every generation engine implements the `GenerationEngine` protocol, version setter included.

Transports and the synchronizer set a weights version only through `set_version`; this checks
that each engine has it (statically: mypy checks the annotated assignments; at run time:
`isinstance` against the runtime-checkable protocol) and that it moves `version`. The engines are
built, not started: vLLM's is the CPU-constructible part of the GPU engine.
"""

from __future__ import annotations

import random

import pytest

from asyncpolicy.config import load_config
from asyncpolicy.engines.generation.hf import HFGenerationEngine
from asyncpolicy.engines.generation.remote_client import RemoteGenerationEngine
from asyncpolicy.engines.generation.replicas import ReplicatedGeneration
from asyncpolicy.engines.generation.vllm import VLLMGenerationEngine, VLLMSettings
from asyncpolicy.engines.protocols import GenerationEngine
from asyncpolicy.engines.simulated import SimulatedGenerationEngine


def _simulated() -> SimulatedGenerationEngine:
    return SimulatedGenerationEngine(load_config(overrides=["rollout.engine=simulated", "trainer.engine=simulated"]).rollout.simulated, random.Random(0))


def _engines() -> list[GenerationEngine]:
    simulated: GenerationEngine = _simulated()
    hf: GenerationEngine = HFGenerationEngine("unused-until-start")
    replicas: GenerationEngine = ReplicatedGeneration([_simulated(), _simulated()], max_restarts=0)
    remote: GenerationEngine = RemoteGenerationEngine(["127.0.0.1:9"], "simulated", generation_timeout=1.0, control_timeout=1.0)
    vllm: GenerationEngine = VLLMGenerationEngine(
        VLLMSettings(model_path="unused-until-start", gpus=[0], dummy_weights=True, stop_token_ids=[1], max_model_len=8)
    )
    return [simulated, hf, replicas, remote, vllm]


@pytest.mark.parametrize("engine", _engines(), ids=lambda e: type(e).__name__)
def test_each_engine_is_a_generation_engine_whose_version_moves_by_set_version(engine: GenerationEngine) -> None:
    assert isinstance(engine, GenerationEngine)
    assert engine.version == 0
    engine.set_version(3)
    assert engine.version == 3
    engine.set_version(4)
    assert engine.version == 4


def test_a_router_sets_the_version_of_every_replica_a_push_reaches() -> None:
    replicas = [_simulated(), _simulated(), _simulated()]
    router = ReplicatedGeneration(replicas, max_restarts=0)
    router.set_version(5)
    assert [r.version for r in replicas] == [5, 5, 5] and router.version == 5
