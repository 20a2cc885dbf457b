"""How the FSDP trainer's ranks find each other, and how global rank 0 reaches the other nodes.

`join_process_group`: every rank signs in at a TCPStore served by global rank 0 (node 0), then
joins the process group (NCCL on GPUs, gloo on CPU); with several nodes, also a gloo group of
rank 0 and the ranks of nodes 1... `Relay` carries fsdp_worker's encoded commands out and its
replies back over that group, point to point, every wait bounded by trainer.worker_timeout_s.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from asyncpolicy.errors import RunFailed, first_line

if TYPE_CHECKING:
    from asyncpolicy.engines.training.fsdp_worker import WorkerInit


def node_of(init: WorkerInit, rank: int) -> int:
    """The node a global rank runs on (every node has the same number of ranks)."""
    return rank // (init.world_size // init.nnodes)


def join_process_group(init: WorkerInit) -> Any:
    """Join the ranks of every node (NCCL on GPUs, gloo on CPU); the relay group when there are several nodes.

    The rendezvous is a TCPStore served by global rank 0 at master_addr:master_port; each rank
    signs in, so a node that never comes is named, after trainer.worker_timeout_s, instead of
    leaving rank 0 in a rendezvous that only says how many came. That timeout also bounds every
    collective of the groups made here.
    """
    import torch
    import torch.distributed as dist

    t = init.config.trainer
    timeout = datetime.timedelta(seconds=t.worker_timeout_s)
    where = f"{init.master_addr}:{init.master_port}"
    try:
        store = dist.TCPStore(
            init.master_addr, init.master_port, init.world_size, is_master=init.rank == 0, timeout=timeout, wait_for_workers=False
        )
    except dist.DistError as e:
        raise RunFailed(
            f"trainer node {node_of(init, init.rank)} (rank {init.rank}) could not reach node 0's rendezvous at {where} "
            f"within trainer.worker_timeout_s={t.worker_timeout_s:g}s: {first_line(e)}"
        ) from None
    store.set(f"joined/{init.rank}", socket.gethostname())
    if init.rank == 0:
        try:
            store.wait([f"joined/{r}" for r in range(init.world_size)], timeout)
        except dist.DistError:
            absent = [r for r in range(init.world_size) if not store.check([f"joined/{r}"])]
            nodes = sorted({node_of(init, r) for r in absent})
            raise RunFailed(
                f"trainer node(s) {', '.join(map(str, nodes))} (rank(s) {', '.join(map(str, absent))}) did not join the "
                f"rendezvous at {where} within trainer.worker_timeout_s={t.worker_timeout_s:g}s; start "
                "`python -m asyncpolicy trainer-node` with the run's config and trainer.node_rank=N on each of them"
            ) from None
    cuda = init.gpu is not None
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        store=store,
        rank=init.rank,
        world_size=init.world_size,
        timeout=timeout,
        device_id=torch.device("cuda", 0) if cuda else None,
    )
    if init.nnodes == 1:
        return None
    local = init.world_size // init.nnodes
    group = dist.new_group([0, *range(local, init.world_size)], backend="gloo", timeout=timeout)  # every rank calls it
    return group if init.rank == 0 or init.rank >= local else None  # node 0's other ranks only read their pipes


class Relay:
    """Global rank 0 ↔ the ranks of nodes 1..: commands out, replies back, point to point over gloo.

    Point to point, in rank order, so a failure names the rank it came from (gloo's broadcast
    sends from the root to each rank anyway). Every wait is bounded by trainer.worker_timeout_s.
    """

    def __init__(self, group: Any, init: WorkerInit) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.group, self.init = torch, dist, group, init
        self.timeout = datetime.timedelta(seconds=init.config.trainer.worker_timeout_s)
        self.remote = list(range(init.world_size // init.nnodes, init.world_size))

    def _where(self, rank: int) -> str:
        return f"rank {rank} (node {node_of(self.init, rank)})"

    @contextlib.contextmanager
    def _naming(self, peer: int, what: str) -> Iterator[None]:
        """gloo's errors (a closed connection, a timeout) as a RunFailed that names the peer's rank and node."""
        try:
            yield
        except RuntimeError as e:
            raise RunFailed(f"{what} {self._where(peer)} failed: {first_line(e)}") from None

    def _send(self, blob: bytes, peers: list[int]) -> None:
        torch = self.torch
        size = torch.tensor([len(blob)], dtype=torch.int64)
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        works = []
        for peer in peers:  # posted to all before waiting on any: the peers receive at once
            with self._naming(peer, "sending to"):
                works += [(_member(self.dist.isend(t, dst=peer, group=self.group)), peer) for t in (size, data)]
        for work, peer in works:
            with self._naming(peer, "sending to"):
                work.wait(self.timeout)

    def _recv(self, peer: int) -> bytes:
        torch = self.torch
        size = torch.empty(1, dtype=torch.int64)
        with self._naming(peer, "receiving from"):
            _member(self.dist.irecv(size, src=peer, group=self.group)).wait(self.timeout)
            data = torch.empty(int(size.item()), dtype=torch.uint8)
            _member(self.dist.irecv(data, src=peer, group=self.group)).wait(self.timeout)
        return data.numpy().tobytes()

    # rank 0
    def send(self, blob: bytes) -> None:
        self._send(blob, self.remote)

    def gather(self) -> list[bytes]:
        """One reply from every rank of nodes 1.., in rank order."""
        return [self._recv(peer) for peer in self.remote]

    # the ranks of nodes 1..
    def receive(self) -> bytes:
        return self._recv(0)

    def answer(self, blob: bytes) -> None:
        self._send(blob, [0])


def _member(work: Any | None) -> Any:
    """torch.distributed returns no Work to a rank outside the group: never the case in the relay."""
    if work is None:
        raise RuntimeError("this rank is not in the relay group")
    return work
