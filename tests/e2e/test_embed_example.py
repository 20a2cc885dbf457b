"""examples/embed_supervisor.py, as a newcomer runs it: twice in a row, quiet, only its result."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpolicy

ROOT = Path(asyncpolicy.__file__).resolve().parents[1]  # the checkout under test, not an installed copy
RESULT_LINES = [
    re.compile(r"trained 40 steps; samples made (\d+) = trained 640 \+ dropped (\d+) \+ queued (\d+)"),
    re.compile(r"host heartbeat lag during start-up, (\d+ beats: p50 [\d.]+ ms, max [\d.]+ ms|0 beats: shorter than one beat \(10 ms\))"),
    re.compile(r"host heartbeat lag during training, \d+ beats: p50 [\d.]+ ms, max [\d.]+ ms"),
]


def run_example(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "embed_supervisor.py"), *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )


def test_the_embedding_example_runs_twice_and_prints_only_its_result() -> None:
    for _ in range(2):  # a second run must not trip over the first one's output directory
        done = run_example()
        assert done.returncode == 0, done.stderr[-3000:]
        lines = done.stdout.splitlines()
        assert len(lines) == len(RESULT_LINES), done.stdout
        for line, pattern in zip(lines, RESULT_LINES, strict=True):
            assert pattern.fullmatch(line), line
        made, dropped, queued = map(int, RESULT_LINES[0].fullmatch(lines[0]).groups())  # type: ignore[union-attr]
        assert made == 640 + dropped + queued
        assert done.stderr == ""  # no log lines: embedding is quiet unless the host configures logging


def test_bad_input_to_the_example_is_one_line_and_exit_code_2() -> None:
    done = run_example("data.train_batch_size=0")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == "embed_supervisor: config key 'data.train_batch_size': expected `int` >= 1\n"
