"""The engine set of a run whose generation runs on rollout servers (`rollout.servers`).

This process holds the `RemoteGenerationEngine` client and the trainer (the pair's, as in a local
run); the weight transport is the one `transport/http.py` has for how the servers' engine takes
weights (`registry.Generation.weights`).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import structlog

from asyncpolicy.config import Config, split_server_address
from asyncpolicy.engines import registry
from asyncpolicy.engines.generation.remote_client import RemoteGenerationEngine, probe_servers
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.engines.transport.http import RemoteNCCLTransport, RemoteStateTransport

log = structlog.get_logger("asyncpolicy.remote")


def _local_address_towards(host: str) -> str:
    """The address of this machine on the route to `host` (where servers reach the trainer's NCCL rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # UDP: no packet is sent, the kernel only picks the route
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def build_remote_engines(cfg: Config) -> EngineSet:
    """The engines of a run on rollout servers (not started); ConfigError naming a server that does not answer."""
    healths = probe_servers(cfg)
    generation = RemoteGenerationEngine(
        list(cfg.rollout.servers),
        cfg.rollout.engine,
        generation_timeout=cfg.async_training.generation_timeout,
        control_timeout=cfg.async_training.sync_timeout,
    )
    log.info("rollout_servers", servers=list(cfg.rollout.servers), versions=[h.version for h in healths], models=[h.model for h in healths])
    trainer, state, tokenizer = _trainer(cfg)
    transport: Any
    if registry.generation(cfg.rollout.engine).weights == "nccl":  # the pair's trainer is FSDP (registry.PAIRS)
        host = _local_address_towards(split_server_address(cfg.rollout.servers[0])[0])
        transport = RemoteNCCLTransport(generation, trainer, host)
    else:
        transport = RemoteStateTransport(generation, state)
    return EngineSet(generation=generation, trainer=trainer, transport=transport, tokenizer=tokenizer, sync_at_start=True)


def _trainer(cfg: Config) -> tuple[Any, Callable[[], Awaitable[dict[str, Any]]] | None, Any]:
    """(trainer engine, what gives its full state dict as CPU tensors — None: simulated, no weights —, tokenizer)."""
    if cfg.trainer.engine == "simulated":
        from asyncpolicy.engines.simulated import SimulatedTrainEngine

        return SimulatedTrainEngine(cfg.trainer.simulated), None, None
    from asyncpolicy.models.tiny import load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(path)
    if cfg.trainer.engine == "torch":
        from asyncpolicy.engines.training.torch_trainer import TorchTrainEngine

        torch_trainer = TorchTrainEngine(cfg, path, tokenizer)

        async def torch_state() -> dict[str, Any]:
            async with torch_trainer.limiter:  # never while an optimizer step writes the tensors
                model = torch_trainer.model
                return await anyio.to_thread.run_sync(lambda: {k: v.detach().clone() for k, v in model.state_dict().items()})

        return torch_trainer, torch_state, tokenizer
    from asyncpolicy.engines.training.fsdp_trainer import FSDPTrainEngine
    from asyncpolicy.engines.training.placement import node_gpus, worker_init

    # hf servers: one gloo rank on the CPU; vllm servers: FSDP2 on every visible GPU of this machine
    fsdp = FSDPTrainEngine(worker_init(cfg, path), node_gpus(cfg), timeout_s=cfg.trainer.worker_timeout_s)
    return fsdp, fsdp.full_state_dict, tokenizer
