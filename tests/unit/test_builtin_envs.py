"""The built-in environments: `calc` (arith with a calculator tool) and `guess` (a game for the embedded model).

The calculator's parser meets adversarial strings; the guess game is played through the real
episode runtime and the embedded tokenizer by a bisecting player, and through `python -m
asyncpolicy run` for a few steps with its episode metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from asyncpolicy.config import load_config
from asyncpolicy.engines.protocols import GenerationRequest, GenerationResult
from asyncpolicy.envs import calc, guess
from asyncpolicy.envs.episode import run_episode
from asyncpolicy.models import tiny
from asyncpolicy.samples import Prompt
from asyncpolicy.tasks.countdown import InvalidExpression, evaluate
from asyncpolicy.tasks.registry import build_task

# -- calc ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "call"),
    [
        ("<calc>12*7</calc>", "12*7"),
        ("first <calc>1+1</calc> then <calc>2+2</calc>", "1+1"),  # the first complete call
        ("<calc></calc>", ""),
        ("<calc><calc>3</calc>", "<calc>3"),  # the parser refuses it, as an observation
        ("<calc>3+4", None),  # unclosed: a truncated turn is no call
        ("</calc>3<calc>", None),
        ("<CALC>3</CALC>", None),
        ("the answer is \\boxed{7}", None),
        ("<calc>" * 10_000, None),  # many opening tags and no close: one linear scan
    ],
)
def test_find_call(text: str, call: str | None) -> None:
    assert calc.find_call(text) == call


@pytest.mark.parametrize(
    ("expression", "answer"),
    [
        ("12*7", "12*7 = 84"),
        (" (3 + 4) * 5 ", "(3 + 4) * 5 = 35"),
        ("7/2", "7/2 = 7/2"),  # exact: a Fraction, not 3.5 or 3
        ("10 ÷ 4 × 2", "10 ÷ 4 × 2 = 5"),
        ("1/0", "error: division by zero"),
        ("5/(3-3)", "error: division by zero"),
        ("", "error: empty expression"),
        ("2**10", "error: expected a number, got '*'"),
        ("-3+1", "error: expected a number, got '-'"),
        ("__import__('os').system('true')", "error: unexpected '__import__'"),
        ("1.5+2", "error: unexpected '.5+2'"),
        ("(1+2", "error: the expression ends too early"),
        ("1+2)", "error: unexpected ')'"),
        ("9" * 31, "error: a number longer than 30 digits"),
    ],
)
def test_calculate_answers_or_says_what_is_wrong(expression: str, answer: str) -> None:
    assert calc.calculate(expression) == answer


def test_calculator_limits_bound_the_work() -> None:
    deep = "(" * 17 + "1" + ")" * 17
    assert calc.calculate(deep) == "error: parentheses nested deeper than 16"
    assert calc.calculate("1+" * 200 + "1").startswith("error: longer than 300 characters")
    big = "*".join(["9" * 30] * 9)  # the largest product the limits allow is exact, and cheap
    assert evaluate(big, None) == Fraction(int("9" * 30) ** 9)
    with pytest.raises(InvalidExpression):  # countdown's rule is unchanged: only the given numbers
        evaluate("3*4", [3])


def _prompt(ground_truth: str, text: str = "q") -> Prompt:
    return Prompt(index=0, epoch=0, text=text, tokens=[1], ground_truth=ground_truth)


def test_calculator_episode_steps() -> None:
    env = calc.Calculator()
    env.reset(_prompt("84"))
    step = env.step("Let me compute <calc>12 * 7</calc>")
    assert (step.observation, step.role, step.tool_call, step.done, step.reward) == ("12 * 7 = 84", "tool", True, False, 0.0)
    step = env.step("<calc>12/0</calc>")
    assert step.observation == "error: division by zero" and not step.done
    assert env.step("So the answer is \\boxed{84}.") == calc.Step(done=True, reward=1.0)
    assert env.step("\\boxed{83}") == calc.Step(done=True, reward=0.0)
    assert env.step("<calc>84").done  # unclosed: the final answer, and 84 is its last number
    assert env.step("<calc>84").reward == 1.0


def test_calc_prompts_are_arith_problems_offering_the_tool() -> None:
    cfg = load_config(overrides=["task.name=calc", "task.num_prompts=20", "task.num_val_prompts=4"])
    from asyncpolicy.tasks.catalog import TASKS

    train, val = TASKS["calc"].splits(20, 4, 0, 1)  # type: ignore[union-attr]
    arith_train, arith_val = TASKS["arith"].splits(20, 4, 0, 1)  # type: ignore[union-attr]
    assert [(e.prompt, e.answer, e.key) for e in train] == [(e.prompt, e.answer, e.key) for e in arith_train]
    assert [e.key for e in val] == [e.key for e in arith_val]  # arith's held-out problems
    for ex in train:
        assert ex.instruction.endswith(calc.INSTRUCTION) and "<calc>expression</calc>" in ex.instruction
        assert ex.instruction.count("\\boxed{}") == 1
    assert cfg.task.name == "calc"


# -- guess ---------------------------------------------------------------------------------------


def test_guess_steps_and_rewards() -> None:
    env = guess.GuessNumber()
    env.reset(_prompt("5"))
    assert [env.step(t).observation for t in ("3", "x", "²", "7", "")] == ["+", "?", "?", "?", "?"]
    assert env.step(" 6\n").observation == "-"
    won = env.step("5")
    assert won.done and won.reward == pytest.approx(1.0 - guess.TURN_COST * 6)


def test_guess_splits() -> None:
    train, val = guess.splits(200, 64, seed=3)
    assert train == guess.splits(200, 64, seed=3)[0] != guess.splits(200, 64, seed=4)[0]
    assert {e.answer for e in train} == {str(s) for s in range(guess.HIGHEST + 1)}
    assert [e.answer for e in val] == [str(s) for s in range(guess.HIGHEST + 1)]  # one game per secret
    assert {e.prompt for e in train + val} == {guess.PROMPT}  # the hints are the only information


class Bisector:
    """A player that bisects, reading only the hints in its context: what the game should teach."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        low, high = 0, guess.HIGHEST
        played = self.tokenizer.decode(request.prompt_tokens[self.prompt_length :])
        for g, hint in zip(played[::2], played[1::2], strict=True):
            low, high = (int(g) + 1, high) if hint == "+" else (low, int(g) - 1)
        token = self.tokenizer.convert_tokens_to_ids(str((low + high) // 2))
        assert request.max_tokens == 1
        return GenerationResult(request_id=request.request_id, response_tokens=[token], behaviour_logprobs=[-0.5], token_versions=[7], finish_reason="length")


@pytest.mark.anyio
async def test_the_guess_game_fits_the_defaults_and_bisection_wins_every_game(model_cache: Path) -> None:
    cfg = load_config(overrides=["task.name=guess", "task.num_prompts=10"])
    tokenizer = tiny.load_tokenizer(tiny.resolve_model_path(cfg))
    task = build_task(cfg, tokenizer)
    spec = task.episodes
    assert spec is not None and (spec.max_turns, spec.max_turn_tokens) == (guess.MAX_TURNS, 1)
    turns = []
    for prompt in task.val:
        request = GenerationRequest(request_id="v", prompt_tokens=prompt.tokens, max_tokens=1, seed=1)
        result = await run_episode(spec, prompt, request, Bisector(tokenizer, len(prompt.tokens)).generate)
        t = result.trajectory
        assert not result.error and t.reward == pytest.approx(1.0 - guess.TURN_COST * (t.turns - 1))
        assert len(t.response_tokens) == 2 * t.turns - 1 <= cfg.data.max_response_length
        assert t.loss_mask == [1, 0] * (t.turns - 1) + [1] and t.behaviour_logprobs[1::2] == [0.0] * (t.turns - 1)
        turns.append(t.turns)
    assert sorted(turns) == [1, 2, 2, 3, 3, 3, 3]  # bisection over 7 secrets


def test_guess_runs_end_to_end_with_episode_metrics(tmp_path: Path, model_cache: Path) -> None:
    """`python -m asyncpolicy run task.name=guess` with the default engines (hf + torch, CPU)."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "asyncpolicy", "run", "task.name=guess", "trainer.total_training_steps=3",
         "data.train_batch_size=4", "rollout.n=4", "trainer.test_freq=2", "progress=off", f"output_dir={out}"],
        capture_output=True, text=True, timeout=300,  # model_cache set ASYNCPOLICY_CACHE: inherited
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "step" in m][-1] == 3
    for m in metrics:
        assert 1.0 <= m["episode/turns_mean"] <= guess.MAX_TURNS
        assert m["episode/env_tokens_mean"] == pytest.approx(m["episode/turns_mean"] - 1)  # a one-character hint a turn
        assert m["episode/tool_errors"] == 0 and 0.0 <= m["reward_mean"] <= 1.0
        assert m["episode/tool_call_rate"] == 0.0 and m.get("val/tool_call_rate") in (None, 0.0)  # hints are no tool calls
    assert any(m.get("val/accuracy") is not None for m in metrics)
    assert any(m.get("val/tool_call_rate") == 0.0 for m in metrics)
