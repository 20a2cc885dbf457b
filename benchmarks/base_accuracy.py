"""Greedy held-out accuracy of the base model on a math task, per difficulty: is there room to learn?

    python benchmarks/base_accuracy.py --task arith --difficulty 1 2 3 --n 64
    python benchmarks/base_accuracy.py --task countdown --difficulty 1 --device cuda model.path=/models/Qwen2.5-0.5B-Instruct

A task level is useful for RL when the base model starts well above 0 (there is a reward signal)
and well below 1 (there is something to learn): `task.difficulty=1` aims at 10-50 % for
SmolLM2-135M-Instruct. The prompts are the run's own held-out prompts (`task.num_val_prompts=n`,
rendered by `loading.build_real_task`), scored by the task's reward; generation is greedy, float32,
stopping at the model's stop ids (`stop_ids.stop_token_ids`), as validation with
`rollout.val_temperature=0` does. Trailing `key=value` arguments are config overrides.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asyncpolicy.config import load_config
from asyncpolicy.models.stop_ids import stop_token_ids
from asyncpolicy.models.tiny import resolve_model_path
from asyncpolicy.samples import Prompt
from asyncpolicy.tasks.answers import last_boxed
from asyncpolicy.tasks.loading import build_real_task


def _left_padded(prompts: list[Prompt], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p.tokens) for p in prompts)
    ids = [[pad_id] * (width - len(p.tokens)) + p.tokens for p in prompts]
    mask = [[0] * (width - len(p.tokens)) + [1] * len(p.tokens) for p in prompts]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _until_stop(tokens: list[int], stop: set[int]) -> tuple[list[int], bool]:
    """The response up to its first stop id, and whether it stopped (False = cut at max_new_tokens)."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i], True
    return tokens, False


def measure(args: argparse.Namespace, difficulty: int, model: Any, tokenizer: Any, stop: list[int]) -> dict[str, Any]:
    cfg = load_config(
        overrides=[
            f"task.name={args.task}",
            f"task.difficulty={difficulty}",
            f"task.num_val_prompts={args.n}",
            "task.num_prompts=16",  # the held-out split does not depend on it; fewer prompts to tokenise
            "data.max_prompt_length=512",
            f"model.path={args.model}",
            *args.overrides,
        ]
    )
    task = build_real_task(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    correct, lengths, cut, boxed, shown = 0, [], 0, 0, 0
    start = time.perf_counter()
    for b in range(0, len(task.val), args.batch):
        batch = task.val[b : b + args.batch]
        ids, mask = _left_padded(batch, pad_id, args.device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=stop,
                pad_token_id=pad_id,
            )
        for prompt, row in zip(batch, out[:, ids.shape[1] :].tolist(), strict=True):
            response, stopped = _until_stop(row, set(stop))
            reward = task.scorer(prompt, response)
            correct += reward == 1.0
            lengths.append(len(response))
            cut += not stopped
            text = task.decode(response)
            boxed += last_boxed(text) is not None
            if shown < args.show:
                shown += 1
                print(f"--- d{difficulty} gold {prompt.ground_truth} reward {reward}: {prompt.text!r}\n{text!r}")
    n = len(task.val)
    return {
        "difficulty": difficulty,
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "mean_tokens": statistics.fmean(lengths),
        "cut": cut,
        "boxed": boxed,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arith", choices=["arith", "countdown"])
    ap.add_argument("--difficulty", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--n", type=int, default=64, help="held-out prompts per difficulty")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model.path")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--show", type=int, default=0, help="print this many responses per difficulty")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args()

    path = resolve_model_path(load_config(overrides=[f"model.path={args.model}"]))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    stop = stop_token_ids(path, tokenizer.eos_token_id)
    rows = [measure(args, d, model, tokenizer, stop) for d in args.difficulty]

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"\n{args.task}, model {args.model}, greedy, float32, max_new_tokens {args.max_new_tokens}, {device}")
    print("| difficulty | prompts | correct | accuracy | mean tokens | cut at max | with a box | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['difficulty']} | {r['n']} | {r['correct']} | {r['accuracy']:.0%} | {r['mean_tokens']:.0f} "
            f"| {r['cut']} | {r['boxed']} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
