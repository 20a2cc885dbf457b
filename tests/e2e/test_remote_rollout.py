"""A training job on two rollout servers: real `serve-rollout` processes (hf engine, embedded model)
on 127.0.0.1 and the CLI's torch trainer, talking HTTP. What must hold: the run finishes, every
sample is accounted for, both servers generated, both hold the trainer's final weights version; a
server killed mid-run is dropped and the run finishes on the other; an unreachable server stops
the run before it starts, naming the server.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec

from asyncpolicy.engines.generation.remote_client import ServerHealth

SMALL = ("data.train_batch_size=4", "rollout.n=2", "data.max_response_length=4", "rollout.max_concurrency=16")
RUN_TIMEOUT_S = 600  # a hang guard only


def run_cli(out: Path, servers: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncpolicy", "run", f"rollout.servers=[{','.join(servers)}]", "trainer.engine=torch",
         *SMALL, "progress=off", "log_level=warning", f"output_dir={out}", *extra],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )


def health(address: str) -> ServerHealth:
    return msgspec.json.decode(httpx.get(f"http://{address}/health", timeout=30).content, type=ServerHealth)


def accounting(stderr: str) -> tuple[int, int, int, int, int]:
    """(steps, made, trained, dropped, queued) from the CLI's last line."""
    m = re.search(r"finished (\d+) steps .*?made (\d+) samples = trained (\d+) \+ dropped stale (\d+) \+ queued (\d+)", stderr)
    assert m, stderr[-3000:]
    steps, made, trained, dropped, queued = (int(g) for g in m.groups())
    return steps, made, trained, dropped, queued


def last_param_version(out: Path) -> int:
    rows = [msgspec.json.decode(line) for line in (out / "metrics.jsonl").read_bytes().splitlines() if line.strip()]
    return int(rows[-1]["param_version"])


def test_training_on_two_rollout_servers(tmp_path: Path, rollout_servers) -> None:
    servers = [rollout_servers.start(*SMALL) for _ in range(2)]
    assert [health(s).version for s in servers] == [0, 0]
    done = run_cli(tmp_path / "run", servers, "trainer.total_training_steps=4")
    assert done.returncode == 0, done.stderr[-3000:]
    steps, made, trained, dropped, queued = accounting(done.stderr)
    assert steps == 4 and made == trained + dropped + queued and trained == 4 * 4
    after = [health(s) for s in servers]
    assert all(h.requests > 0 for h in after), after  # both servers generated
    assert [h.version for h in after] == [last_param_version(tmp_path / "run")] * 2 == [4, 4]  # the weights arrived


def test_a_server_killed_mid_run_is_dropped_and_the_run_finishes(tmp_path: Path, rollout_servers) -> None:
    first, second = (rollout_servers.start(*SMALL) for _ in range(2))
    out = tmp_path / "run"
    log = open(tmp_path / "console.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncpolicy", "run", f"rollout.servers=[{first},{second}]", "trainer.engine=torch", *SMALL,
         "trainer.total_training_steps=30", "progress=off", "log_level=warning", f"output_dir={out}"],
        stdout=log, stderr=log, text=True,
    )
    try:
        while health(second).requests == 0 and proc.poll() is None:  # it has served the run: kill it now
            time.sleep(0.02)
        rollout_servers.kill(second)
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path / "console.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    console = (tmp_path / "console.log").read_text()
    steps, made, trained, dropped, queued = accounting(console)
    assert steps == 30 and made == trained + dropped + queued
    lost = [msgspec.json.decode(line) for line in (out / "events.jsonl").read_bytes().splitlines() if b"rollout_server_lost" in line]
    assert [e["server"] for e in lost] == [second]
    assert health(first).version == last_param_version(out) == 30


def test_an_unreachable_server_stops_the_run_before_it_starts(tmp_path: Path) -> None:
    with socket.socket() as s:  # bound, not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        done = run_cli(tmp_path / "run", [address], "trainer.total_training_steps=2")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"asyncpolicy: error: config key 'rollout.servers': rollout server {address} does not answer")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "config.json").exists()
