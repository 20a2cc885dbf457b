"""One FSDP2 training process (one GPU); `FSDPTrainEngine` starts `trainer.n_gpus_per_node` of them.

The process owns a shard of the policy (FSDP2 `fully_shard` per decoder layer, bf16 compute,
fp32 gradient reduction), of the reference policy when `algorithm.kl_coef > 0`, its optimizer and
LR schedule, and — on rank 0 — the flat bf16 buffer that weight syncs send. It obeys typed msgspec
commands from a pipe and answers each with one `Reply`; every rank gets every command, so
collectives (FSDP all-gathers, the optimizer step, gathering full weights) line up. On CPU
(tests) it runs the same code over gloo.

Several nodes (`trainer.nnodes`): node 0's ranks are the supervisor's children and read its pipes;
the ranks of nodes 1.. are started by `python -m asyncpolicy trainer-node` and have no pipe.
Global rank 0 relays each command to them over a gloo group and returns their replies inside its
own (`relay.Relay`); while idle it pings them, so their wait for the next command can be bounded.

A training step is `step.StepRunner.run`, the CPU trainer's own: collation, loss,
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
import sys
import time
import traceback
from typing import Any

import msgspec

from asyncpolicy.config import Config
from asyncpolicy.engines.training.relay import Relay, join_process_group, node_of
from asyncpolicy.engines.training.setup import TrainerSummary, build_trainer
from asyncpolicy.engines.training.step import PolicyLogprobs, StepRunner
from asyncpolicy.errors import RunFailed
from asyncpolicy.samples import Sample

# ---- messages ---------------------------------------------------------------------------------


class WorkerInit(msgspec.Struct, kw_only=True):
    """What a rank needs to start: where it sits, the model directory and the run's configuration."""

    model_path: str
    config: Config  # the run's; the trainer, algorithm, model and rollout.temperature sections apply
    rank: int = 0  # global rank; rank, world_size, gpu and master_port are set per process by its starter
    world_size: int = 1  # ranks on all nodes
    gpu: int | None = None  # physical GPU index; None = CPU (gloo), for tests
    master_addr: str = "127.0.0.1"  # node 0's rendezvous (a TCPStore served by global rank 0)
    master_port: int = 0
    nnodes: int = 1  # world_size // nnodes ranks on each node; node n holds ranks n*local .. (n+1)*local-1
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
    shared_check: str = ""  # several nodes: the token node 0 wrote to SHARED_CHECK_FILE there


class LoadState(msgspec.Struct, tag="load_state", kw_only=True):
    directory: str
    shared_check: str = ""


class SaveModel(msgspec.Struct, tag="save_model", kw_only=True):
    """Rank 0 writes the full model as a Hugging Face directory (all ranks help gather it)."""

    directory: str


class FullState(msgspec.Struct, tag="full_state"):
    """Rank 0 answers with the full state dict (torch.save bytes, CPU tensors, HF names)."""


class Stop(msgspec.Struct, tag="stop"):
    pass


class Ping(msgspec.Struct, tag="ping"):
    """Rank 0 → the ranks of other nodes while the supervisor sends nothing: node 0 is alive (no reply)."""


Command = (
    Train | Pack | IpcHandle | NcclInit | NcclSend | NcclBench | Checksum | SaveState | LoadState | SaveModel | FullState
    | Stop | Ping
)


class Reply(msgspec.Struct, kw_only=True):
    rank: int
    ok: bool
    error: str = ""
    metrics: dict[str, float] = {}
    meta: list[tuple[str, list[int], int, int]] = []  # flat-buffer layout: (name, shape, offset, numel)
    blob: bytes = b""
    value: float = 0.0
    relayed: list[Reply] = []  # global rank 0 only: the replies of the other nodes' ranks, in rank order
    summary: TrainerSummary | None = None  # the start reply: the rank's set-up as built


_encoder = msgspec.msgpack.Encoder()
_cmd_decoder = msgspec.msgpack.Decoder(Command)
reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


SHARED_CHECK_FILE = ".asyncpolicy-shared-check"


def rank_init(base: WorkerInit, rank: int, gpu: int | None, local: int, port: int) -> WorkerInit:
    """What global rank `rank` starts with: `local` ranks on each of trainer.nnodes nodes."""
    t = base.config.trainer
    return msgspec.structs.replace(
        base, rank=rank, world_size=local * t.nnodes, gpu=gpu, master_addr=t.master_addr, master_port=port, nnodes=t.nnodes
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the process --------------------------------------------------------------------------------


class _ShardedStep(StepRunner):
    """The shared training step on one FSDP rank: the global grad norm of DTensor gradients and the
    step's sums over all ranks (its share of the rows is `StepRunner.micro_batches`' by rank)."""

    def __init__(self, *args: Any, dist: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)  # `rank`: the micro-batch plan deals rows by rank (plan_micro_batches)
        self.dist = dist

    def clip_grad_norm(self) -> Any:
        norm = super().clip_grad_norm()
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor: same on every rank

    def all_reduce(self, sums: Any, maxes: Any) -> None:
        self.dist.all_reduce(sums)
        self.dist.all_reduce(maxes, op=self.dist.ReduceOp.MAX)


class RankPolicy:
    """Model (and reference), optimizer, schedule and weight-sync buffers of one rank."""

    def __init__(self, init: WorkerInit) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.init = init
        self.torch = torch
        cuda = init.gpu is not None
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(0)
        self.dist = dist  # the process group is joined before (join_process_group)
        mesh = init_device_mesh(self.device.type, (init.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None

        def shard(wrapper: PolicyLogprobs, trainable: bool) -> Any:
            """FSDP2 per decoder layer, then the root (embeddings, final norm, lm_head)."""
            # Small models keep layers gathered from forward to backward (ZeRO-2-like): the memory
            # is small and it saves one all-gather per layer per micro-batch (two with recompute).
            # The reference has no backward to keep them for: free them after each forward.
            big = sum(p.numel() for p in wrapper.parameters()) > 2e9
            kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": big or not trainable}
            if mp is not None:
                kw["mp_policy"] = mp
            for layer in wrapper.model.model.layers:
                fully_shard(layer, **kw)
            fully_shard(wrapper, **kw)
            return wrapper

        setup = build_trainer(init.config, init.model_path, self.device, shard)
        self.names, self.n_params = setup.names, setup.n_params
        self.module: Any = setup.policy  # the FSDP module wrapping PolicyLogprobs (its HF model is .model)
        self.opt, self.sched = setup.optimizer, setup.scheduler
        self.step = setup.runner(_ShardedStep, world_size=init.world_size, rank=init.rank, dist=dist)
        self.summary = setup.summary()
        self.steps = 0
        self.flat: Any = None
        self.meta: list[tuple[str, list[int], int, int]] = []
        self.group: Any = None

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


# ---- command loop ---------------------------------------------------------------------------------


def _start(init: WorkerInit) -> tuple[RankPolicy | None, Relay | None, Reply]:
    """Join the process group and build this rank's policy; the start reply says how it went."""
    relay: Relay | None = None
    try:
        group = join_process_group(init)
        relay = None if group is None else Relay(group, init)
        policy = RankPolicy(init)
    except RunFailed as e:
        return None, relay, Reply(rank=init.rank, ok=False, error=str(e))
    except Exception:
        return None, relay, Reply(rank=init.rank, ok=False, error=traceback.format_exc())
    return policy, relay, Reply(rank=init.rank, ok=True, value=float(policy.n_params), summary=policy.summary)


def worker_main(init_blob: bytes, conn: Any | None) -> None:
    """Entry point of a spawned worker process: node 0's ranks read `conn`, other nodes' the relay."""
    from asyncpolicy.engines.child_procs import exit_with_parent, ignore_terminal_signals

    ignore_terminal_signals()  # the terminal's Ctrl-C is the supervisor's to handle: it stops us by command
    init = msgspec.msgpack.decode(init_blob, type=WorkerInit)
    exit_with_parent(f"fsdp worker rank {init.rank}")  # a kill -9'd supervisor (or trainer-node) takes its ranks along
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file bars would drown the run's own progress line
    if init.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(init.gpu)  # before CUDA is touched in this process
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    policy, relay, started = _start(init)
    if conn is None:
        sys.exit(_serve_relayed(init, policy, relay, started))
    _serve_pipe(init, policy, relay, started, conn)


def _next_command(conn: Any, relay: Relay | None, ping_s: float) -> tuple[bytes | None, RunFailed | None]:
    """The supervisor's next command (None once it is gone). Rank 0 pings the other nodes while it
    waits; a failed ping is kept, and the command is answered with it."""
    lost: RunFailed | None = None
    try:
        while relay is not None and lost is None and not conn.poll(ping_s):
            try:
                relay.send(encode(Ping()))
            except RunFailed as e:
                lost = e
        return conn.recv_bytes(), lost
    except EOFError:
        return None, lost


def _serve_pipe(init: WorkerInit, policy: RankPolicy | None, relay: Relay | None, started: Reply, conn: Any) -> None:
    """A rank of node 0: commands from the supervisor's pipe; rank 0 relays them to the other nodes."""
    if relay is not None and started.ok:
        started = _with_relayed(started, relay)
    conn.send_bytes(encode(started))
    if policy is None or not started.ok:
        return
    ping_s = init.config.trainer.worker_timeout_s / 4
    while True:
        blob, lost = _next_command(conn, relay, ping_s)
        if blob is None:  # the engine is gone: nothing left to do
            return
        cmd = _cmd_decoder.decode(blob)
        if init.rank == 0:
            _debug_hold(cmd)
        if lost is not None:
            reply = Reply(rank=init.rank, ok=False, error=f"while idle: {lost}")
        else:
            reply = _relayed_command(policy, relay, cmd, blob, init.rank)
        conn.send_bytes(encode(reply))
        if isinstance(cmd, Stop):
            policy.dist.destroy_process_group()
            return


def _relayed_command(policy: RankPolicy, relay: Relay | None, cmd: Any, blob: bytes, rank: int) -> Reply:
    """Run one command on this rank; rank 0 first hands it to the other nodes, then adds their replies
    (also after its own failure: they are in the pipe of the next command otherwise)."""
    if relay is not None:
        try:
            relay.send(blob)
        except RunFailed as e:  # not started anywhere: the others would wait in its collectives
            return Reply(rank=rank, ok=False, error=str(e))
    reply = _handle_safely(policy, cmd, rank)
    return reply if relay is None else _with_relayed(reply, relay)


def _handle_safely(policy: RankPolicy, cmd: Any, rank: int) -> Reply:
    """`_handle`'s reply, or the failure as a reply: our own errors as their message, others with their traceback."""
    try:
        return _handle(policy, cmd, rank)
    except RunFailed as e:
        return Reply(rank=rank, ok=False, error=str(e))
    except Exception:
        return Reply(rank=rank, ok=False, error=traceback.format_exc())


def _with_relayed(reply: Reply, relay: Relay) -> Reply:
    try:
        return msgspec.structs.replace(reply, relayed=[reply_decoder.decode(b) for b in relay.gather()])
    except RunFailed as e:
        return Reply(rank=reply.rank, ok=False, error=str(e))


def _serve_relayed(init: WorkerInit, policy: RankPolicy | None, relay: Relay | None, started: Reply) -> int:
    """A rank of node 1..: commands relayed by global rank 0; the exit code of this process."""
    where = f"fsdp worker rank {init.rank} (node {node_of(init, init.rank)})"
    if relay is None:  # it never joined: nobody to tell but the node's log
        print(f"{where}: {started.error}", file=sys.stderr, flush=True)
        return 1
    try:
        relay.answer(encode(started))
        if policy is None:
            return 1
        while True:
            cmd = _cmd_decoder.decode(relay.receive())
            if isinstance(cmd, Ping):
                continue
            relay.answer(encode(_handle_safely(policy, cmd, init.rank)))
            if isinstance(cmd, Stop):
                policy.dist.destroy_process_group()
                return 0
    except RunFailed as e:
        print(f"{where}: lost node 0: {e}", file=sys.stderr, flush=True)
        return 1


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


def _handle(policy: RankPolicy, cmd: Any, rank: int) -> Reply:
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
        _agree_directory_is_shared(policy.init, policy.dist, cmd.directory, cmd.shared_check)
        policy.save_state(cmd.directory)
        return Reply(rank=rank, ok=True)
    if isinstance(cmd, LoadState):
        _agree_directory_is_shared(policy.init, policy.dist, cmd.directory, cmd.shared_check)
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



def _agree_directory_is_shared(init: WorkerInit, dist: Any, directory: str, token: str) -> None:
    """Several nodes: every rank must read the token node 0 wrote into `directory`, or none writes.

    Each rank writes its own DCP shards; a node that writes them to a disk of its own leaves a
    checkpoint that looks complete on node 0 and cannot be loaded. Decided together (one
    all-gather), so every rank fails with the same message instead of some waiting in DCP.
    """
    if not token:
        return
    try:
        with open(os.path.join(directory, SHARED_CHECK_FILE)) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    seen_by: list[Any] = [None] * init.world_size
    dist.all_gather_object(seen_by, seen)
    blind = [r for r, ok in enumerate(seen_by) if not ok]
    if blind:
        nodes = sorted({node_of(init, r) for r in blind})
        raise RunFailed(
            f"checkpoint directory {directory} is not shared: node(s) {', '.join(map(str, nodes))} (rank(s) "
            f"{', '.join(map(str, blind))}) do not see what node 0 wrote there; with trainer.nnodes > 1, output_dir "
            "(and a resume path) must be on a filesystem every node mounts at the same path"
        )
