"""`bench gpu`'s summary table: one row per figure, from whichever sections ran."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from asyncpolicy.bench.gpu.learn import learn_label
from asyncpolicy.bench.gpu.sections import GPUBenchResult


class TableRow(msgspec.Struct, kw_only=True):
    section: str
    figure: str
    values: dict[str, float]  # every number the row shows: finite on a good run
    text: str


def _mid(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _variant_key(x: dict[str, Any]) -> tuple[Any, ...]:
    """What a one-rank and a two-rank train figure must share to be compared."""
    return (x["sequences"], x["seq_len"], x["packing"], x["compile"], x["max_tokens"], x["recompute"], x["attn"])


def table_rows(res: GPUBenchResult) -> list[TableRow]:
    """The summary table, one row per figure, from the sections that ran."""
    s, rows = res.sections, []
    if "gen" in s:
        g = s["gen"]
        v = {"bare": max(g["bare_tok_s"]), "engine": max(g["engine_tok_s"]), "best_ratio": g["engine_over_bare"], "median_pair": g["engine_over_bare_median_pair"]}
        rows.append(TableRow(section="gen", figure="generation tok/s, bare vLLM / asyncpolicy, best; median pair ratio", values=v,
                             text=f"{v['bare']:.0f} / {v['engine']:.0f} ({v['best_ratio']:.1%}); median pair {v['median_pair']:.1%}"))
    if "nccl" in s:
        n = s["nccl"]
        v = {"broadcast_s": n["link_broadcast_s"], "GB_per_s": n["link_GB_per_s"], "init_s": n["link_init_s"]}
        rows.append(TableRow(section="nccl", figure="NCCL link: one broadcast of the flat buffer", values=v,
                             text=f"{v['broadcast_s']:.5f} s ({v['GB_per_s']:.1f} GB/s); group set-up {v['init_s']:.2f} s"))
    for k in ("ipc", "nccl"):
        if k in s:
            x = s[k]
            v = {"min_s": min(x["pause_to_resume_s"]), "median_s": _mid(x["pause_to_resume_s"]), "pack_s": min(x["pack_s"]), "checksum_match": float(x["checksum_match"])}
            rows.append(TableRow(section=k, figure=f"weight sync {k} ({x['transport']}), pause → resume s (min / median)", values=v,
                                 text=f"{v['min_s']:.4f} / {v['median_s']:.4f}; pack {v['pack_s']:.4f} s; checksums equal: {x['checksum_match']}"))
    one_rank = {_variant_key(x): x["tokens_per_s"] for x in s.get("train", {}).get("rows", [])}
    for k in ("train", "fsdp2"):
        for x in s.get(k, {}).get("rows", []):
            v = {"tokens_per_s": x["tokens_per_s"], "mfu": x["mfu"], "peak_mem_GiB": x["peak_mem_GiB"], "loss_finite": float(x["loss_finite"])}
            scaling = ""
            if k == "fsdp2" and _variant_key(x) in one_rank:
                v["vs_one_rank"] = x["tokens_per_s"] / one_rank[_variant_key(x)]
                scaling = f", {v['vs_one_rank']:.2f}× one rank"
            budget = f"≤ {x['max_tokens']} tok" if x["max_tokens"] else "fixed count"
            variant = (f"packing {'on' if x['packing'] else 'off'}, compile {'on' if x['compile'] else 'off'}, micro-batches {budget}, "
                       f"{x['attn']}, recompute {'on' if x['recompute'] else 'off'}")
            rows.append(TableRow(
                section=k, figure=f"FSDP2 trainer, {x['ranks']} rank(s), {x['sequences']} seqs ≤ {x['seq_len']} tokens, {variant}", values=v,
                text=f"{v['tokens_per_s']:.0f} tok/s, MFU {v['mfu']:.3f}, peak {v['peak_mem_GiB']:.1f} GiB{scaling}",
            ))
    if "async" in s:
        a = s["async"]
        keys = ("speedup", "ideal_speedup", "fraction_of_ideal", "gen_s", "train_s", "sync_s", "step_sync_s", "step_async_s", "wall_sync_s", "wall_async_s")
        v = {k: float(a[k]) for k in keys}
        rows.append(TableRow(
            section="async", figure=f"Supervisor: staleness {a['staleness']} ÷ staleness 0, {a['steps']} steps, same engines", values=v,
            text=f"{v['speedup']:.3f}× (ideal {v['ideal_speedup']:.3f}× = (g + t) / max(g, t); {v['fraction_of_ideal']:.1%} of ideal); "
            f"g {v['gen_s']:.3f} s, t {v['train_s']:.3f} s, sync {v['sync_s']:.4f} s; step {v['step_sync_s']:.3f} → {v['step_async_s']:.3f} s; "
            f"wall {v['wall_sync_s']:.1f} s / {v['wall_async_s']:.1f} s",
        ))
        for name, p in a.get("pauses", {}).items():
            in_flight = [n for n in p["in_flight"] if n is not None]
            pv = {"mean_s": float(p["mean_s"]), "p99_s": float(p["p99_s"]), "max_s": float(p["max_s"]), "step_s": float(p["step_s"])}
            rows.append(TableRow(
                section="async", figure=f"sync pause, {name.replace('_', ' ')}: {p['syncs']} syncs after warm-up", values=pv,
                text=f"pause {1e3 * pv['mean_s']:.1f} / {1e3 * pv['p99_s']:.1f} / {1e3 * pv['max_s']:.1f} ms (mean / p99 / max), "
                f"{p['over_50ms']} over 50 ms; in flight at the sync {min(in_flight, default=0)}–{max(in_flight, default=0)}; "
                f"step {pv['step_s']:.3f} s; age max {p['age_max']}, {p['dropped_stale']} stale drops",
            ))
    if "learn" in s:
        rows += _learn_rows(s["learn"])
    return rows


def _acc(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _learn_rows(L: dict[str, Any]) -> list[TableRow]:
    """One row per arm: accuracy (start → final, best), time to the first arm's final, throughput, syncs,
    drops, and tool calls / autotune's end state where the arm has them."""
    rows, target = [], L["target"]
    for a in L["arms"]:
        numbers = {
            "base_accuracy": a["base_accuracy"], "final_accuracy": a["final_accuracy"], "best_accuracy": a["best_accuracy"],
            "reached_s": a["reached_s"], "vs_first": a["vs_first"], "steps_per_s": a["steps_per_s"],
            "gen_tokens_per_s": a["gen_tokens_per_s"], "sync_pause_mean_s": a["sync_pause_mean_s"],
            "sync_pause_p99_s": a["sync_pause_p99_s"], "dropped_stale": float(a["dropped_stale"]), "train_s": a["train_s"],
        }
        v = {k: float(x) for k, x in numbers.items() if x is not None and math.isfinite(x)}  # what was not measured is not shown as a number
        first = L["arms"][0]["name"]
        if target is None:
            reach = f"no target (the first arm, {first}, has no validation)"
        elif a["reached_s"] is None:
            reach = f"to {target:.3f}: not reached"
        else:
            ratio = f"{a['vs_first']:.2f}× {first}'s" if a["vs_first"] is not None else f"{first}'s is 0"
            reach = f"to {target:.3f}: {a['reached_s']:.0f} s, step {a['reached_step']} ({ratio})"
        extra = ""
        if a.get("val_tool_call_rate"):
            (v0, v1), (t0, t1) = a["val_tool_call_rate"], a["train_tool_call_rate"]
            extra += f"; tool calls held-out {v0:.3f} → {v1:.3f}, training {t0:.3f} → {t1:.3f}"
        if a.get("autotune_end"):
            extra += "; autotune at the end: " + ", ".join(f"{k.removeprefix('autotune/')} {x:g}" for k, x in a["autotune_end"].items())
        schedule = learn_label(a)
        rows.append(TableRow(
            section="learn", figure=f"learn {a['task']}, {schedule}: {a['steps']} steps in {a['train_s']:.0f} s", values=v,
            text=f"accuracy {_acc(a['base_accuracy'])} → {_acc(a['final_accuracy'])} (best {_acc(a['best_accuracy'])}); {reach}; "
            f"{a['steps_per_s']:.3f} steps/s, {a['gen_tokens_per_s']:.0f} gen tok/s; sync pause {a['sync_pause_mean_s']:.3f} / "
            f"{a['sync_pause_p99_s']:.3f} s (mean / p99); {a['dropped_stale']} stale drops{extra}",
        ))
    return rows


def format_table(res: GPUBenchResult) -> str:
    card = (res.gpu or [{}])[0].get("name", "no GPU")
    out = [f"card: {card}", "| figure | measured |", "|---|---|"]
    out += [f"| {r.figure} | {r.text} |" for r in table_rows(res)]
    if res.errors:
        out.append("FAILED sections: " + ", ".join(res.errors))
    return "\n".join(out)

