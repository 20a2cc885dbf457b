"""Lossless checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` holding `state.msgpack` (counters, the
data cursor, the channel's queued samples, the prompts of in-flight groups), `engine/` (what
the trainer engine needs to resume: weights, optimizer, LR schedule, RNG; FSDP writes sharded
DCP files there) and `model/` (the policy as a Hugging Face directory, safetensors + config +
tokenizer, that transformers and vLLM load as they are; `python -m asyncpolicy export` copies it
out). It is written into a temporary directory and renamed into place, so a half-written
checkpoint never looks complete; `latest_checkpoint` only sees complete ones.

What a resume preserves: step, policy version, LR position, optimizer, RNG, data cursor, every
queued sample (with its versions, so staleness stays exact) and every counter. In-flight
generations are generated again from their prompts (never trained twice, never lost).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgspec
import structlog

from asyncpolicy.actors.rollouter import InFlight, RolloutCounters, RolloutSnapshot
from asyncpolicy.actors.synchronizer import SyncCounters
from asyncpolicy.actors.trainer import TrainerSnapshot
from asyncpolicy.actors.validator import ValidatorSnapshot
from asyncpolicy.autotune.policy import AutotuneSnapshot
from asyncpolicy.channels import ChannelSnapshot
from asyncpolicy.engines.generation.replicas import ReplicaCounters
from asyncpolicy.errors import ConfigError
from asyncpolicy.samples import Sample
from asyncpolicy.tasks.base import CursorState

log = structlog.get_logger("asyncpolicy.checkpoint")

# 2: the staleness metrics are the channel's alone: trainer.staleness_max and the channel's
#    age_sum/age_min are gone, the channel's latest-batch ages added. Format 1 still loads (the
#    channel's age_max is the run's staleness_max; the fields gone are ignored).
FORMAT_VERSION = 2
STATE_FILE = "state.msgpack"
COMPLETE_MARKER = "COMPLETE"
ENGINE_DIR = "engine"
MODEL_DIR = "model"


class RunState(msgspec.Struct, frozen=True, kw_only=True):
    """The non-tensor part of a checkpoint: each actor's own snapshot, laid out as format 1 had it
    (the rollouter's counts and its in-flight groups in two fields: `of` and `rollouter` map them)."""

    format_version: int = FORMAT_VERSION
    trainer: TrainerSnapshot
    rollout: RolloutCounters
    sync: SyncCounters
    cursor: CursorState
    channel: ChannelSnapshot[Sample]
    in_flight: list[InFlight]
    rng_state: list[object]  # the supervisor's random.Random state
    reason: str  # "save_freq", "finished" or "stop"
    replicas: ReplicaCounters = msgspec.field(default_factory=ReplicaCounters)  # rollout.replicas > 1 (older: zeros)
    autotune: AutotuneSnapshot | None = None  # async_training.autotune's controller (None: off, or an older checkpoint)
    validator: ValidatorSnapshot | None = None  # every validation so far and the failures (None: an older checkpoint)

    @classmethod
    def of(
        cls,
        *,
        trainer: TrainerSnapshot,
        rollouter: RolloutSnapshot,
        sync: SyncCounters,
        cursor: CursorState,
        channel: ChannelSnapshot[Sample],
        rng_state: list[object],
        reason: str,
        replicas: ReplicaCounters,
        autotune: AutotuneSnapshot | None = None,
        validator: ValidatorSnapshot | None = None,
    ) -> RunState:
        """The state of a run from its actors' snapshots."""
        return cls(
            trainer=trainer,
            rollout=rollouter.counters,
            sync=sync,
            cursor=cursor,
            channel=channel,
            in_flight=list(rollouter.in_flight),
            rng_state=rng_state,
            reason=reason,
            replicas=replicas,
            autotune=autotune,
            validator=validator,
        )

    @property
    def rollouter(self) -> RolloutSnapshot:
        return RolloutSnapshot(counters=self.rollout, in_flight=tuple(self.in_flight))


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def _name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and half-written ones are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def begin(output_dir: Path, step: int) -> Path:
    """A fresh temporary directory to write step `step`'s checkpoint into."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(output_dir: Path, tmp: Path, state_bytes: bytes, step: int, keep: int) -> Path:
    """Write the state file, mark complete, rename into place atomically, prune old ones."""
    (tmp / STATE_FILE).write_bytes(state_bytes)
    (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
    _fsync_tree(tmp)
    final = checkpoint_root(output_dir) / _name(step)
    old = None
    if final.exists():  # the same step saved again (a stop right after a save_freq checkpoint):
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")  # set aside, never deleted first
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint_saved", path=str(final), step=step)
    return final


def remove_stale_temporaries(output_dir: Path) -> None:
    """Clean up after a run that died while writing a checkpoint.

    Half-written ones are never complete: deleted. A complete checkpoint set aside to be replaced
    (`.tmp-old-step-N-PID`) whose replacement never landed is put back first: it is the last good one.
    """
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".tmp-old-"):
            name = p.name.removeprefix(".tmp-old-").rsplit("-", 1)[0]  # step-NNNNNNNN
            if not (root / name).exists() and (p / COMPLETE_MARKER).exists():
                os.replace(p, root / name)
                log.warning("checkpoint_restored_after_interrupted_replace", path=str(root / name))
    for p in root.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)


def encode_state(state: RunState) -> bytes:
    return msgspec.msgpack.encode(state)


def load_state(path: Path) -> RunState:
    """Read a checkpoint's state; a missing or corrupt one is bad input naming the file."""
    file = path / STATE_FILE
    if not (path / COMPLETE_MARKER).exists():
        raise ConfigError(f"config key 'resume': {str(path)!r} is not a complete checkpoint", key="resume")
    try:
        state = msgspec.msgpack.decode(file.read_bytes(), type=RunState)
    except (OSError, msgspec.DecodeError) as e:
        raise ConfigError(f"config key 'resume': cannot read {str(file)!r}: {e}", key="resume") from None
    if state.format_version > FORMAT_VERSION:
        raise ConfigError(
            f"config key 'resume': {str(file)!r} has checkpoint format {state.format_version}; "
            f"this asyncpolicy reads formats 1 to {FORMAT_VERSION}",
            key="resume",
        )
    return state


class Resume(msgspec.Struct, frozen=True, kw_only=True):
    """A checkpoint to continue from: where it is and what it holds."""

    path: Path
    state: RunState


def find_resume(output_dir: Path, resume: str) -> Resume | None:
    """The checkpoint `resume` names (see `resolve_resume`), read; None when there is none to continue."""
    path = resolve_resume(output_dir, resume)
    return Resume(path=path, state=load_state(path)) if path is not None else None


def resolve_resume(output_dir: Path, resume: str) -> Path | None:
    """'' → None; 'auto' → the latest complete checkpoint (None if there is none); else that path."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"config key 'resume': no checkpoint directory at {resume!r}", key="resume")
    return path


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_source(source: Path) -> tuple[Path, Path]:
    """(checkpoint, its Hugging Face model directory) for a checkpoint or a run's output_dir (its
    latest checkpoint); a ConfigError naming the path when there is none."""
    if not source.is_dir():
        raise ConfigError(f"CHECKPOINT {str(source)!r} is not a directory")
    ckpt = source if (source / COMPLETE_MARKER).exists() else latest_checkpoint(source)
    if ckpt is None:
        raise ConfigError(f"CHECKPOINT {str(source)!r} is neither a complete checkpoint nor a run directory holding one")
    # checkpoints of the CPU trainer written before model/ existed hold the same directory in engine/
    for model in (ckpt / MODEL_DIR, ckpt / ENGINE_DIR / MODEL_DIR):
        if (model / "config.json").is_file() and any(model.glob("*.safetensors")):
            return ckpt, model
    raise ConfigError(
        f"CHECKPOINT {str(ckpt)!r} holds no Hugging Face model ({MODEL_DIR}/config.json + *.safetensors): "
        "a run of the simulated engines has none, and FSDP checkpoints of earlier versions only have sharded DCP files"
    )


def export_model(source: Path, out: Path) -> Path:
    """Copy a checkpoint's model directory to `out` (which must not hold anything yet); returns the checkpoint.

    Copied into a temporary sibling and renamed: `out` is complete or absent, never half-written.
    """
    ckpt, model = model_source(source)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"OUT_DIR {str(out)!r} already exists and is not empty; nothing is overwritten")
    tmp = out.with_name(f".tmp-export-{out.name}-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(model, tmp)
        _fsync_tree(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"OUT_DIR {str(out)!r} cannot be written ({e.strerror or e})") from None
    return ckpt
