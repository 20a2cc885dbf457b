"""One FSDP2 training process (one GPU); `FSDPTrainEngine` starts `trainer.n_gpus_per_node` of them.

The process owns a shard of the policy (FSDP2 `fully_shard` per decoder layer, bf16 compute,
fp32 gradient reduction), its optimizer and LR schedule, and — on rank 0 — the flat bf16 buffer
that weight syncs send. It obeys typed msgspec commands from a pipe and answers each with one
`Reply`; every rank gets every command, so collectives (FSDP all-gathers, the optimizer step,
gathering full weights) line up. On CPU (tests) it runs the same code over gloo.

Loss: the same maths as the CPU trainer (`asyncpolicy.algorithms`): group advantages, PPO-clip
against the proximal (decoupled) or behaviour logprobs, truncated importance weights,
token-level aggregation by mini-batch totals so gradient accumulation is exact across
micro-batches AND ranks.
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

from asyncpolicy.samples import Sample

# ---- messages ---------------------------------------------------------------------------------


class WorkerInit(msgspec.Struct, kw_only=True):
    rank: int
    world_size: int
    gpu: int | None  # physical GPU index; None = CPU (gloo), for tests
    master_port: int
    model_path: str
    dtype: str = "float32"  # master parameter dtype; compute is bf16 on GPU
    gradient_checkpointing: bool = True
    lr: float = 1e-6
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    total_steps: int = 1000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    require_batches: int = 1
    adv_estimator: str = "grpo"
    norm_adv_by_std: bool = True
    clip_ratio: float = 0.2
    staleness_correction: str = "decoupled"
    tis_cap: float = 2.0
    loss_agg_mode: str = "token-mean"
    temperature: float = 1.0  # the sampler's: behaviour logprobs are of softmax(logits / T)
    seed: int = 0
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


# ---- batch building (pure, tested on CPU) ------------------------------------------------------


class Row(msgspec.Struct, kw_only=True):
    """One response as the loss sees it."""

    input_ids: list[int]  # prompt + response
    prompt_len: int
    advantage: float
    behaviour_logprobs: list[float]


def build_rows(samples: list[Sample], estimator: str, norm_by_std: bool) -> list[Row]:
    """Every non-empty response of the batch with its group advantage."""
    import torch

    from asyncpolicy.algorithms.advantages import compute_advantages

    rows: list[Row] = []
    for s in samples:
        rewards = torch.tensor([[t.reward for t in s.trajectories]], dtype=torch.float64)  # (1, n)
        adv = compute_advantages(rewards, estimator, norm_by_std)[0]
        for t, a in zip(s.trajectories, adv.tolist(), strict=True):
            if not t.response_tokens:
                continue
            rows.append(
                Row(
                    input_ids=list(s.prompt.tokens) + list(t.response_tokens),
                    prompt_len=len(s.prompt.tokens),
                    advantage=float(a),
                    behaviour_logprobs=list(t.behaviour_logprobs),
                )
            )
    return rows


def shard_rows(rows: list[Row], rank: int, world: int, micro: int) -> list[list[Row]]:
    """This rank's micro-batches; every rank gets the SAME number (FSDP collectives must line up).

    Rows are sorted by length and dealt round-robin, so ranks get similar token counts and each
    micro-batch holds similar lengths (little padding). Missing micro-batches are empty lists.
    """
    ordered = sorted(rows, key=lambda r: len(r.input_ids), reverse=True)
    mine = ordered[rank::world]
    per_rank = math.ceil(len(ordered) / world) if ordered else 0
    n_micro = max(1, math.ceil(per_rank / micro))
    out = [mine[i * micro : (i + 1) * micro] for i in range(n_micro)]
    return out


# ---- the process --------------------------------------------------------------------------------


class _Policy:
    """Model, optimizer, schedule and weight-sync buffers of one rank."""

    def __init__(self, init: WorkerInit) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from transformers import AutoConfig, AutoModelForCausalLM

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
        torch.manual_seed(init.seed)  # same random init on every rank when the dir has no weights
        dtype = getattr(torch, init.dtype)
        has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(init.model_path))
        if has_weights:
            model = AutoModelForCausalLM.from_pretrained(init.model_path, dtype=dtype, attn_implementation="sdpa")
        else:
            config = AutoConfig.from_pretrained(init.model_path)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        if init.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        # transformers declares `to` with @wraps(nn.Module.to), which types it as unbound (self first)
        model.to(self.device)  # type: ignore[arg-type]
        self.names = [n for n, _ in model.named_parameters()]  # HF names; tied weights appear once
        wrapper = _make_logprob_module()(model, init.temperature)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else None
        self.n_params = sum(p.numel() for p in model.parameters())
        # Small models: keep layers gathered from forward to backward (ZeRO-2-like): the memory
        # is small and it saves one all-gather per layer per micro-batch (two with recompute).
        kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.n_params > 2e9}
        if mp is not None:
            kw["mp_policy"] = mp
        for layer in model.model.layers:
            fully_shard(layer, **kw)
        fully_shard(wrapper, **kw)  # root: embeddings, final norm, lm_head
        self.module = wrapper
        self.cfg = model.config
        self.opt = torch.optim.AdamW(wrapper.parameters(), lr=init.lr, weight_decay=init.weight_decay, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.steps = 0
        self.flat: Any = None
        self.meta: list[tuple[str, list[int], int, int]] = []
        self.group: Any = None

    def _lr_factor(self, step: int) -> float:
        from asyncpolicy.algorithms.schedule import lr_lambda  # the CPU trainer's schedule, exactly

        return lr_lambda(step, self.init.warmup_steps, self.init.total_steps, self.init.lr_schedule)

    # -- training --

    def _tensors(self, rows: list[Row]) -> tuple[Any, Any, Any, Any, Any]:
        """Right-padded (B, T) ids and attention mask, and (B, T-1) response mask/advantage/behaviour."""
        torch = self.torch
        if not rows:  # an empty micro-batch keeps the collectives in step; it contributes 0
            rows = [Row(input_ids=[0, 0], prompt_len=1, advantage=0.0, behaviour_logprobs=[0.0])]
            empty = True
        else:
            empty = False
        T = max(len(r.input_ids) for r in rows)
        B = len(rows)
        ids = torch.zeros((B, T), dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        resp = torch.zeros((B, T - 1), dtype=torch.bool)
        adv = torch.zeros((B, T - 1), dtype=torch.float32)
        behav = torch.zeros((B, T - 1), dtype=torch.float32)
        for b, r in enumerate(rows):
            L, P = len(r.input_ids), r.prompt_len
            ids[b, :L] = torch.tensor(r.input_ids)
            attn[b, :L] = 1
            n = L - P  # response tokens, predicted at positions P-1 .. L-2
            if not empty:
                resp[b, P - 1 : L - 1] = True
            adv[b, P - 1 : L - 1] = r.advantage
            behav[b, P - 1 : L - 1] = torch.tensor(r.behaviour_logprobs[:n], dtype=torch.float32)
        d = self.device
        full = bool(attn.all())  # no padding: let SDPA take its fastest causal path
        return (
            ids.to(d, non_blocking=True),
            None if full else attn.to(d, non_blocking=True),
            resp.to(d, non_blocking=True),
            adv.to(d, non_blocking=True),
            behav.to(d, non_blocking=True),
        )

    def train(self, cmd: Train) -> dict[str, float]:
        torch = self.torch
        from asyncpolicy.algorithms.importance import anchor_and_weights
        from asyncpolicy.algorithms.kl import kl_k3
        from asyncpolicy.algorithms.ppo_loss import aggregate_loss, ppo_clip_token_loss

        i = self.init
        t0 = time.perf_counter()
        self.module.train()
        nb = i.require_batches
        minis = [cmd.batch[k::nb] for k in range(nb)] if len(cmd.batch) >= nb else [cmd.batch]
        prox_all: list[list[Any]] | None = None
        if i.staleness_correction == "decoupled" and len(minis) > 1:
            # proximal logprobs must come from the weights BEFORE the step's first update
            prox_all = []
            with torch.no_grad():
                for mini in minis:
                    rows = build_rows(mini, i.adv_estimator, i.norm_adv_by_std)
                    prox_all.append(
                        [self.module(*self._tensors(mb)[:3]).float() for mb in shard_rows(rows, i.rank, i.world_size, i.micro_batch_size)]
                    )
        sums = torch.zeros(8, dtype=torch.float64, device=self.device)
        # 0 loss, 1 clipped tokens, 2 k3(behaviour→current) sum, 3 response tokens, 4 all tokens, 5 grad_norm, 6 ratio sum, 7 seqs
        for k, mini in enumerate(minis):
            rows = build_rows(mini, i.adv_estimator, i.norm_adv_by_std)
            total_tokens = float(sum(len(r.input_ids) - r.prompt_len for r in rows))
            total_seqs = float(len(rows))
            for m, mb in enumerate(shard_rows(rows, i.rank, i.world_size, i.micro_batch_size)):
                ids, attn, resp, adv, behav = self._tensors(mb)
                logp_sel = self.module(ids, attn, resp).float()  # (N,) logprobs of response tokens
                logp = torch.zeros(resp.shape, dtype=torch.float32, device=self.device)
                logp = logp.masked_scatter(resp, logp_sel)  # (B, T-1)
                if prox_all is not None:
                    prox = torch.zeros_like(logp).masked_scatter(resp, prox_all[k][m])
                else:
                    prox = logp.detach()
                old, weight = anchor_and_weights(i.staleness_correction, behav, prox, i.tis_cap)
                pg_loss, ratio, clipped = ppo_clip_token_loss(logp, old, adv, i.clip_ratio)
                mask = resp.float()
                loss = aggregate_loss(pg_loss * weight, mask, i.loss_agg_mode, total_tokens, total_seqs)
                # FSDP averages gradients over ranks; each rank's loss is already its share of the
                # mini-batch total, so scale back up to get the sum.
                (loss * i.world_size).backward()
                with torch.no_grad():
                    sums[0] += loss.double()
                    sums[1] += (clipped * mask).sum().double()
                    # k3 estimate of KL(π_behav ‖ π_θ) on tokens sampled from π_behav
                    sums[2] += (kl_k3(behav, logp.detach()) * mask).sum().double()
                    sums[3] += mask.sum().double()
                    sums[4] += float(sum(len(r.input_ids) for r in mb))
                    sums[6] += (ratio.detach() * mask).sum().double()
                    sums[7] += float(len(mb))
            gn = torch.nn.utils.clip_grad_norm_(self.module.parameters(), i.grad_clip)
            if hasattr(gn, "full_tensor"):
                gn = gn.full_tensor()
            sums[5] += float(gn) / len(minis) / i.world_size  # summed over ranks below
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        self.steps += 1
        self.dist.all_reduce(sums)  # also a sync point: step time below is the slowest rank's
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        s = sums.tolist()
        tokens = s[4]
        # 6 N flops per trained token (forward 2N + backward 4N), recompute not counted: model FLOPs
        flops = 6.0 * self.n_params * tokens
        stats = {
            "losses/loss": s[0] / max(1, len(minis)),
            "losses/clipfrac": s[1] / max(1.0, s[3]),
            "is/approx_kl_behaviour_k3": s[2] / max(1.0, s[3]),  # KL(behaviour || current), k3 estimator
            "is/ratio_mean": s[6] / max(1.0, s[3]),
            "train/grad_norm": s[5],
            "train/lr": lr,
            "train/tokens": s[3],
            "train/seqs": s[7],
            "perf/train_step_s": dt,
            "perf/train_tokens_per_s": tokens / dt,  # prompt + response tokens through forward/backward
            "perf/mfu": flops / dt / (i.peak_flops * i.world_size) if self.device.type == "cuda" else 0.0,
        }
        if self.device.type == "cuda":
            stats["perf/gpu_mem_peak_GB"] = torch.cuda.max_memory_allocated() / 2**30
        return stats

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


def _logprob_forward(model: Any, ids: Any, attn: Any, resp: Any, temperature: float) -> Any:
    """Logprobs of the response tokens only: the LM head runs on response positions alone.

    Same quantity as `torch_policy.token_logprobs` (softmax of logits / sampling temperature),
    without materialising (B, T, V) logits for prompt positions.
    """
    import torch

    hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, T, H)
    h = hidden[:, :-1][resp]  # (N, H) positions that predict a response token
    targets = ids[:, 1:][resp]  # (N,)
    logits = model.lm_head(h).float() / temperature  # (N, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _make_logprob_module() -> type:
    import torch

    class LogprobModule(torch.nn.Module):
        """Root FSDP unit: its forward gathers embeddings/lm_head, then runs `_logprob_forward`."""

        def __init__(self, model: Any, temperature: float) -> None:
            super().__init__()
            self.model = model
            self.temperature = temperature

        def forward(self, ids: Any, attn: Any, resp: Any) -> Any:
            return _logprob_forward(self.model, ids, attn, resp, self.temperature)

    return LogprobModule


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

