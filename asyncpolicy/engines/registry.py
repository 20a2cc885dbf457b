"""Which engines go together, what each pair needs and which builder makes it: the one table.

Config checks (`config.check_consistency`), the CLI, the factory (`factory.py`), a run on rollout
servers (`sets/remote.py`) and `serve-rollout` (`generation/remote_server.py`) all read it. Plain
data: modules and builders are named as "module" / "module:function" strings, so `config.py` can
import this without torch, and the factory imports a pair's modules only when a run asks for it.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class Generation(msgspec.Struct, frozen=True, kw_only=True):
    """One `rollout.engine`."""

    name: str
    torch: bool  # imports torch (its native libraries are preloaded off the GIL first)
    server: str  # "module:function(cfg) -> ServedEngine": the engine `serve-rollout` serves
    # how the trainer's weights reach it on a rollout server: "version" (a fake: the version is its weights,
    # an empty POST), "state" (the full state dict as a safetensors POST), "nccl" (a broadcast to its workers)
    weights: Literal["version", "state", "nccl"]


class Pair(msgspec.Struct, frozen=True, kw_only=True):
    """One (rollout.engine, trainer.engine) that a run can use."""

    rollout: str
    trainer: str
    builder: str  # "module:function(cfg, rng) -> EngineSet": the set of a run that generates in this process
    modules: tuple[str, ...]  # what that builder needs imported (torch, transformers: seconds)
    ready: str = ""  # "module:function()" that imports and checks a third-party engine (ConfigError naming its extra)
    remote_modules: tuple[str, ...] = ()  # what a run on rollout servers needs here: the trainer alone
    cpu_fsdp: bool = False  # the FSDP trainer on the CPU over gloo: trainer.n_gpus_per_node must be 0
    description: str = ""

    @property
    def torch(self) -> bool:
        """Whether a run of this pair imports torch (its native libraries are preloaded off the GIL first)."""
        return generation(self.rollout).torch or self.trainer != "simulated"


_E = "asyncpolicy.engines"

GENERATIONS: tuple[Generation, ...] = (
    Generation(name="simulated", torch=False, server=f"{_E}.generation.remote_server:serve_simulated", weights="version"),
    Generation(name="hf", torch=True, server=f"{_E}.generation.remote_server:serve_hf", weights="state"),
    Generation(name="vllm", torch=True, server=f"{_E}.generation.remote_server:serve_vllm", weights="nccl"),
)

# The first pair of a rollout engine is its partner by default (`serve-rollout` fills trainer.engine in with it).
PAIRS: tuple[Pair, ...] = (
    Pair(
        rollout="simulated",
        trainer="simulated",
        builder=f"{_E}.sets.simulated:build_simulated_engines",
        modules=(f"{_E}.sets.simulated",),
        description="seeded fakes of every engine: no model, no torch",
    ),
    Pair(
        rollout="hf",
        trainer="torch",
        builder=f"{_E}.sets.hf_torch:build_hf_torch_engines",
        modules=(f"{_E}.sets.hf_torch",),
        remote_modules=(f"{_E}.training.torch_trainer",),
        description="CPU: HF generation and the torch trainer in this process, weights copied in memory",
    ),
    Pair(
        rollout="hf",
        trainer="fsdp",
        builder=f"{_E}.sets.hf_fsdp:build_hf_fsdp_engines",
        modules=(f"{_E}.sets.hf_fsdp",),
        remote_modules=(f"{_E}.training.fsdp_trainer",),
        cpu_fsdp=True,
        description="CPU: HF generation and the GPU trainer's FSDP2 ranks over gloo",
    ),
    Pair(
        rollout="vllm",
        trainer="fsdp",
        builder=f"{_E}.sets.vllm_fsdp:build_vllm_fsdp_engines",
        modules=(f"{_E}.sets.vllm_fsdp",),
        ready=f"{_E}.generation.vllm:import_vllm",
        remote_modules=(f"{_E}.training.fsdp_trainer",),
        description="GPU: vLLM generation and FSDP2 training, weights over CUDA IPC or NCCL",
    ),
)


def generation(name: str) -> Generation:
    """The rollout engine called `name` (config.py's Literal admits only these)."""
    for g in GENERATIONS:
        if g.name == name:
            return g
    raise KeyError(f"no rollout engine {name!r}")


def find_pair(rollout: str, trainer: str) -> Pair | None:
    """The pair of these engines, or None when they do not go together."""
    return next((p for p in PAIRS if (p.rollout, p.trainer) == (rollout, trainer)), None)


def default_trainer(rollout: str) -> str | None:
    """The trainer a rollout engine pairs with when none is named: its first pair's."""
    return next((p.trainer for p in PAIRS if p.rollout == rollout), None)


def describe_pairs() -> str:
    """The supported pairs as config keys, for error messages and help."""
    return ", ".join(f"rollout.engine={p.rollout} with trainer.engine={p.trainer}" for p in PAIRS)
