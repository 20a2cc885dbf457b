"""One FSDP2 training process (one GPU); `FSDPTrainEngine` starts `trainer.n_gpus_per_node` of them.

The process owns a shard of the policy (FSDP2 `fully_shard` per decoder layer, bf16 compute,
fp32 gradient reduction), of the reference policy when `algorithm.kl_coef > 0`, its optimizer and
LR schedule, and — on rank 0 — the flat bf16 buffer that weight syncs send. It obeys typed msgspec
commands from a pipe and answers each with one `Reply`; every rank gets every command, so
collectives (FSDP all-gathers, the optimizer step, gathering full weights) line up. On CPU
(tests) it runs the same code over gloo.

A training step is `torch_policy.StepRunner.run`, the CPU trainer's own: collation, loss,
updates and metrics are shared. What is FSDP's alone lives here (`_ShardedStep`): rows dealt to
ranks with the same number of micro-batches on each, the global grad norm of DTensors, and one
all-reduce of the step's sums. Losses are normalised by mini-batch totals over ALL ranks, so
gradient accumulation is exact across micro-batches and ranks.
"""

from __future__ import annotations

import math
import os
import pickle
import socket
import time
import traceback
from typing import Any

import msgspec

from asyncpolicy.config import Config
from asyncpolicy.engines.torch_policy import (
    PolicyLogprobs,
    StepRunner,
    compile_layers,
    make_optimizer,
    make_scheduler,
)
from asyncpolicy.samples import Sample

# ---- messages ---------------------------------------------------------------------------------


class WorkerInit(msgspec.Struct, kw_only=True):
    """What a rank needs to start: where it sits, the model directory and the run's configuration."""

    model_path: str
    config: Config  # the run's; the trainer, algorithm, model and rollout.temperature sections apply
    rank: int = 0  # rank, world_size, gpu and master_port are set per process by FSDPTrainEngine.start
    world_size: int = 1
    gpu: int | None = None  # physical GPU index; None = CPU (gloo), for tests
    master_port: int = 0
    peak_flops: float = 989e12  # dense bf16 of one H100/H200 SXM, for MFU


class Train(msgspec.Struct, tag="train", kw_only=True):
    batch: list[Sample]
    version: int


class Pack(msgspec.Struct, tag="pack"):
    """Gather full weights from the shards into rank 0's flat bf16 buffer (all ranks take part)."""


class IpcHandle(msgspec.Struct, tag="ipc_handle"):
    """Rank 0: a CUDA IPC handle of the flat buffer, pickled (a vLLM worker on the same GPU opens it)."""


class NcclInit(msgspec.Struct, tag="nccl_init", kw_only=True):
    host: str
    port: int
    world_size: int  # 1 (trainer rank 0) + the vLLM workers


class NcclSend(msgspec.Struct, tag="nccl_send"):
    """Rank 0: broadcast the flat buffer to the vLLM workers."""


class NcclBench(msgspec.Struct, tag="nccl_bench", kw_only=True):
    repeats: int


class Checksum(msgspec.Struct, tag="checksum"):
    pass


class SaveState(msgspec.Struct, tag="save_state", kw_only=True):
    """Every rank writes its shards (torch.distributed.checkpoint) into `directory`."""

    directory: str


class LoadState(msgspec.Struct, tag="load_state", kw_only=True):
    directory: str


class SaveModel(msgspec.Struct, tag="save_model", kw_only=True):
    """Rank 0 writes the full model as a Hugging Face directory (all ranks help gather it)."""

    directory: str


class FullState(msgspec.Struct, tag="full_state"):
    """Rank 0 answers with the full state dict (torch.save bytes, CPU tensors, HF names)."""


class Stop(msgspec.Struct, tag="stop"):
    pass


Command = (
    Train | Pack | IpcHandle | NcclInit | NcclSend | NcclBench | Checksum | SaveState | LoadState | SaveModel | FullState | Stop
)


class Reply(msgspec.Struct, kw_only=True):
    rank: int
    ok: bool
    error: str = ""
    metrics: dict[str, float] = {}
    meta: list[tuple[str, list[int], int, int]] = []  # flat-buffer layout: (name, shape, offset, numel)
    blob: bytes = b""
    value: float = 0.0


_encoder = msgspec.msgpack.Encoder()
_cmd_decoder = msgspec.msgpack.Decoder(Command)
reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the process --------------------------------------------------------------------------------


class _ShardedStep(StepRunner):
    """The shared training step on one FSDP rank: the global grad norm of DTensor gradients and the
    step's sums over all ranks (its share of the rows is `StepRunner.micro_batches`' by rank)."""

    def __init__(self, *args: Any, rank: int, dist: Any) -> None:
        super().__init__(*args)
        self.rank = rank  # the micro-batch plan deals rows by rank (plan_micro_batches)
        self.dist = dist

    def clip_grad_norm(self) -> Any:
        norm = super().clip_grad_norm()
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor: same on every rank

    def all_reduce(self, sums: Any, maxes: Any) -> None:
        self.dist.all_reduce(sums)
        self.dist.all_reduce(maxes, op=self.dist.ReduceOp.MAX)


class _Policy:
    """Model (and reference), optimizer, schedule and weight-sync buffers of one rank."""

    def __init__(self, init: WorkerInit) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        cfg = init.config
        self.init = init
        self.torch = torch
        cuda = init.gpu is not None
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{init.master_port}",
            rank=init.rank,
            world_size=init.world_size,
            device_id=self.device if cuda else None,
        )
        self.dist = dist
        mesh = init_device_mesh(self.device.type, (init.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
        model = self._load_model()
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.trainer.compile:
            compile_layers(model)  # before sharding: fully_shard wraps the compiled layers
        self.names = [n for n, _ in model.named_parameters()]  # HF names; tied weights appear once
        self.n_params = sum(p.numel() for p in model.parameters())
        # Small models: keep layers gathered from forward to backward (ZeRO-2-like): the memory
        # is small and it saves one all-gather per layer per micro-batch (two with recompute).
        kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.n_params > 2e9}
        if mp is not None:
            kw["mp_policy"] = mp
        chunk = cfg.trainer.logprob_chunk_tokens
        self.module = self._shard(PolicyLogprobs(model, cfg.rollout.temperature, chunk), kw)
        ref = None
        if cfg.algorithm.kl_coef > 0:  # the initial model at model.path, sharded like the policy, frozen
            ref_model = self._load_model().requires_grad_(False)
            # no backward to keep its layers gathered for: free them after each forward
            ref = self._shard(PolicyLogprobs(ref_model, cfg.rollout.temperature, chunk), {**kw, "reshard_after_forward": True}).eval()
        self.cfg = model.config
        self.opt = make_optimizer(self.module.parameters(), cfg)
        self.sched = make_scheduler(self.opt, cfg)
        pad = self.cfg.pad_token_id
        self.step = _ShardedStep(
            cfg, self.module, ref, self.opt, self.sched, self.device, pad if isinstance(pad, int) else 0,
            init.world_size, rank=init.rank, dist=dist,
        )
        self.steps = 0
        self.flat: Any = None
        self.meta: list[tuple[str, list[int], int, int]] = []
        self.group: Any = None

    def _load_model(self) -> Any:
        """The causal LM at model_path; a directory with only a config gets the same seeded random
        init on every rank (and for the reference)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        torch, init = self.torch, self.init
        torch.manual_seed(init.config.seed)
        dtype = getattr(torch, init.config.model.dtype)
        attn = init.config.trainer.attn_implementation
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(init.model_path))
        if has_weights:
            model = AutoModelForCausalLM.from_pretrained(init.model_path, dtype=dtype, attn_implementation=attn)
        else:
            config = AutoConfig.from_pretrained(init.model_path)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        model.config.use_cache = False
        # transformers declares `to` with @wraps(nn.Module.to), which types it as unbound (self first)
        return model.to(self.device)  # type: ignore[arg-type]

    def _shard(self, wrapper: Any, kw: dict[str, Any]) -> Any:
        from torch.distributed.fsdp import fully_shard

        for layer in wrapper.model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(wrapper, **kw)  # root: embeddings, final norm, lm_head
        return wrapper

    # -- training --

    def train(self, cmd: Train) -> dict[str, float]:
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats()  # the peak of this step, not of the process so far
        m = self.step.run(cmd.batch, cmd.version)
        self.steps += 1
        if self.device.type == "cuda":
            # 6 N flops per trained token (forward 2N + backward 4N), recompute not counted: model FLOPs
            flops_per_s = 6.0 * self.n_params * m["perf/train_tokens_per_s"]
            m["perf/mfu"] = flops_per_s / (self.init.peak_flops * self.init.world_size)
            m["perf/gpu_mem_peak_GB"] = self.torch.cuda.max_memory_allocated() / 2**30
        return m

    # -- weights out --

    def pack(self) -> tuple[list[tuple[str, list[int], int, int]], float]:
        """Full tensors from the shards → rank 0's flat bf16 buffer (allocated once)."""
        torch = self.torch
        t0 = time.perf_counter()
        params = dict(self.module.model.named_parameters())
        if self.flat is None and self.init.rank == 0:
            total = sum(params[n].numel() if not hasattr(params[n], "full_tensor") else math.prod(params[n].shape) for n in self.names)
            self.flat = torch.empty(total, dtype=torch.bfloat16, device=self.device)
        meta: list[tuple[str, list[int], int, int]] = []
        off = 0
        with torch.no_grad():
            for name in self.names:
                p = params[name]
                full = p.full_tensor() if hasattr(p, "full_tensor") else p  # all ranks: all-gather
                n = full.numel()
                if self.init.rank == 0:
                    self.flat[off : off + n].copy_(full.reshape(-1))
                meta.append((name, list(full.shape), off, n))
                off += n
                del full
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.meta = meta
        return meta, time.perf_counter() - t0

    def ipc_handle(self) -> bytes:
        from torch.multiprocessing.reductions import reduce_tensor

        if self.flat is None:
            raise RuntimeError("ipc_handle before pack: no flat buffer")
        _, args = reduce_tensor(self.flat)
        return pickle.dumps(args)

    def nccl_init(self, cmd: NcclInit) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        pg = StatelessProcessGroup.create(host=cmd.host, port=cmd.port, rank=0, world_size=cmd.world_size)
        self.group = PyNcclCommunicator(pg, device=self.device)

    def nccl_send(self) -> float:
        torch = self.torch
        if self.group is None or self.flat is None:
            raise RuntimeError("nccl_send needs nccl_init and pack first")
        t0 = time.perf_counter()
        stream = torch.cuda.current_stream()
        self.group.broadcast(self.flat, src=0, stream=stream)
        stream.synchronize()
        return time.perf_counter() - t0

    def save_state(self, directory: str) -> None:
        import json

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.module, self.opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=directory)
        if self.init.rank == 0:
            with open(os.path.join(directory, "trainer_state.json"), "w") as f:
                json.dump({"steps": self.steps, "scheduler": self.sched.state_dict()}, f)
        self.dist.barrier()

    def load_state(self, directory: str) -> None:
        import json

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.module, self.opt)
        state: dict[str, Any] = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(self.module, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        with open(os.path.join(directory, "trainer_state.json")) as f:
            meta = json.load(f)
        self.steps = int(meta["steps"])
        self.sched.load_state_dict(meta["scheduler"])

    def full_state_dict(self) -> dict[str, Any]:
        """Full CPU tensors under Hugging Face names on rank 0 ({} elsewhere); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in sd.items()}  # the wrapper holds the HF model as .model

    def save_model(self, directory: str) -> None:
        """safetensors + config + generation config + tokenizer: what transformers and vLLM load."""
        sd = self.full_state_dict()
        if self.init.rank == 0:
            from transformers import AutoTokenizer

            self.module.model.save_pretrained(directory, state_dict=sd, safe_serialization=True)
            AutoTokenizer.from_pretrained(self.init.model_path).save_pretrained(directory)
        self.dist.barrier()

    def full_state_blob(self) -> bytes:
        import io

        sd = self.full_state_dict()
        if self.init.rank != 0:
            return b""
        buf = io.BytesIO()
        self.torch.save(sd, buf)
        return buf.getvalue()

    def checksum(self) -> float:
        params = dict(self.module.model.named_parameters())
        total = 0.0
        with self.torch.no_grad():
            for name in self.names:
                p = params[name]
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                total += float(full.to(self.torch.bfloat16).double().sum())  # what vLLM holds: bf16
        return total


def worker_main(init_blob: bytes, conn: Any) -> None:
    """Entry point of a spawned worker process."""
    from asyncpolicy.engines.child_procs import exit_with_parent, ignore_terminal_signals

    ignore_terminal_signals()  # the terminal's Ctrl-C is the supervisor's to handle: it stops us by command
    init = msgspec.msgpack.decode(init_blob, type=WorkerInit)
    exit_with_parent(f"fsdp worker rank {init.rank}")  # a kill -9'd supervisor takes its ranks along
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file bars would drown the run's own progress line
    if init.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(init.gpu)  # before CUDA is touched in this process
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        policy = _Policy(init)
    except Exception:
        conn.send_bytes(encode(Reply(rank=init.rank, ok=False, error=traceback.format_exc())))
        return
    conn.send_bytes(encode(Reply(rank=init.rank, ok=True, value=float(policy.n_params))))
    while True:
        try:
            cmd = _cmd_decoder.decode(conn.recv_bytes())
        except EOFError:  # the engine is gone: nothing left to do
            return
        if init.rank == 0:
            _debug_hold(cmd)
        try:
            reply = _handle(policy, cmd, init.rank)
        except Exception:
            reply = Reply(rank=init.rank, ok=False, error=traceback.format_exc())
        conn.send_bytes(encode(reply))
        if isinstance(cmd, Stop):
            policy.dist.destroy_process_group()
            return


DEBUG_HOLD_ENV = "ASYNCPOLICY_DEBUG_HOLD"


def _debug_hold(cmd: Any) -> None:
    """Tests: with ASYNCPOLICY_DEBUG_HOLD=TAG=DIR, hold a TAG command (e.g. `train`, `full_state`)
    until DIR/TAG.release exists, after creating DIR/TAG.reached — a signal can then be sent while
    the command is known to be in progress. Bounded: at most 300 s."""
    spec = os.environ.get(DEBUG_HOLD_ENV, "")
    tag, _, directory = spec.partition("=")
    if not directory or type(cmd).__struct_config__.tag != tag:
        return
    open(os.path.join(directory, f"{tag}.reached"), "w").close()
    release = os.path.join(directory, f"{tag}.release")
    deadline = time.monotonic() + 300
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)


def _handle(policy: _Policy, cmd: Any, rank: int) -> Reply:
    if isinstance(cmd, Train):
        return Reply(rank=rank, ok=True, metrics=policy.train(cmd))
    if isinstance(cmd, Pack):
        meta, dt = policy.pack()
        return Reply(rank=rank, ok=True, meta=meta, value=dt)
    if isinstance(cmd, IpcHandle):
        return Reply(rank=rank, ok=True, blob=policy.ipc_handle() if rank == 0 else b"")
    if isinstance(cmd, NcclInit):
        if rank == 0:
            policy.nccl_init(cmd)
        return Reply(rank=rank, ok=True)
    if isinstance(cmd, NcclSend):
        return Reply(rank=rank, ok=True, value=policy.nccl_send() if rank == 0 else 0.0)
    if isinstance(cmd, NcclBench):
        times = [policy.nccl_send() for _ in range(cmd.repeats)] if rank == 0 else [0.0]
        return Reply(rank=rank, ok=True, value=min(times))
    if isinstance(cmd, Checksum):
        return Reply(rank=rank, ok=True, value=policy.checksum())
    if isinstance(cmd, SaveState):
        policy.save_state(cmd.directory)
        return Reply(rank=rank, ok=True)
    if isinstance(cmd, LoadState):
        policy.load_state(cmd.directory)
        return Reply(rank=rank, ok=True)
    if isinstance(cmd, SaveModel):
        policy.save_model(cmd.directory)
        return Reply(rank=rank, ok=True)
    if isinstance(cmd, FullState):
        return Reply(rank=rank, ok=True, blob=policy.full_state_blob())
    if isinstance(cmd, Stop):
        return Reply(rank=rank, ok=True)
    raise TypeError(f"unknown command {type(cmd).__name__}")

