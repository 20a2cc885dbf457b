"""`bench gpu` on the CPU: every section runs through the same code as on GPUs, with the simulated
generation engine (plus vLLM's transport-facing methods) and the FSDP2 trainer over gloo, so an
arity or name error anywhere in the GPU bench fails here. No timing is asserted: only that every
row exists with finite numbers and that the weights really moved."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from asyncpolicy.bench.gpu.fakes import CPUPlumbing
from asyncpolicy.bench.gpu.model_dir import TINY_QWEN, make_model_dir
from asyncpolicy.bench.gpu.sections import GPUBenchResult, run_sections
from asyncpolicy.bench.gpu.settings import SECTION_NAMES, LearnArmSpec, cpu_settings
from asyncpolicy.bench.gpu.table import format_table, table_rows
from asyncpolicy.bench.cli import bench_main
from asyncpolicy.bench.common import BenchContext, Machine

MACHINE = Machine(cores=2, cpu_model="Test CPU", gpu="none", python="3.11", torch="2.x", os="Linux")


MEASURED = [x for x in SECTION_NAMES if x != "learn"]  # learn, three supervised runs of its own: its own test


def _run_all(tmp_path: Path, sections: list[str] = MEASURED, learn_arms: list[LearnArmSpec] | None = None) -> GPUBenchResult:
    """`sections` on the CPU stand-ins at `cpu_settings`' sizes (the learn section with `learn_arms` when given)."""
    model = make_model_dir(str(tmp_path / "model"), TINY_QWEN, tokenizer=False)
    settings = cpu_settings(model, sections)
    if learn_arms is not None:
        settings.learn_arms = learn_arms
    ctx = BenchContext(tmp_path / "out", quick=True, overrides=[], machine=MACHINE, command="pytest")
    ctx.out_dir.mkdir()

    async def main() -> GPUBenchResult:
        with anyio.fail_after(300):
            async with CPUPlumbing(settings) as engines:
                return await run_sections(engines, settings, ctx)

    return anyio.run(main, backend="asyncio")


def test_every_section_runs_on_cpu_and_fills_its_rows(tmp_path: Path) -> None:
    res = _run_all(tmp_path)
    assert res.errors == {}, "\n".join(res.errors.values())
    assert list(res.sections) == MEASURED
    rows = table_rows(res)
    assert sorted({r.section for r in rows}) == sorted(MEASURED)
    assert [r.section for r in rows].count("nccl") == 2  # the link and the sync
    for row in rows:
        assert row.values and all(math.isfinite(v) for v in row.values.values()), row
    table = format_table(res)
    assert table.count("\n| ") == len(rows) + 1 and "FAILED" not in table

    s = res.sections
    assert s["gen"]["logprobs_ok"] and "abort" in s["gen"]["abort_reasons"]
    assert s["gen"]["continued_len"] > s["gen"]["continued_from"]  # a partial response was continued
    for k in ("ipc", "nccl"):  # the packed buffer, loaded by its meta, holds the trainer's weights
        assert s[k]["checksum_match"] and s[k]["bytes_GB"] > 0
        assert s[k]["post_sync_versions"] == [s[k]["engine_version"]]
    assert s["fsdp2"]["ranks"] == 2 and s["train"]["ranks"] == 1
    settings = cpu_settings("")
    for k in ("train", "fsdp2"):  # every batch size × packing on/off, with finite losses, two ranks ÷ one in the table
        got = [(x["sequences"], x["packing"], x["compile"]) for x in s[k]["rows"]]
        assert got == [(n, p, False) for p in (False, True) for n in settings.train_seqs]
        assert all(x["loss_finite"] and x["tokens_per_s"] > 0 and x["ranks"] == s[k]["ranks"] for x in s[k]["rows"])
    assert sum("vs_one_rank" in r.values for r in rows) == len(s["fsdp2"]["rows"])
    a = s["async"]
    assert a["gen_s"] > 0 and a["train_s"] > 0 and a["ideal_speedup"] >= 1
    assert a["async_age_max"] <= a["staleness"]
    for staleness in (0, a["staleness"]):  # both supervised runs went through the Supervisor and wrote their logs
        assert (tmp_path / "out" / f"gpu_async_staleness_{staleness}.log").exists()
    # the in-flight-updates run paused the engine in place: its syncs recorded pauses and what ran during them
    p = a["pauses"][f"in_flight_staleness_{a['staleness']}"]
    assert p["syncs"] > 0 and len(p["in_flight"]) == p["syncs"] and p["age_max"] <= a["staleness"]
    assert sum(r.figure.startswith("sync pause") for r in rows) == 3


def test_the_learn_section_runs_every_arm_to_its_budget_and_writes_its_table_plot_and_json(tmp_path: Path) -> None:
    """learn on the CPU stand-ins: three supervised arms (staleness 0, 1, 2) on a tiny budget, each stopped
    by it (not by its step count) and ended; validations at the start and every other step; a row per arm,
    learn.png and learn.json. No speed is asserted."""
    res = _run_all(tmp_path, ["learn"])
    assert res.errors == {}, "\n".join(res.errors.values())
    L, settings = res.sections["learn"], cpu_settings("")
    assert [a["staleness"] for a in L["arms"]] == [0, 1, 2] and L["budget_s"] == settings.learn_budget_s
    assert (L["model"], L["task"]) == (str(tmp_path / "model"), "arith")
    for a in L["arms"]:
        assert not a["finished"] and a["steps"] >= 1  # the budget ended the arm: trainer.total_training_steps is 10**6
        assert a["train_s"] >= L["budget_s"] and a["bound_s"] == settings.learn_budget_s + settings.learn_stop_s
        steps = [p["step"] for p in a["points"]]
        assert steps[0] == 0 and a["base_accuracy"] == a["points"][0]["accuracy"]  # the starting policy, validated
        assert steps == sorted(set(steps)) and all(k == 0 or k % 2 == 0 for k in steps)  # trainer.test_freq=2
        assert a["final_accuracy"] == a["points"][-1]["accuracy"] and a["best_accuracy"] == max(p["accuracy"] for p in a["points"])
        assert a["steps_per_s"] > 0 and a["gen_tokens_per_s"] > 0 and a["sync_pause_mean_s"] > 0 and a["sync_pause_p99_s"] > 0
        assert a["dropped_stale"] >= 0 and a["start_s"] > 0
        assert (tmp_path / "out" / f"gpu_learn_staleness_{a['staleness']}.log").exists()
    on_policy = L["arms"][0]
    assert L["target"] == on_policy["final_accuracy"] and on_policy["reached_s"] is not None  # on-policy reaches its own final
    assert on_policy["vs_first"] in (1.0, None)  # None only when the start already met the target (time 0)

    rows = table_rows(res)
    assert [r.section for r in rows] == ["learn"] * 3
    for row in rows:
        assert all(math.isfinite(v) for v in row.values.values()) and {"final_accuracy", "steps_per_s", "train_s"} <= set(row.values)
    assert "staleness 2" in rows[2].figure and "FAILED" not in format_table(res)
    out = tmp_path / "out"
    assert L["plot"] == "learn.png" and (out / "learn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "learn.json").read_text())
    assert [a["staleness"] for a in saved["arms"]] == [0, 1, 2] and saved["target"] == L["target"]
    assert "task.name=arith" in saved["settings"] and "trainer.test_freq=2" in saved["settings"]


def test_learn_arms_of_ones_own_run_tool_episodes_and_autotune(tmp_path: Path) -> None:
    """`--learn-arm`: agentic episodes (the simulated engines' stand-in for `task.name=calc`: an
    environment whose every episode calls tools, so both tool-call rates are 1) and an autotuned arm
    (its `autotune/*` end state) through the same section on the CPU stand-ins."""
    res = _run_all(tmp_path, ["learn"], [
        LearnArmSpec("tools", ["task.env=asyncpolicy.bench.tool_env:LognormalTools", "data.max_response_length=16", "task.max_turn_tokens=4"]),
        LearnArmSpec("autotune", ["async_training.autotune=true", "async_training.staleness_threshold=2", "async_training.autotune_every_steps=1"]),
    ])
    assert res.errors == {}, "\n".join(res.errors.values())
    tools, tuned = res.sections["learn"]["arms"]
    assert (tools["name"], tools["staleness"], tuned["name"], tuned["staleness"]) == ("tools", 1, "autotune", 2)
    assert list(tools["val_tool_call_rate"]) == [1.0, 1.0] and list(tools["train_tool_call_rate"]) == [1.0, 1.0]
    assert tuned["val_tool_call_rate"] is None and tools["autotune_end"] is None
    assert set(tuned["autotune_end"]) == {"autotune/window", "autotune/staleness", "autotune/moves"}
    assert 1 <= tuned["autotune_end"]["autotune/staleness"] <= 2
    rows = table_rows(res)
    assert "tools (staleness 1)" in rows[0].figure and "tool calls held-out 1.000 → 1.000" in rows[0].text
    assert "autotune at the end" in rows[1].text
    assert (tmp_path / "out" / "gpu_learn_tools.log").exists() and (tmp_path / "out" / "gpu_learn_autotune.log").exists()


@pytest.mark.slow
def test_the_train_section_runs_compiled_variants_on_cpu(tmp_path: Path) -> None:
    """trainer.compile=true through the FSDP worker (torch.compile on the CPU takes a minute or more)."""
    model = make_model_dir(str(tmp_path / "model"), TINY_QWEN, tokenizer=False)
    settings = cpu_settings(model, ["train"])
    settings.train_seqs, settings.train_packing, settings.train_compile = [4], [True], [False, True]
    ctx = BenchContext(tmp_path / "out", quick=True, overrides=[], machine=MACHINE, command="pytest")

    async def main() -> GPUBenchResult:
        async with CPUPlumbing(settings) as engines:
            return await run_sections(engines, settings, ctx)

    res = anyio.run(main, backend="asyncio")
    assert res.errors == {}, "\n".join(res.errors.values())
    rows = res.sections["train"]["rows"]
    assert [x["compile"] for x in rows] == [False, True] and all(x["loss_finite"] for x in rows)


@pytest.mark.parametrize("argv, message", [
    (["--train-seqs", "16,x"], "--train-seqs takes positive integers"),
    (["--learn-staleness", "1,2"], "--learn-staleness takes distinct thresholds"),
    (["--learn-staleness", "0,1,1"], "--learn-staleness takes distinct thresholds"),
    (["--learn-budget-s", "0"], "--learn-budget-s must be a positive number"),
    (["--learn-arm", "no words"], "--learn-arm takes NAME:WORDS"),
    (["--learn-arm", "a b:task.name=calc"], "--learn-arm takes NAME:WORDS"),
    (["--learn-arm", "x:task.name=calc", "--learn-arm", "x:seed=1"], "--learn-arm names must differ"),
    (["--learn-arm", "x:calc"], "--learn-arm x: 'calc' is not a key=value config word"),
    (["--learn-arm", "x:task.name=nope"], "learn arm 'x'"),
    (["trainer.lr=fast"], "trainer.lr"),
    (["trainer.nonsense=1"], "trainer.nonsense"),
    (["notakeyvalue"], "'notakeyvalue' is not a key=value config override"),
    (["--train-packing", "yes"], "--train-packing takes on, off or off,on"),
    (["--train-recompute", "on,off"], "--train-recompute takes on or off"),
])
def test_bench_gpu_bad_options_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["gpu", "--sections", "train", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_failing_section_is_recorded_not_raised(tmp_path: Path) -> None:
    model = make_model_dir(str(tmp_path / "model"), TINY_QWEN, tokenizer=False)
    settings = cpu_settings(model, ["gen"])
    settings.gen_prompts = 0  # nothing generated: the throughput ratio divides by zero inside the section
    ctx = BenchContext(tmp_path, quick=True, overrides=[], machine=MACHINE, command="pytest")

    async def main() -> GPUBenchResult:
        async with CPUPlumbing(settings) as engines:
            return await run_sections(engines, settings, ctx)

    res = anyio.run(main, backend="asyncio")
    assert list(res.errors) == ["gen"] and "ZeroDivisionError" in res.errors["gen"] and res.sections == {}
    assert table_rows(res) == [] and "FAILED sections: gen" in format_table(res)


def test_make_model_writes_a_loadable_directory(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert bench_main(["gpu", "--make-model", str(tmp_path)]) == 0
    cfg = AutoConfig.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert cfg.num_hidden_layers == 24 and cfg.eos_token_id == tok.eos_token_id
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_bench_gpu_without_cuda_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    assert bench_main(["gpu", "--sections", "gen"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bench_gpu_unknown_section_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["gpu", "--sections", "gen,warp"]) == 2
    assert "unknown section(s) warp" in capsys.readouterr().err


def test_the_trainer_variant_script_runs_its_variants_on_cpu() -> None:
    """benchmarks/trainer_gpu.py, the in-process GPU trainer sweep, on the tiny model over gloo: a row per
    variant and batch size, and packing (exact) gives the padded step's loss."""
    root = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "benchmarks/trainer_gpu.py", "--seqs", "4,8", "--steps", "2", "--resp-len", "6",
            "--prompt-len", "4", "--variant", "padded", "--variant", "packed trainer.packing=true"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")]))}
    r = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=300, env=env)  # this checkout's package
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["padded"], ["packed"])]
    assert [(x[0], x[1]) for x in rows] == [("padded", "4"), ("padded", "8"), ("packed", "4"), ("packed", "8")]
    loss = {(x[0], x[1]): float(x[-1]) for x in rows}
    assert loss["padded", "8"] == pytest.approx(loss["packed", "8"], abs=2e-4) and loss["padded", "8"] != 0
