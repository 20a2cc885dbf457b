"""Generation on rollout servers started apart from the trainer (`python -m asyncpolicy serve-rollout`).

`RemoteGenerationEngine` is a `GenerationEngine` over several servers, reached over HTTP (httpx,
which runs under asyncio and trio alike); the wire format is msgspec JSON of the same
`GenerationRequest`/`GenerationResult` the in-process engines take and return (`remote_server.py`
is the other end). Weights reach the servers through `transport/http.py`: one safetensors POST per
hf/simulated server, or NCCL to vLLM servers (the trainer's rank 0 and every server's vLLM workers
form one group); `sets/remote.py` builds a run on servers.

Invariants:
* while any request of a prompt's group is in flight, the group's other requests go to the same
  server (its prefix cache holds the prompt); otherwise the live server with the fewest requests
  in flight gets it;
* every HTTP call has a timeout: `generation_timeout` for a generation, `sync_timeout` for the
  rest (health, abort, pause, weights);
* a server that stops answering (connection refused or reset) is *lost*: logged
  (`rollout_server_lost`), sent nothing more, skipped by weight pushes; the call that found it
  raises, and the rollouter retries it on another server. With no server left every call fails,
  the supervisor restarts the engine, and `start` probes every configured server again (one that
  is back rejoins, and gets the trainer's weights from the forced push that follows a restart);
  if none answers, the run fails naming them. The NCCL path cannot lose a group member: there a
  lost server fails the sync (SyncFailed, exit 1);
* `version` is the version last pushed to every live server; tokens carry the version of the
  server that generated them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread
import httpx
import msgspec
import structlog

from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import GenerationRequest, GenerationResult
from asyncpolicy.errors import ConfigError, RunFailed

log = structlog.get_logger("asyncpolicy.remote")

Meta = list[tuple[str, list[int], int, int]]


# -- the wire schema (shared with remote_server.py) -----------------------------------------------


class ServerHealth(msgspec.Struct, kw_only=True):
    """GET /health: what a server runs and how busy it has been."""

    engine: str  # its rollout.engine: simulated | hf | vllm
    version: int  # policy version of the weights it holds
    model: str  # the model directory it loaded
    workers: int  # vLLM workers (NCCL ranks) it adds to a weight-sync group; 1 for the others
    requests: int  # POST /generate calls received since it started
    in_flight: int  # generations running now


class NcclInit(msgspec.Struct, kw_only=True):
    """POST /weights/nccl_init: join the trainer's NCCL group (rendezvous at host:port)."""

    host: str
    port: int
    rank_offset: int  # this server's first worker's rank (the trainer is rank 0)
    world_size: int


class NcclLoad(msgspec.Struct, kw_only=True):
    """POST /weights/nccl_load: receive the trainer's flat buffer broadcast, load it, serve `version`."""

    meta: Meta
    numel: int
    version: int


class RemoteServerError(RuntimeError):
    """A rollout server answered with an error, or did not answer; the message names it."""


class _Server:
    """One server as the client sees it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.url = f"http://{address}"
        self.in_flight = 0
        self.sent = 0  # generate calls sent to it in this run
        self.lost = ""  # why it was given up; "" while it is live
        self.health: ServerHealth | None = None


def _is_lost(exc: BaseException) -> bool:
    """A failure that says the server is gone (not one that says it is slow or refused the request)."""
    return isinstance(exc, httpx.TransportError) and not isinstance(exc, httpx.TimeoutException)


def _raise_for_status(server: _Server, what: str, response: httpx.Response) -> None:
    if response.status_code != 200:
        raise RemoteServerError(f"rollout server {server.address}: {what} answered HTTP {response.status_code}: {response.text[:300]}")


def probe_servers(cfg: Config) -> list[ServerHealth]:
    """Blocking health check of every configured server before a run starts: ConfigError naming the first bad one."""
    found = []
    with httpx.Client(timeout=min(cfg.async_training.sync_timeout, 30.0)) as client:
        for address in cfg.rollout.servers:
            try:
                response = client.get(f"http://{address}/health")
                response.raise_for_status()
                health = msgspec.json.decode(response.content, type=ServerHealth)
            except (httpx.HTTPError, msgspec.DecodeError) as e:
                raise ConfigError(
                    f"config key 'rollout.servers': rollout server {address} does not answer GET /health "
                    f"({type(e).__name__}: {e}); start it with `python -m asyncpolicy serve-rollout --port PORT`",
                    key="rollout.servers",
                ) from None
            if health.engine != cfg.rollout.engine:
                raise ConfigError(
                    f"config key 'rollout.engine': rollout server {address} runs {health.engine!r}, "
                    f"not rollout.engine={cfg.rollout.engine!r}",
                    key="rollout.engine",
                )
            found.append(health)
    return found


class RemoteGenerationEngine:
    """`GenerationEngine` over rollout servers; see the module docstring."""

    def __init__(self, servers: list[str], engine: str, *, generation_timeout: float, control_timeout: float) -> None:
        self.servers = [_Server(a) for a in servers]
        self.engine = engine
        self.generation_timeout = generation_timeout
        self.control_timeout = control_timeout
        self._version = 0
        self._client: httpx.AsyncClient | None = None
        self._groups: dict[str, tuple[_Server, int]] = {}  # group → (its server, requests in flight)
        self._ready = anyio.Event()
        self.incarnation = 0  # +1 per start and per lost server: an NCCL group must be made again

    # -- GenerationEngine -------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        """Called by a transport once every live server holds `version`'s weights."""
        self._version = version

    @property
    def live(self) -> list[_Server]:
        return [s for s in self.servers if not s.lost]

    async def start(self) -> None:
        """Probe every configured server; the ones that answer are used. RunFailed when none does."""
        if self._client is None:
            # no pool limit: rollout.max_concurrency bounds the requests; each call has its own timeout
            self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        async with anyio.create_task_group() as tg:
            for server in self.servers:
                server.lost = ""
                tg.start_soon(self._probe, server)
        wrong = [s for s in self.live if s.health is not None and s.health.engine != self.engine]
        if wrong:
            raise RunFailed(f"rollout server {wrong[0].address} runs {wrong[0].health.engine!r}, not rollout.engine={self.engine!r}")  # type: ignore[union-attr]
        if not self.live:
            raise RunFailed("no rollout server answers: " + "; ".join(f"{s.address} ({s.lost})" for s in self.servers))
        self._version = min(s.health.version for s in self.live if s.health is not None)
        self.incarnation += 1
        self._ready.set()
        log.info("rollout_servers_ready", servers=[s.address for s in self.live], lost=[s.address for s in self.servers if s.lost],
                 versions=[s.health.version for s in self.live if s.health is not None])

    async def _health(self, server: _Server) -> ServerHealth:
        response = await self._http.get(f"{server.url}/health", timeout=self.control_timeout)
        _raise_for_status(server, "GET /health", response)
        return msgspec.json.decode(response.content, type=ServerHealth)

    async def _probe(self, server: _Server) -> None:
        try:
            server.health = await self._health(server)
        except (httpx.HTTPError, RemoteServerError, msgspec.DecodeError) as e:
            server.lost = f"{type(e).__name__}: {e}"
            log.error("rollout_server_unreachable", server=server.address, error=server.lost)

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("RemoteGenerationEngine used before start() or after aclose()")
        return self._client

    def _pick(self, group: str) -> _Server:
        placed = self._groups.get(group)
        if placed is not None and not placed[0].lost:
            server, count = placed
        else:
            live = self.live
            if not live:
                raise RemoteServerError("every rollout server is lost: " + "; ".join(f"{s.address} ({s.lost})" for s in self.servers))
            server, count = min(live, key=lambda s: s.in_flight), 0
        self._groups[group] = (server, count + 1)
        return server

    def _release(self, group: str, server: _Server) -> None:
        placed = self._groups.get(group)
        if placed is None or placed[0] is not server:
            return
        if placed[1] <= 1:
            del self._groups[group]
        else:
            self._groups[group] = (server, placed[1] - 1)

    def _lose(self, server: _Server, exc: BaseException) -> None:
        if not server.lost:
            server.lost = f"{type(exc).__name__}: {exc}"
            self.incarnation += 1
            log.error("rollout_server_lost", server=server.address, error=server.lost, live=[s.address for s in self.live])

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        group = request.group or request.request_id.rpartition("/")[0]  # the rollouter's, else "{tag}/{uid}" of "{tag}/{uid}/{i}"
        server = self._pick(group)
        server.in_flight += 1
        server.sent += 1
        try:
            response = await self._http.post(
                f"{server.url}/generate",
                content=msgspec.json.encode(request),
                headers={"content-type": "application/json"},
                timeout=self.generation_timeout,
            )
        except httpx.HTTPError as e:
            if _is_lost(e):
                self._lose(server, e)
            raise RemoteServerError(f"rollout server {server.address}: POST /generate failed: {type(e).__name__}: {e}") from e
        finally:
            server.in_flight -= 1
            self._release(group, server)
        _raise_for_status(server, "POST /generate", response)
        return msgspec.json.decode(response.content, type=GenerationResult)

    async def abort_all(self) -> None:
        """Every server returns its running generations with their tokens so far (finish_reason 'abort')."""
        await self._on_every_server("abort_all", lambda s: self._post(s, "/abort_all"), need_one=False)

    async def aclose(self) -> None:
        """Abort what runs on the servers (they keep running: the user started them), close the client."""
        if self._client is None:
            return
        self._ready = anyio.Event()
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.control_timeout):
                await self.abort_all()
        except RemoteServerError as e:  # closing must not mask the run's own outcome
            log.warning("rollout_server_abort_failed", error=str(e))
        finally:
            client, self._client = self._client, None
            with anyio.CancelScope(shield=True):
                await client.aclose()

    # -- what the weight transports use ---------------------------------------------------------

    async def _post(self, server: _Server, path: str, *, content: bytes = b"", timeout: float | None = None) -> bytes:
        response = await self._http.post(f"{server.url}{path}", content=content, timeout=timeout or self.control_timeout)
        _raise_for_status(server, f"POST {path}", response)
        return response.content

    async def _on_every_server(
        self, what: str, call: Callable[[_Server], Awaitable[Any]], *, tolerate_loss: bool = True, need_one: bool = True
    ) -> None:
        """`call` on every live server at once; a lost server is marked (or, with tolerate_loss=False, fatal).

        need_one: raise when no server is left to have done it (a weight push); not for abort/resume,
        which have nothing to do on a server that is gone.
        """
        errors: list[str] = []

        async def one(server: _Server) -> None:
            try:
                await call(server)
            except httpx.HTTPError as e:
                if _is_lost(e):
                    self._lose(server, e)
                    if tolerate_loss:
                        return
                errors.append(f"rollout server {server.address}: {what} failed: {type(e).__name__}: {e}")
            except RemoteServerError as e:
                errors.append(str(e))

        async with anyio.create_task_group() as tg:
            for server in self.live:
                tg.start_soon(one, server)
        if errors:
            raise RemoteServerError("; ".join(errors))
        if need_one and not self.live:
            raise RemoteServerError(f"{what}: every rollout server is lost: " + "; ".join(f"{s.address} ({s.lost})" for s in self.servers))

    async def push_state(self, blob: bytes, version: int) -> None:
        """POST a safetensors state dict (empty for simulated servers) to every live server, which then serves `version`."""
        await self._on_every_server("POST /weights", lambda s: self._post(s, f"/weights?version={version}", content=blob))

    async def wait_ready(self) -> None:
        """Wait for `start` (the supervisor may be restarting the engine now)."""
        with anyio.fail_after(self.control_timeout):
            await self._ready.wait()

    async def pause(self) -> None:
        await self._on_every_server("pause", lambda s: self._post(s, "/pause"), tolerate_loss=False)

    async def resume(self) -> None:
        await self._on_every_server("resume", lambda s: self._post(s, "/resume"), need_one=False)

    async def nccl_init(self, host: str, port: int) -> int:
        """Ask every live server's workers to join the trainer's group; returns the world size."""
        offsets, world = {}, 1
        for server in self.live:
            offsets[server.address] = world
            world += server.health.workers if server.health is not None else 1

        def init(server: _Server) -> Awaitable[bytes]:
            body = NcclInit(host=host, port=port, rank_offset=offsets[server.address], world_size=world)
            return self._post(server, "/weights/nccl_init", content=msgspec.json.encode(body))

        await self._on_every_server("nccl_init", init, tolerate_loss=False)
        return world

    async def nccl_load(self, meta: Meta, numel: int, version: int) -> None:
        body = msgspec.json.encode(NcclLoad(meta=meta, numel=numel, version=version))
        await self._on_every_server("nccl_load", lambda s: self._post(s, "/weights/nccl_load", content=body), tolerate_loss=False)

    async def healths(self) -> list[ServerHealth]:
        """GET /health of every live server (tests, tools)."""
        return [await self._health(server) for server in self.live]
