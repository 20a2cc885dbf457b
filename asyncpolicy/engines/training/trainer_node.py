"""`python -m asyncpolicy trainer-node`: the FSDP ranks of one more node of a multi-node trainer.

Node 0 runs `python -m asyncpolicy run` (the supervisor and node 0's ranks); every other node runs
`trainer-node` with the same config and its own `trainer.node_rank`. This process starts that
node's `trainer.n_gpus_per_node` ranks (one CPU rank with 0), which join node 0's rendezvous and
take every command from global rank 0 (fsdp_worker's relay); no RPC of our own beyond
torch.distributed's. It exits when they do: 0 after the run's Stop, 1 naming the first rank
that failed (it kills the others at once rather than leave them to time out).

Signals: the ranks ignore the terminal's SIGINT/SIGTERM, as node 0's do (srun and Kubernetes send
them to every task of the job): the run stops from node 0, whose supervisor writes its stop
checkpoint, with every rank's shards, then sends Stop. This process answers a first SIGINT/SIGTERM
with a line saying so; a second kills its ranks and exits (130/143).
"""

from __future__ import annotations

import multiprocessing.connection
import signal
import sys
from types import FrameType
from typing import Any

import structlog

from asyncpolicy.config import Config
from asyncpolicy.errors import ConfigError

log = structlog.get_logger("asyncpolicy.trainer_node")


def check_node_config(cfg: Config) -> None:
    """`trainer-node` is for nodes 1..nnodes-1 of an FSDP trainer; anything else is bad input."""
    t = cfg.trainer
    if t.nnodes == 1:
        raise ConfigError(
            "config key 'trainer.nnodes': trainer-node starts a node of a multi-node trainer and needs trainer.nnodes > 1",
            key="trainer.nnodes",
        )
    if t.node_rank == 0:
        raise ConfigError(
            "config key 'trainer.node_rank': node 0 is `python -m asyncpolicy run` (the supervisor); "
            f"trainer-node takes 1..{t.nnodes - 1}",
            key="trainer.node_rank",
        )


class _Signals:
    """First SIGINT/SIGTERM: say that node 0 stops the run. Second: raise, so the ranks are killed."""

    def __init__(self, node: int) -> None:
        self.node = node
        self.seen = 0
        self.last = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.seen += 1
        self.last = signum
        if self.seen == 1:
            log.warning(
                "trainer_node_signal", node=self.node, signal=signal.Signals(signum).name,
                note="node 0 stops the run (stop checkpoint, then Stop reaches these ranks); send it again to kill them now",
            )
            return
        raise KeyboardInterrupt


def run_trainer_node(cfg: Config) -> int:
    """Start this node's ranks and wait for them; the process's exit code."""
    import torch.multiprocessing as mp

    from asyncpolicy.engines.training import fsdp_worker as w
    from asyncpolicy.engines.child_procs import children_shielded
    from asyncpolicy.engines.training.placement import node_gpus, worker_init
    from asyncpolicy.models.tiny import resolve_model_path

    check_node_config(cfg)
    t = cfg.trainer
    base = worker_init(cfg, resolve_model_path(cfg))
    gpus = node_gpus(cfg)
    first = t.node_rank * len(gpus)
    ctx = mp.get_context("spawn")
    procs: dict[int, Any] = {}
    with children_shielded():
        for i, gpu in enumerate(gpus):
            init = w.rank_init(base, first + i, gpu, len(gpus), t.master_port)
            proc = ctx.Process(target=w.worker_main, args=(w.encode(init), None), name=f"fsdp-rank{first + i}", daemon=True)
            proc.start()
            procs[first + i] = proc
    log.info("trainer_node_started", node=t.node_rank, ranks=list(procs), gpus=gpus, master=f"{t.master_addr}:{t.master_port}")
    signals = _Signals(t.node_rank)
    old = {sig: signal.signal(sig, signals) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(procs, t.node_rank)
    except KeyboardInterrupt:
        log.warning("trainer_node_killed", node=t.node_rank, ranks=[r for r, p in procs.items() if p.is_alive()])
        return 130 if signals.last in (0, signal.SIGINT) else 143
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.kill()  # they ignore SIGTERM (see child_procs)
            proc.join(10)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _wait(procs: dict[int, Any], node: int) -> int:
    """0 once every rank exited cleanly; 1 at the first that did not (the caller kills the rest)."""
    alive = {proc.sentinel: (rank, proc) for rank, proc in procs.items()}
    while alive:
        for sentinel in multiprocessing.connection.wait(list(alive)):
            rank, proc = alive.pop(sentinel)
            proc.join()
            if proc.exitcode != 0:
                log.error("trainer_node_failed", node=node, rank=rank, exit_code=proc.exitcode)
                print(f"asyncpolicy: trainer node {node}: rank {rank} exited with code {proc.exitcode}", file=sys.stderr)
                return 1
    log.info("trainer_node_finished", node=node, ranks=list(procs))
    return 0
