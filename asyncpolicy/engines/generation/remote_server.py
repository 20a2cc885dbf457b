"""`python -m asyncpolicy serve-rollout`: one of the project's generation engines behind HTTP.

Why our own thin server rather than `vllm serve`: one wire format (msgspec JSON of
`GenerationRequest`/`GenerationResult`, the engines' own types) for every engine — simulated and
hf on a CPU as well as vLLM on GPUs — so CPU tests run the same client, partial rollout works as it
does in process (a request carries its earlier tokens, logprobs and versions; the engine tags new
tokens with its version and returns processed logprobs), and `abort_all` keeps its meaning. vLLM's
OpenAI server speaks text/chat, knows no policy versions and needs its own weight-update plumbing
per vLLM release. This module is starlette + uvicorn around the existing engine, nothing more.

Endpoints (`asyncpolicy/engines/generation/remote_client.py` is the client):
  GET  /health               ServerHealth: engine kind, version, model, workers, request counts
  POST /generate             GenerationRequest → GenerationResult; a client that hangs up abandons it
  POST /abort_all            running generations return now with their tokens (finish_reason "abort")
  POST /pause, /resume       vLLM's scheduler (around an NCCL weight load); no-ops for the others
  POST /weights?version=N    hf: the full state dict as safetensors bytes; simulated: empty body
  POST /weights/nccl_init    vllm: join the trainer's NCCL group (NcclInit)
  POST /weights/nccl_load    vllm: receive the broadcast weights and serve their version (NcclLoad)
"""

from __future__ import annotations

import random
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import structlog

from asyncpolicy.config import Config, RawOverride, apply_override, build_config, read_config_file, replica_count
from asyncpolicy.engines import registry
from asyncpolicy.engines.factory import preload_torch_libraries, resolve
from asyncpolicy.engines.protocols import GenerationRequest
from asyncpolicy.engines.generation.remote_client import NcclInit, NcclLoad, ServerHealth
from asyncpolicy.errors import ConfigError

log = structlog.get_logger("asyncpolicy.serve")

def load_server_config(path: str | None, overrides: list[str]) -> Config:
    """A run's config (file, then key=value overrides); trainer.engine defaults to rollout.engine's partner.

    A server has no trainer, but its config is checked like a run's, so the partner (`registry.default_trainer`)
    is filled in when the user did not name one.
    """
    tree: dict[str, Any] = read_config_file(path) if path is not None else {}
    for override in overrides:
        apply_override(tree, override)
    rollout, trainer = tree.get("rollout"), tree.setdefault("trainer", {})
    engine = rollout.get("engine", "hf") if isinstance(rollout, dict) else "hf"
    engine = engine.text if isinstance(engine, RawOverride) else engine
    partner = registry.default_trainer(engine) if isinstance(engine, str) else None
    if isinstance(trainer, dict) and "engine" not in trainer and partner is not None:
        trainer["engine"] = partner
    cfg = build_config(tree)
    if cfg.rollout.servers:
        raise ConfigError("config key 'rollout.servers': a rollout server generates itself; leave it empty", key="rollout.servers")
    if replica_count(cfg) > 1:
        raise ConfigError(
            f"config key 'rollout.tensor_parallel_size': a rollout server runs one engine, but these keys make "
            f"{replica_count(cfg)} replicas; set it to rollout.n_gpus_per_node, or start one server per replica",
            key="rollout.tensor_parallel_size",
        )
    return cfg


class RolloutServer:
    """The HTTP face of one started generation engine."""

    def __init__(self, cfg: Config, announce: str = "") -> None:
        self.cfg = cfg
        self.announce = announce  # host:port to print once the engine is up
        self.kind = cfg.rollout.engine
        generation = registry.generation(self.kind)
        self.weights_by = generation.weights  # how the trainer's weights arrive (registry.Generation.weights)
        if generation.torch:
            preload_torch_libraries()
        served: ServedEngine = resolve(generation.server)(cfg)
        self.engine, self.model, self.workers = served.engine, served.model, served.workers
        self.requests = 0
        self.in_flight = 0

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            await self.engine.start()
            if self.announce:  # the socket listens already: a client that connects now is served once uvicorn runs
                print(f"asyncpolicy: rollout server ({self.kind}, {self.model}) listening on {self.announce}", file=sys.stderr, flush=True)
                log.info("rollout_server_ready", engine=self.kind, address=self.announce, model=self.model)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await self.engine.aclose()

        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/generate", self.generate, methods=["POST"]),
                Route("/abort_all", self.abort_all, methods=["POST"]),
                Route("/pause", self.pause, methods=["POST"]),
                Route("/resume", self.resume, methods=["POST"]),
                Route("/weights", self.weights, methods=["POST"]),
                Route("/weights/nccl_init", self.nccl_init, methods=["POST"]),
                Route("/weights/nccl_load", self.nccl_load, methods=["POST"]),
            ],
            lifespan=lifespan,
        )

    # -- endpoints ------------------------------------------------------------------------------

    async def health(self, request: Any) -> Any:
        return _json(ServerHealth(engine=self.kind, version=self.engine.version, model=self.model, workers=self.workers,
                                  requests=self.requests, in_flight=self.in_flight))

    async def generate(self, request: Any) -> Any:
        try:
            req = msgspec.json.decode(await request.body(), type=GenerationRequest)
        except msgspec.DecodeError as e:  # ValidationError included
            return _error(400, f"POST /generate: not a GenerationRequest: {e}")
        self.requests += 1
        self.in_flight += 1
        try:
            result = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_on_disconnect, request, tg.cancel_scope)
                result = await self.engine.generate(req)
                tg.cancel_scope.cancel()
        except Exception as e:  # the engine's failure goes back to the client, which retries it
            log.exception("generate_failed", request_id=req.request_id)
            return _error(500, f"generation {req.request_id} failed: {type(e).__name__}: {e}")
        finally:
            self.in_flight -= 1
        if result is None:  # the client hung up (its timeout, or a cancel): nobody reads an answer
            return _error(499, f"generation {req.request_id} abandoned by the client")
        return _json(result)

    async def abort_all(self, request: Any) -> Any:
        await self.engine.abort_all()
        return _json({})

    async def pause(self, request: Any) -> Any:
        if self.weights_by == "nccl":  # vLLM's scheduler around an NCCL load; nothing to pause for a POST
            await self.engine.pause()
        return _json({})

    async def resume(self, request: Any) -> Any:
        if self.weights_by == "nccl":
            await self.engine.resume()
        return _json({})

    async def weights(self, request: Any) -> Any:
        try:
            version = int(request.query_params["version"])
        except (KeyError, ValueError):
            return _error(400, "POST /weights needs ?version=N (an integer)")
        body = await request.body()
        if self.weights_by == "state":
            from safetensors.torch import load

            try:
                state = await anyio.to_thread.run_sync(load, body)
            except Exception as e:  # safetensors raises its own error types for bad bytes
                return _error(400, f"POST /weights: the body is not a safetensors state dict: {e}")
            await self.engine.load_weights(state)
        elif self.weights_by == "nccl":
            return _error(400, f"a {self.kind} server takes weights over NCCL: POST /weights/nccl_init, then /weights/nccl_load")
        self.engine.set_version(version)  # ("version": a fake's weights are its version)
        log.debug("weights_loaded", version=version, bytes=len(body))
        return _json({"version": version})

    async def nccl_init(self, request: Any) -> Any:
        if self.weights_by != "nccl":
            return _error(400, f"POST /weights/nccl_init: a {self.kind} server takes weights by POST /weights")
        body = msgspec.json.decode(await request.body(), type=NcclInit)
        ranks = await self.engine.rpc("ap_nccl_init", body.host, body.port, body.rank_offset, body.world_size)
        return _json({"ranks": ranks})

    async def nccl_load(self, request: Any) -> Any:
        if self.weights_by != "nccl":
            return _error(400, f"POST /weights/nccl_load: a {self.kind} server takes weights by POST /weights")
        body = msgspec.json.decode(await request.body(), type=NcclLoad)
        await self.engine.rpc("ap_nccl_load", body.meta, body.numel)
        self.engine.set_version(body.version)
        return _json({"version": body.version})


async def _cancel_on_disconnect(request: Any, scope: anyio.CancelScope) -> None:
    """Once the body is read, the ASGI receive channel only says one more thing: the client hung up."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _json(value: Any, status: int = 200) -> Any:
    from starlette.responses import Response

    return Response(msgspec.json.encode(value), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Any:
    return _json({"error": message}, status)


class ServedEngine(msgspec.Struct, kw_only=True):
    """A server's generation engine (not started), the model it loads and the NCCL ranks it adds to a weight-sync group."""

    engine: Any
    model: str
    workers: int = 1


def serve_simulated(cfg: Config) -> ServedEngine:
    from asyncpolicy.engines.simulated import SimulatedGenerationEngine

    return ServedEngine(engine=SimulatedGenerationEngine(cfg.rollout.simulated, random.Random(cfg.seed)), model="simulated")


def serve_hf(cfg: Config) -> ServedEngine:
    from asyncpolicy.engines.generation.hf import HFGenerationEngine
    from asyncpolicy.models.tiny import resolve_model_path

    path = resolve_model_path(cfg)
    return ServedEngine(engine=HFGenerationEngine(path, cfg.model.dtype, threads=cfg.trainer.threads), model=path)


def serve_vllm(cfg: Config) -> ServedEngine:
    from asyncpolicy.engines.generation.vllm import VLLMGenerationEngine, import_vllm, vllm_settings
    from asyncpolicy.models.tiny import load_tokenizer, resolve_model_path

    path = resolve_model_path(cfg)
    import_vllm()
    gpus = list(range(cfg.rollout.n_gpus_per_node))
    settings = vllm_settings(cfg, path, gpus, load_tokenizer(path).eos_token_id)
    return ServedEngine(engine=VLLMGenerationEngine(settings), model=path, workers=len(gpus))


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so `--port 0` can report the port the kernel chose."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"serve-rollout: cannot listen on {host}:{port} ({e.strerror or e})", key="--port") from None
    return sock


async def serve(server: RolloutServer, sock: socket.socket) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's graceful shutdown closes the engine)."""
    import uvicorn

    config = uvicorn.Config(server.app(), log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    await uvicorn.Server(config).serve(sockets=[sock])
