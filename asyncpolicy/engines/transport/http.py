"""Weight transports to rollout servers (`serve-rollout`), over the `RemoteGenerationEngine` client.

`RemoteStateTransport`: hf/simulated servers get the trainer's full state dict as safetensors,
one POST per server. `RemoteNCCLTransport`: vLLM servers get one NCCL broadcast from the FSDP
trainer's rank 0 to every server's workers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import structlog

from asyncpolicy.engines.generation.remote_client import Meta, RemoteGenerationEngine

log = structlog.get_logger("asyncpolicy.remote")


class RemoteStateTransport:
    """`WeightTransport` to hf/simulated servers: the trainer's full state dict as safetensors, one POST per server.

    `stage` copies and serialises the weights while rollout runs; `push` only sends the bytes.
    """

    def __init__(self, generation: RemoteGenerationEngine, state: Callable[[], Awaitable[dict[str, Any]]] | None) -> None:
        self.generation = generation
        self.state = state  # the trainer's full state dict (CPU tensors); None: simulated, the version alone moves
        self._staged: tuple[int, bytes] | None = None
        self.pushes = 0

    async def stage(self, version: int) -> None:
        if self.state is None:
            self._staged = (version, b"")
            return
        state = await self.state()
        self._staged = (version, await anyio.to_thread.run_sync(_safetensors_bytes, state))

    async def push(self, version: int) -> None:
        if self._staged is None or self._staged[0] != version:
            await self.stage(version)  # a forced push (engine restart, start of a run): serialise now
        assert self._staged is not None
        t0 = time.perf_counter()
        await self.generation.wait_ready()
        await self.generation.push_state(self._staged[1], version)
        self.generation.set_version(version)
        self.pushes += 1
        log.debug("weights_pushed", transport="http", version=version, bytes=len(self._staged[1]),
                  servers=len(self.generation.live), push_s=round(time.perf_counter() - t0, 4))


def _safetensors_bytes(state: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    # contiguous private copies: safetensors refuses tensors that share memory (tied embeddings)
    return save({name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()})


class RemoteNCCLTransport:
    """`WeightTransport` to vLLM servers: FSDP2 packs one flat bf16 buffer (`stage`), rank 0 broadcasts it to
    every server's workers (`push`), as `transport.cuda.NCCLTransport` does for local vLLM engines.

    Invariant: the servers are resumed on every path out of `push`; the version moves only after every
    server has loaded the weights.
    """

    kind = "remote-nccl"

    def __init__(self, generation: RemoteGenerationEngine, trainer: Any, host: str) -> None:
        self.generation = generation
        self.trainer = trainer  # an FSDPTrainEngine
        self.host = host  # this machine's address as the servers reach it: the group's rendezvous
        self._staged: tuple[int, Meta] | None = None
        self._group_of = -1  # the engine incarnation (servers started, none lost) the group was made with

    async def stage(self, version: int) -> None:
        self._staged = (version, await self.trainer.pack())

    async def _prepare(self) -> None:
        if self._group_of == self.generation.incarnation:
            return
        from asyncpolicy.engines.training import fsdp_worker as w

        port = w.free_port()
        world = 1 + sum(s.health.workers if s.health is not None else 1 for s in self.generation.live)
        async with anyio.create_task_group() as tg:  # both sides join the rendezvous together
            tg.start_soon(self.generation.nccl_init, self.host, port)
            tg.start_soon(self.trainer.call, w.NcclInit(host=self.host, port=port, world_size=world))
        self._group_of = self.generation.incarnation
        log.info("nccl_group_ready", transport=self.kind, world_size=world, host=self.host, port=port)

    async def push(self, version: int) -> None:
        from asyncpolicy.engines.training import fsdp_worker as w

        if self._staged is None or self._staged[0] != version:
            await self.stage(version)  # a forced push (start of a run, engine restart): pack now
        assert self._staged is not None
        meta = self._staged[1]
        numel = sum(n for *_, n in meta)
        t0 = time.perf_counter()
        await self.generation.wait_ready()
        await self._prepare()
        await self.generation.pause()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.trainer.call, w.NcclSend())
                tg.start_soon(self.generation.nccl_load, meta, numel, version)
        finally:
            with anyio.CancelScope(shield=True):
                await self.generation.resume()
        self.generation.set_version(version)
        log.info("weights_pushed", transport=self.kind, version=version, bytes=2 * numel, push_s=round(time.perf_counter() - t0, 4))
