"""Per-step metrics: one JSON line per training step, fanned out to live subscribers.

`metrics.jsonl` is the record of a run (it survives anything the event stream does); the stream
is for embedding applications and the progress bar. A subscriber that falls behind loses events
from its own stream only — counted and logged, never silently — and never slows training.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import msgspec
import psutil
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

if TYPE_CHECKING:
    from asyncpolicy.actors.rollouter import RolloutCounters
    from asyncpolicy.samples import Sample

log = structlog.get_logger("asyncpolicy.metrics")

_PROCESS = psutil.Process(os.getpid())


def rss_bytes() -> int:
    """Resident memory of this process."""
    return _PROCESS.memory_info().rss


class StepMetrics(msgspec.Struct, kw_only=True, omit_defaults=False):
    """The fixed part of a metrics line; engine metrics (losses/..., is/...) are appended to it."""

    step: int
    param_version: int  # trainer policy version after this step
    rollout_version: int  # version the generation engine serves
    elapsed_s: float
    reward_mean: float  # over every response in this step's batch
    reward_std: float
    samples_per_s: float  # samples (prompt groups) generated per second by this process (not counting a resumed past)
    trained_samples_per_s: float
    steps_per_s: float
    # the staleness family, all from the channel's statistics (the one place ages are computed)
    sample_age_mean: float  # this batch: trainer version - oldest version of each sample's tokens
    sample_age_max: float
    staleness_max: int  # the largest age trained on so far in the run; never above the threshold
    dropped_stale_total: int
    queue_size: int
    queue_utilization: float
    sync_latency_s: float | None  # this step's weight sync, staging to resume; None when none ran
    sync_pause_s: float | None  # of that sync, how long rollout was stopped (pause requested → resumed)
    sync_in_flight: int | None  # of that sync, the generations running when it began (aborted or, with in-flight updates, kept)
    trainer_idle_ratio: float  # share of this process's wall time the trainer waited for samples
    rollouter_idle_ratio: float  # share of this process's wall time no generation ran
    in_flight: int  # prompt groups being generated
    reward_errors_total: int
    response_length_mean: float
    rss_bytes: int
    val_reward_mean: float | None = None  # latest validation score, when validation has run
    val_accuracy: float | None = msgspec.field(default=None, name="val/accuracy")  # share of held-out prompts answered correctly (pass@1 when greedy)
    val_step: int | None = None
    val_failures_total: int = 0  # validations abandoned because their generations failed
    # generation replicas (rollout.replicas > 1): requests moved off a replica that died, replica restarts
    replica_failovers: int = msgspec.field(default=0, name="rollout/replica_failovers")
    replica_restarts: int = msgspec.field(default=0, name="rollout/replica_restarts")


def batch_reward_stats(rewards: list[float]) -> tuple[float, float]:
    if not rewards:
        return math.nan, math.nan
    mean = sum(rewards) / len(rewards)
    var = sum((r - mean) ** 2 for r in rewards) / len(rewards)
    return mean, math.sqrt(var)


class MetricsSink:
    """Writes metric lines to `metrics.jsonl` (and TensorBoard when installed) and to subscribers."""

    def __init__(self, output_dir: Path, *, tensorboard: bool = True, append: bool = False) -> None:
        self.path = output_dir / "metrics.jsonl"
        self._file: IO[bytes] = open(self.path, "ab" if append else "wb")
        self._subscribers: list[MemoryObjectSendStream[dict[str, Any]]] = []
        self.events_dropped = 0
        self._tb = _tensorboard_writer(output_dir / "tensorboard") if tensorboard else None

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(msgspec.json.encode(row) + b"\n")
        self._file.flush()
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None and math.isfinite(value):
                    self._tb.add_scalar(key if "/" in key else f"run/{key}", value, step)
        for stream in list(self._subscribers):
            try:
                stream.send_nowait(row)
            except anyio.WouldBlock:
                self.events_dropped += 1
                log.warning("metrics_subscriber_behind", events_dropped=self.events_dropped, step=row.get("step"))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(stream)

    def subscribe(self, buffer: int = 1024) -> MemoryObjectReceiveStream[dict[str, Any]]:
        """A stream of later lines; already ended when the run is over."""
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](buffer)
        if self._file.closed:
            send.close()
        else:
            self._subscribers.append(send)
        return receive

    def close(self) -> None:
        """End every subscriber's stream (their `async for` loops finish) and close the files. Idempotent."""
        for stream in self._subscribers:
            stream.close()
        self._subscribers.clear()
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard_writer(directory: Path) -> Any:
    """A SummaryWriter when tensorboard is installed (the optional extra), else None."""
    if importlib.util.find_spec("tensorboard") is None:
        return None  # without it, importing torch.utils.tensorboard would import torch (seconds) to fail
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))


def episode_metrics(batch: list[Sample], counters: RolloutCounters) -> dict[str, float]:
    """Agentic episodes' keys (docs/agents.md): this batch's turns and environment tokens per episode and
    share of episodes that called a tool, and the run's environment failures, tool calls and mean time
    per environment call so far."""
    episodes = [t for s in batch for t in s.trajectories]
    n = max(1, len(episodes))
    return {
        "episode/turns_mean": sum(t.turns for t in episodes) / n,
        "episode/env_tokens_mean": sum(t.env_tokens for t in episodes) / n,
        "episode/tool_errors": float(counters.env_errors),
        "episode/tool_calls": float(counters.tool_calls),
        "episode/tool_call_rate": sum(t.tool_calls > 0 for t in episodes) / n,  # of this batch's episodes
        "episode/tool_latency_s": counters.env_seconds / max(1, counters.env_calls),
    }
