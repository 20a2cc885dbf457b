"""Methods mixed into every vLLM GPU worker (`worker_extension_cls`) to receive trainer weights.

vLLM runs its workers in their own processes and imports this module by name there, so it must
stay importable from PYTHONPATH with nothing but torch (and vLLM, imported lazily) around it.
Method names carry the `ap_` prefix: vLLM refuses an extension whose names clash with the
worker's own (`update_weights`, `sleep`, ...).

Both paths move ONE flat bf16 buffer holding every parameter (names, shapes and offsets in
`meta`) and hand `load_weights` views into it: one IPC handle or one NCCL broadcast per sync,
instead of one per tensor, so the fixed costs are paid once.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

# one (name, shape, offset, numel) row per parameter, offsets in elements of the flat buffer
Meta = list[tuple[str, list[int], int, int]]


def views(flat: torch.Tensor, meta: Meta) -> list[tuple[str, torch.Tensor]]:
    return [(name, flat[off : off + n].view(shape)) for name, shape, off, n in meta]


class AsyncPolicyWorkerExt:
    """Weight receive paths for asyncpolicy; `self` is vLLM's Worker (model_runner, device)."""

    # set by vLLM's Worker this class is mixed into (declared for the type checker, never assigned here)
    model_runner: Any
    vllm_config: Any

    def ap_ipc_load(self, handle_blob: bytes, meta: Meta) -> int:
        """Load weights from the trainer's flat buffer on the same GPU (CUDA IPC, no copy across)."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        cached = getattr(self, "_ap_ipc", None)
        if cached is not None and cached[0] == handle_blob:
            flat = cached[1]  # opening an IPC handle costs; the trainer's buffer never moves
        else:
            args = list(pickle.loads(handle_blob))
            args[6] = torch.cuda.current_device()  # the producer's device index means nothing here
            flat = rebuild_cuda_tensor(*args)
            self._ap_ipc = (handle_blob, flat)
        self.model_runner.model.load_weights(weights=views(flat, meta))
        torch.cuda.synchronize()  # the trainer may overwrite its buffer as soon as we return
        return len(meta)

    def ap_nccl_init(self, host: str, port: int, rank_offset: int, world_size: int) -> int:
        """Join the trainer's NCCL group (trainer is rank 0, this worker rank_offset + its rank)."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        rank = rank_offset + self.vllm_config.parallel_config.rank
        pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self._ap_group: Any = PyNcclCommunicator(pg, device=torch.cuda.current_device())
        self._ap_recv: torch.Tensor | None = None
        return rank

    def ap_nccl_load(self, meta: Meta, numel: int) -> int:
        """Receive the flat buffer broadcast by the trainer and load it (buffer kept across syncs)."""
        if getattr(self, "_ap_group", None) is None:
            raise RuntimeError("ap_nccl_load before ap_nccl_init: the NCCL group does not exist")
        if self._ap_recv is None or self._ap_recv.numel() != numel:
            self._ap_recv = torch.empty(numel, dtype=torch.bfloat16, device=torch.cuda.current_device())
        stream = torch.cuda.current_stream()
        self._ap_group.broadcast(self._ap_recv, src=0, stream=stream)
        self.model_runner.model.load_weights(weights=views(self._ap_recv, meta))
        stream.synchronize()
        return len(meta)

    def ap_nccl_recv_only(self, numel: int, repeats: int) -> int:
        """Benchmark partner of the trainer's bare broadcasts: receive, load nothing."""
        if self._ap_recv is None or self._ap_recv.numel() != numel:
            self._ap_recv = torch.empty(numel, dtype=torch.bfloat16, device=torch.cuda.current_device())
        stream = torch.cuda.current_stream()
        for _ in range(repeats):
            self._ap_group.broadcast(self._ap_recv, src=0, stream=stream)
        stream.synchronize()
        return repeats

    def ap_checksum(self) -> float:
        """Sum of every parameter (float64): tests compare it with the trainer's."""
        return float(sum(p.detach().double().sum().item() for p in self.model_runner.model.parameters()))
