"""Data-parallel generation: N independent replica engines behind one `GenerationEngine`.

Invariants:

* every `generate` call is answered exactly once: by the replica it was routed to, by another
  replica when that one died under it or was restarted under it (a *failover*; a request
  stopped by a restart goes on from its tokens so far), or with finish_reason "abort" when
  `abort_all` ran (also while it waited for a replica to come back);
* routing is `ReplicaRouter`, a pure policy: a request goes to its group's replica while that
  replica is up (a prompt's responses share its prefix cache; an agentic episode's next turn, sent
  after a tool call when none of its group's requests runs, finds the replica of the group's last
  request among the `RECENT_GROUPS` it remembers), else to the up replica with the fewest tokens
  in flight (sum of `max_tokens` still to generate of its running requests), ties by index;
* a replica is *down* once it reports itself dead (`errored`) or after `failures_to_down`
  consecutive failed calls; a failed call on a replica that is still up is raised to the caller
  (the rollouter's retry path, which retries on the same replica), a failed call on a down replica
  is retried on another one inside `generate` — one replica's death never costs the rollouter a
  retry or, worse, a restart of every replica;
* `serve` (run by the owner, the supervisor, in its task group) restarts down replicas, at most
  `max_restarts` times each, then has the owner reload the current weights into them
  (`reload_weights`: a forced sync) before they are routed to again. Nothing runs outside it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Self

import anyio
import anyio.abc
import anyio.lowlevel
import msgspec
import structlog

from asyncpolicy import counters
from asyncpolicy.channels.signal import StateSignal
from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import GenerationEngine, GenerationRequest, GenerationResult
from asyncpolicy.errors import AsyncPolicyError

log = structlog.get_logger("asyncpolicy.replicas")


class NoReplicaAvailable(AsyncPolicyError):
    """Every replica is down and none will be restarted."""


class _Running(msgspec.Struct):
    replica: int
    group: str
    cost: int


RECENT_GROUPS = 4096  # groups whose requests all ended, remembered (oldest forgotten first): bounded memory


class ReplicaRouter:
    """Which replica serves a request. Pure bookkeeping: no I/O, no awaits, tested alone.

    `pick` chooses, `begin`/`end` account a request on the replica it runs on; `load[k]` is
    always the sum of the costs (tokens still to generate) of the requests running on `k`.
    """

    def __init__(self, n: int, failures_to_down: int = 1) -> None:
        if n < 1:
            raise ValueError("a router needs at least one replica")
        self.n = n
        self.failures_to_down = max(1, failures_to_down)
        self.up = [True] * n
        self.load = [0] * n
        self.consecutive_failures = [0] * n
        self._groups: dict[str, tuple[int, int]] = {}  # group → (replica, requests running); forgotten at 0
        self._recent: OrderedDict[str, int] = OrderedDict()  # group → replica of its last request, once none runs
        self._running: dict[int, _Running] = {}
        self._tickets = itertools.count()

    def pick(self, group: str) -> int | None:
        """The replica for a new request of `group`; None when no replica is up."""
        sticky = self._groups.get(group)
        if sticky is not None and self.up[sticky[0]]:
            return sticky[0]
        recent = self._recent.get(group) if sticky is None else None
        if recent is not None and self.up[recent]:
            return recent
        live = [k for k in range(self.n) if self.up[k]]
        if not live:
            return None
        return min(live, key=lambda k: (self.load[k], k))

    def replica_of(self, group: str) -> int | None:
        """The replica the group's running requests are on, if any run."""
        sticky = self._groups.get(group)
        return sticky[0] if sticky is not None else None

    def begin(self, replica: int, group: str, cost: int) -> int:
        """Account a request starting on `replica`; returns its ticket for `end`."""
        ticket = next(self._tickets)
        self._running[ticket] = _Running(replica, group, cost)
        self.load[replica] += cost
        held = self._groups.get(group)
        if held is None or held[0] != replica:  # new, or moved off a replica that went down
            held = (replica, 0)
        self._groups[group] = (replica, held[1] + 1)
        self._recent.pop(group, None)
        return ticket

    def end(self, ticket: int, *, ok: bool | None, dead: bool = False) -> bool:
        """Account a request's end: ok=True success, False failure, None cancelled (neither).

        Returns True when this failure took its replica down (dead, or failures_to_down in a row).
        """
        run = self._running.pop(ticket)
        k = run.replica
        self.load[k] -= run.cost
        held = self._groups.get(run.group)
        if held is not None and held[0] == k:
            if held[1] <= 1:
                del self._groups[run.group]
                self._recent[run.group] = k  # a later request of the group (an episode's next turn) comes back here
                if len(self._recent) > RECENT_GROUPS:
                    self._recent.popitem(last=False)
            else:
                self._groups[run.group] = (k, held[1] - 1)
        if ok:
            self.consecutive_failures[k] = 0
        elif ok is False:
            self.consecutive_failures[k] += 1
            if self.up[k] and (dead or self.consecutive_failures[k] >= self.failures_to_down):
                self.up[k] = False
                return True
        return False

    def mark_down(self, replica: int) -> bool:
        """Take a replica out of routing (its owner saw it fail); True when it was up."""
        was_up = self.up[replica]
        self.up[replica] = False
        return was_up

    def mark_up(self, replica: int) -> bool:
        """A restarted replica, holding the current weights, takes requests again; True when it does.

        Not while requests of its previous engine are still accounted on it: a group that moved
        away meanwhile would then run on two live replicas.
        """
        if self.running_on(replica):
            return False
        self.up[replica] = True
        self.consecutive_failures[replica] = 0
        return True

    def running_on(self, replica: int) -> int:
        return sum(1 for r in self._running.values() if r.replica == replica)


class ReplicaCounters(msgspec.Struct, frozen=True, kw_only=True):
    """Monotone counters of the replica set, for metrics (`rollout/replica_*`); checkpoints hold them."""

    failovers: int = 0  # requests moved off a replica that died under them
    restarts: int = 0  # replica restarts begun by `serve`
    downs: int = 0  # times a replica was taken out of routing


class ReplicaStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A consistent view of the replica set now; metrics and logs read these, never the internals."""

    counters: ReplicaCounters
    up: tuple[bool, ...]  # per replica: routed to
    load: tuple[int, ...]  # per replica: tokens still to generate of its running requests
    restarting: int  # replicas being restarted now


def _errored(engine: Any) -> bool:
    """Whether the engine says it cannot serve until restarted (vLLM's dead engine core, ...)."""
    return bool(getattr(engine, "errored", False))


class ReplicatedGeneration:
    """`GenerationEngine` over `replicas`; the weight transport pushes into `push_targets()`."""

    def __init__(
        self,
        replicas: Sequence[GenerationEngine],
        *,
        max_restarts: int,
        failures_to_down: int = 1,
        restart_timeout_s: float = 900.0,
        call_timeout_s: float = math.inf,
    ) -> None:
        self.replicas = list(replicas)
        self.router = ReplicaRouter(len(self.replicas), failures_to_down)
        self.max_restarts = max_restarts
        self.restart_timeout_s = restart_timeout_s
        self.call_timeout_s = call_timeout_s  # the caller's bound on one call (the rollouter's generation_timeout)
        self._counters = ReplicaCounters()
        self.restarts_of = [0] * len(self.replicas)  # per replica, since the last `start`
        self._changed = StateSignal()
        self._abort: anyio.Event | None = None
        self._loading: set[int] = set()  # restarted, waiting for weights: pushed to, not routed to
        self._restarting: dict[int, anyio.CancelScope] = {}
        self._serving = False
        self._version = 0

    @classmethod
    def for_config(cls, cfg: Config, replicas: Sequence[GenerationEngine]) -> Self:
        """Replicas with the run's budgets: a replica is taken down when it reports itself dead or
        after `rollout.max_retries + 1` failed calls in a row (when the rollouter would restart a
        lone engine), and restarted at most `rollout.max_restarts` times."""
        return cls(
            replicas,
            max_restarts=cfg.rollout.max_restarts,
            failures_to_down=cfg.rollout.max_retries + 1,
            restart_timeout_s=cfg.async_training.generation_timeout * 10,
            call_timeout_s=cfg.async_training.generation_timeout,
        )

    # -- GenerationEngine ----------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    async def start(self) -> None:
        """Start the replicas one after another (vLLM takes its devices from the process
        environment while it builds an engine), then route to all of them."""
        for replica in self.replicas:
            await replica.start()
        self.router = ReplicaRouter(len(self.replicas), self.router.failures_to_down)
        self.restarts_of = [0] * len(self.replicas)
        self._abort = anyio.Event()
        self._changed.notify()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        group = request.group or request.request_id
        cost = max(0, request.max_tokens - len(request.response_tokens))
        while True:
            k = self.router.pick(group)
            if k is None:
                if not await self._wait_for_replica():
                    return GenerationResult.so_far(request, "abort")  # aborted before any replica took it
                continue
            ticket = self.router.begin(k, group, cost)
            outcome: bool | None = None
            abort, restarts = self._abort, self.restarts_of[k]
            began = time.monotonic()
            try:
                result = await self.replicas[k].generate(request)
                outcome = True
                restarted = self.restarts_of[k] != restarts or not self.router.up[k]
                if result.finish_reason != "abort" or not restarted or (abort is not None and abort.is_set()):
                    return result
                # stopped by its replica's restart, not by `abort_all`: go on elsewhere from its tokens
                request = msgspec.structs.replace(
                    request,
                    response_tokens=result.response_tokens,
                    behaviour_logprobs=result.behaviour_logprobs,
                    token_versions=result.token_versions,
                )
                cost = max(0, request.max_tokens - len(request.response_tokens))
                self._counters = counters.add(self._counters, failovers=1)
                log.warning("replica_failover", request_id=request.request_id, replica=k, error="aborted by its restart")
            except Exception as exc:  # the replica failed this call: down (fail over) or not (raise)
                outcome = False
                if self.router.end(ticket, ok=False, dead=_errored(self.replicas[k])):
                    self._went_down(k, exc)
                ticket = -1
                if self.router.up[k]:
                    raise
                self._counters = counters.add(self._counters, failovers=1)
                log.warning("replica_failover", request_id=request.request_id, replica=k, error=repr(exc))
            finally:
                if ticket >= 0:
                    # Cancelled when the caller's timeout ran out: a hung replica, counted as its failure
                    # (else its load drops to 0 on every cancel and it draws ever more requests). The
                    # caller's clock started a moment before ours: 90 % of the bound is "ran out".
                    if outcome is None and time.monotonic() - began >= 0.9 * self.call_timeout_s:
                        outcome = False
                    if self.router.end(ticket, ok=outcome):
                        self._went_down(k, TimeoutError(f"no answer within {self.call_timeout_s:g}s"))
                    elif not self.router.up[k]:
                        self._changed.notify()  # a restart may wait for the old engine's requests to end

    async def abort_all(self) -> None:
        """Abort on every replica (a down one may still be finishing requests); wake requests
        waiting for a replica."""
        if self._abort is not None:
            self._abort.set()
        self._abort = anyio.Event()
        self._changed.notify()
        async with anyio.create_task_group() as tg:
            for k in range(len(self.replicas)):
                tg.start_soon(self._abort_one, k)

    async def aclose(self) -> None:
        for scope in self._restarting.values():
            scope.cancel()
        if self._abort is not None:
            self._abort.set()
        self._changed.notify()
        with anyio.move_on_after(self.restart_timeout_s):  # a replica's start may finish its step first
            await self._changed.wait_until(lambda: not self._restarting)
        async with anyio.create_task_group() as tg:
            for k in range(len(self.replicas)):
                tg.start_soon(self._close_one, k)

    # -- state ---------------------------------------------------------------------------------

    def snapshot(self) -> ReplicaCounters:
        return self._counters

    def restore(self, snap: ReplicaCounters) -> None:
        """Load a snapshot into this fresh replica set: the metrics' counts continue."""
        if self._counters != ReplicaCounters():
            raise RuntimeError("replicas: restore() needs a fresh replica set")
        self._counters = snap

    def statistics(self) -> ReplicaStatistics:
        return ReplicaStatistics(
            counters=self._counters,
            up=tuple(self.router.up),
            load=tuple(self.router.load),
            restarting=len(self._restarting),
        )

    # -- what the weight transports use ----------------------------------------------------------

    def push_targets(self) -> list[tuple[int, Any]]:
        """(index, engine) of the replicas that must get new weights: those up, and restarted ones loading."""
        return [(k, self.replicas[k]) for k in self._reachable()]

    def set_version(self, version: int) -> None:
        """Every push target now serves `version` (the transport loaded its weights into each)."""
        for _, replica in self.push_targets():
            replica.set_version(version)
        self._version = version

    def report_failure(self, replica: int, error: BaseException) -> None:
        """A transport saw `replica` fail: stop routing to it; `serve` restarts it."""
        self._loading.discard(replica)
        if self.router.mark_down(replica):
            self._went_down(replica, error)

    # -- restarts ---------------------------------------------------------------------------------

    async def serve(
        self,
        reload_weights: Callable[[], Awaitable[None]],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Restart down replicas for as long as the owner runs this (cancel it to stop).

        `reload_weights` makes every push target serve the trainer's current version (the
        owner's forced sync); a restarted replica is routed to only after it returned.
        """
        self._serving = True
        try:
            async with anyio.create_task_group() as tg:
                task_status.started()
                while True:
                    await self._changed.wait_until(lambda: self._next_restart() is not None)
                    k = self._next_restart()
                    assert k is not None
                    scope = anyio.CancelScope()
                    self._restarting[k] = scope
                    tg.start_soon(self._restart, k, scope, reload_weights)
        finally:
            self._serving = False

    def _next_restart(self) -> int | None:
        for k in range(len(self.replicas)):
            if not self.router.up[k] and k not in self._restarting and self.restarts_of[k] < self.max_restarts:
                return k
        return None

    async def _restart(self, k: int, scope: anyio.CancelScope, reload_weights: Callable[[], Awaitable[None]]) -> None:
        self.restarts_of[k] += 1
        self._counters = counters.add(self._counters, restarts=1)
        log.warning("replica_restart", replica=k, restart=self.restarts_of[k], max_restarts=self.max_restarts)
        try:
            with scope:
                try:
                    with anyio.fail_after(self.restart_timeout_s):
                        await self._close_one(k)
                        await self.replicas[k].start()
                except Exception as exc:  # it stays down; `serve` tries again while restarts are left
                    log.error("replica_restart_failed", replica=k, restart=self.restarts_of[k], error=repr(exc))
                    return
                self._loading.add(k)
                try:
                    await reload_weights()
                    loaded = k in self._loading  # a push that failed on k took it out (report_failure)
                finally:
                    self._loading.discard(k)
                if not loaded:  # the sync went ahead without k: it holds no current weights, so stays down
                    log.error("replica_reload_failed", replica=k, restart=self.restarts_of[k])
                    return
                with anyio.move_on_after(self.restart_timeout_s):  # they end as the old engine closes
                    await self._changed.wait_until(lambda: self.router.running_on(k) == 0)
                if not self.router.mark_up(k):
                    log.error("replica_old_requests_left", replica=k, running=self.router.running_on(k))
                    return
                log.info("replica_up", replica=k, version=self._version)
        finally:
            if self._restarting.get(k) is scope:
                del self._restarting[k]
            self._changed.notify()

    # -- helpers ------------------------------------------------------------------------------------

    def _reachable(self) -> list[int]:
        return [k for k in range(len(self.replicas)) if self.router.up[k] or k in self._loading]

    def _went_down(self, k: int, error: BaseException) -> None:
        self._counters = counters.add(self._counters, downs=1)
        log.error("replica_down", replica=k, running=self.router.running_on(k), error=repr(error))
        self._changed.notify()

    def _restart_possible(self) -> bool:
        return self._serving and any(
            k in self._restarting or (not self.router.up[k] and self.restarts_of[k] < self.max_restarts)
            for k in range(len(self.replicas))
        )

    async def _wait_for_replica(self) -> bool:
        """No replica is up: wait for a restart to finish (the caller bounds the wait).

        Returns False when `abort_all` ran meanwhile; raises NoReplicaAvailable when no replica
        will come back.
        """
        abort = self._abort
        while not any(self.router.up):
            if not self._restart_possible():
                raise NoReplicaAvailable(
                    f"all {len(self.replicas)} generation replicas are down and none will be restarted "
                    f"(restarts per replica: {self.restarts_of}, limit rollout.max_restarts={self.max_restarts})"
                )
            if abort is not None and abort.is_set():
                return False
            await self._changed.wait()
        return True

    async def _abort_one(self, k: int) -> None:
        try:
            await self.replicas[k].abort_all()
        except Exception as exc:  # a dying replica must not keep the others from being aborted
            self.report_failure(k, exc)

    async def _close_one(self, k: int) -> None:
        try:
            await self.replicas[k].aclose()
        except Exception as exc:  # closing a dead replica may fail; the others still close
            log.warning("replica_close_failed", replica=k, error=repr(exc))

