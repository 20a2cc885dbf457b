"""The math tasks (arith, countdown, gsm8k): generation, splits, answer extraction and rewards."""

from __future__ import annotations

import copy
import json
import random
import re
import typing
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from asyncpolicy.config import TaskConfig, load_config
from asyncpolicy.errors import ConfigError
from asyncpolicy.models import tiny
from asyncpolicy.tasks import arith, countdown, gsm8k
from asyncpolicy.tasks.answers import canonical_number, extract_answer, gold_answer, last_boxed, number_reward
from asyncpolicy.tasks.base import ChatMessage, Example
from asyncpolicy.tasks.catalog import TASKS, GeneratedTask
from asyncpolicy.tasks.countdown import InvalidExpression, evaluate
from asyncpolicy.tasks.loading import build_real_task
from asyncpolicy.tasks.splits import HELD_OUT_BUCKETS, hashed_splits, is_held_out

# ------------------------------------------------------------------------------------------------
# answer extraction


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("The answer is \\boxed{42}.", "42"),
        ("\\boxed{17} no wait, \\boxed{18}", "18"),  # several boxes: the last wins
        ("first \\boxed{18}, then I doubt: 17", "18"),  # a box beats loose numbers after it
        ("17 ... no, actually 18", "18"),  # no box: the last number
        ("\\boxed{\\frac{1}{2}} or \\boxed{\\text{x} = {7}}", "7"),  # nested braces inside the last box
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed{5} and then \\boxed{6", "5"),  # an unclosed box is not a box
        ("so 6, \\boxed{6", "6"),  # only an unclosed box: the last number
        ("} } \\boxed{9} { {", "9"),  # stray braces either side
        ("\\boxed{} but 5", None),  # an empty box is a committed non-answer
        ("\\boxed{x} = 5", None),
        ("\\boxed{1,234,567}", "1234567"),
        ("\\boxed{$1,234.50}", "1234.5"),
        ("\\boxed{72.0}", "72"),
        ("\\boxed{-5}", "-5"),
        ("x = −5", "-5"),  # U+2212 minus
        ("12-5", "5"),  # a minus after a digit is subtraction, not a sign
        ("so 12 - 5 = 7", "7"),
        ("45%", "45"),
        ("\\boxed{+007}", "7"),
        ("\\boxed{-0}", "0"),
        ("3.14.15", "3.14"),
        ("1,2345", "2345"),  # not a thousands group
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(response: str, answer: str | None) -> None:
    assert extract_answer(response) == answer


@pytest.mark.parametrize(
    ("text", "canonical"),
    [("1,234", "1234"), ("-0.500", "-0.5"), ("+12", "12"), ("000", "0"), ("-0.0", "0"), (".5", "0.5"), ("−3", "-3")],
)
def test_canonical_number(text: str, canonical: str) -> None:
    assert canonical_number(text) == canonical


def test_huge_numbers_compare_exactly_without_conversion() -> None:
    """Beyond Python's 4300-digit int() limit: compared as text, never converted."""
    huge = "9" * 20_000
    assert extract_answer(f"\\boxed{{{huge}}}") == huge
    assert number_reward("", f"\\boxed{{{huge}}}", huge) == 1.0
    assert number_reward("", f"\\boxed{{{huge}8}}", huge) == 0.0
    assert number_reward("", f"\\boxed{{{huge}}}", "72") == 0.0


def test_very_long_and_deeply_nested_inputs_are_handled() -> None:
    """One linear pass, no recursion: a million characters of braces neither raises nor recurses."""
    depth = 100_000
    assert last_boxed("\\boxed{" * depth + "7" + "}" * depth) == "\\boxed{" * (depth - 1) + "7" + "}" * (depth - 1)
    assert extract_answer("\\boxed{" * depth + "7" + "}" * depth) == "7"
    assert extract_answer("\\boxed{" * depth + "7") == "7"  # none closes: the last number
    assert extract_answer("{" * depth + "\\boxed{3}" + "}" * 5) == "3"
    assert extract_answer("1-" * 300_000) == "1"


@pytest.mark.parametrize(
    ("ground_truth", "gold"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### -5", "-5"),
        ("a #### 3 then #### 4", "4"),  # the last ####
        ("72", "72"),
        ("#### none", None),
        ("", None),
    ],
)
def test_gold_answer(ground_truth: str, gold: str | None) -> None:
    assert gold_answer(ground_truth) == gold


def test_number_reward() -> None:
    gsm = "48/2 = 24\n#### 1,234"
    assert number_reward("q", "So the total is \\boxed{1,234}.", gsm) == 1.0
    assert number_reward("q", "1234.00", gsm) == 1.0
    assert number_reward("q", "\\boxed{1234} ... or 1235", gsm) == 1.0
    assert number_reward("q", "1234 ... or 1235", gsm) == 0.0
    assert number_reward("q", "\\boxed{1235}", gsm) == 0.0
    assert number_reward("q", "\\boxed{}", gsm) == 0.0
    assert number_reward("q", "\\boxed{1234}", "#### nothing") == 0.0  # no gold: never a reward


# ------------------------------------------------------------------------------------------------
# countdown: the parser


@pytest.mark.parametrize(
    ("expression", "numbers", "value"),
    [
        ("(3 + 7) * 2", [2, 3, 7], 20),
        ("3 + 7 * 2", [2, 3, 7], 17),  # precedence
        ("10 - 4 - 3", [3, 4, 10], 3),  # left associative
        ("24 / 4 / 2", [2, 4, 24], 3),
        ("(4 / 3) * 6", [3, 4, 6], 8),  # a non-integer intermediate is allowed: exact
        ("3 \\times 7 \\div 7", [3, 7, 7], 3),  # LaTeX operators; a number given twice may be used twice
        ("3 × (7 − 5) ÷ 2", [2, 3, 5, 7], 3),
        ("\\left(3 + 5\\right) \\cdot 2", [2, 3, 5], 16),
        ("5", [5, 6], 5),
        ("((((8))))", [8], 8),
    ],
)
def test_evaluate_valid(expression: str, numbers: list[int], value: int) -> None:
    assert evaluate(expression, numbers) == Fraction(value)


@pytest.mark.parametrize(
    ("expression", "numbers"),
    [
        ("3 + 3", [3, 4]),  # a number used twice
        ("3 + 5", [3, 4]),  # a number not given
        ("4 / (3 - 3)", [3, 3, 4]),  # division by zero
        ("-3 + 10", [3, 10]),  # unary minus
        ("+3", [3]),
        ("1.5 * 2", [1, 2, 5]),  # decimals
        ("3 ** 2", [2, 3]),
        ("__import__('os').system('true')", [1]),
        ("(3).real", [3]),
        ("abs(3)", [3]),
        ("x + 3", [3]),
        ("3 4", [3, 4]),
        ("3 +", [3]),
        ("(3 + 4", [3, 4]),
        ("3 + 4)", [3, 4]),
        ("()", [3]),
        ("", [3]),
        ("0x10", [0, 16]),
        ("3e2", [3, 2]),
        ("99999999999999999999999999999", [3]),
        ("(" * 17 + "3" + ")" * 17, [3]),  # nested deeper than MAX_DEPTH
        ("(" * 5000 + "3" + ")" * 5000, [3]),  # far too long: refused before parsing
        (" + ".join(["3"] * 200), [3] * 200),  # over MAX_EXPRESSION_CHARS
    ],
)
def test_evaluate_invalid(expression: str, numbers: list[int]) -> None:
    with pytest.raises(InvalidExpression):
        evaluate(expression, numbers)


def test_nesting_up_to_the_limit_is_fine() -> None:
    depth = countdown.MAX_DEPTH
    assert evaluate("(" * depth + "3" + ")" * depth, [3]) == 3


def _countdown_truth(numbers: list[int], target: int) -> str:
    return json.dumps({"numbers": numbers, "target": target, "solution": ""})


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("I get \\boxed{(3 + 7) * 2}", 1.0),
        ("\\boxed{(3 + 7) * 2 = 20}", 1.0),
        ("\\boxed{(3 + 7) * 2 = 20.0}", 1.0),
        ("\\boxed{(3 + 7) * 2 = 21}", 0.0),  # claims another result
        ("\\boxed{(3 + 7) * 2 = 1e100000000}", 0.0),  # not a plain number: never converted
        ("\\boxed{20}", 0.0),  # the target is not a given number
        ("\\boxed{(3 + 7) * 2} wait \\boxed{3 + 7}", 0.0),  # the last box wins
        ("\\boxed{3 + 7} wait \\boxed{(3 + 7) * 2}", 1.0),
        ("\\boxed{(3 + 3) * 2 + 8}", 0.0),  # 3 used twice
        ("\\boxed{}", 0.0),
        ("Let me think.\n(3 + 7) * 2\n", 1.0),  # no box: the last non-empty line
        ("(3 + 7) * 2 is my answer", 0.0),
        ("\\boxed{__import__('os')}", 0.0),
    ],
)
def test_countdown_reward(response: str, reward: float) -> None:
    assert countdown.reward("", response, _countdown_truth([2, 3, 7], 20)) == reward


def test_countdown_reward_on_very_long_responses() -> None:
    truth = _countdown_truth([2, 3, 7], 20)
    assert countdown.reward("", "\\boxed{" + "(" * 100_000 + "3" + ")" * 100_000 + "}", truth) == 0.0
    assert countdown.reward("", "7 " * 500_000 + "\n\\boxed{(3 + 7) * 2}", truth) == 1.0


# ------------------------------------------------------------------------------------------------
# generation and splits


@pytest.mark.parametrize("difficulty", sorted(countdown.LEVELS))
def test_every_countdown_problem_is_solvable(difficulty: int) -> None:
    level = countdown.LEVELS[difficulty]
    train, val = TASKS["countdown"].splits(300, 20, 5, difficulty)  # type: ignore[union-attr]
    for ex in train + val:
        problem = json.loads(ex.answer)
        numbers, target = problem["numbers"], problem["target"]
        assert len(numbers) == len(set(numbers)) == level.count
        assert all(1 <= n <= level.max_number for n in numbers)
        assert 1 <= target <= level.max_target and target not in numbers
        assert evaluate(problem["solution"], numbers) == target
        assert countdown.reward(ex.instruction, f"\\boxed{{{problem['solution']}}}", ex.answer) == 1.0
        assert f"equals {target}." in ex.instruction and "\\boxed{}" in ex.instruction


def _fold(key: str) -> tuple[int, list[str]]:
    """An arith problem's answer computed from its key ("12 +3*5 -7 /2"), independently of the generator."""
    start, *steps = key.split()
    count = int(start)
    for step in steps:
        op, operand = step[0], step[1:]
        amount = int(operand.split("*")[0]) * int(operand.split("*")[1]) if "*" in operand else int(operand)
        if op == "/":
            assert count % amount == 0
        count = {"+": count + amount, "-": count - amount, "*": count * amount, "/": count // amount}[op]
        assert count >= 0
    return count, steps


@pytest.mark.parametrize("difficulty", sorted(arith.LEVELS))
def test_arith_problems_are_right_and_follow_their_level(difficulty: int) -> None:
    level = arith.LEVELS[difficulty]
    train, val = TASKS["arith"].splits(300, 20, 5, difficulty)  # type: ignore[union-attr]
    for ex in train + val:
        answer, steps = _fold(ex.key)
        assert ex.answer == str(answer)
        assert level.min_steps <= len(steps) <= level.max_steps
        assert int(ex.key.split()[0]) <= level.max_number
        assert ex.instruction.endswith(arith.INSTRUCTION) and ex.instruction.count(".") == len(steps) + 2
        assert number_reward(ex.instruction, f"\\boxed{{{ex.answer}}}", ex.answer) == 1.0
    if level.ops == ("buy", "give"):
        assert all(step[0] in "+-" and "*" not in step for ex in train for step in ex.key.split()[1:])


def test_difficulty_changes_the_problems() -> None:
    def stats(task: str, difficulty: int) -> tuple[float, int]:
        train, _ = TASKS[task].splits(400, 1, 0, difficulty)  # type: ignore[union-attr]
        sizes = [len(ex.key.split()) for ex in train]
        return sum(sizes) / len(sizes), max(int(n) for ex in train for n in re.findall(r"\d+", ex.key))

    easy, hard = stats("arith", 1), stats("arith", 5)
    assert easy[0] < hard[0] and easy[1] <= 20 < hard[1]
    easy, hard = stats("countdown", 1), stats("countdown", 5)
    assert easy[0] < hard[0] and easy[1] <= 50 < hard[1]


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_splits_are_seeded_and_disjoint_across_seeds(name: str) -> None:
    task = TASKS[name]
    assert isinstance(task, GeneratedTask)
    train, val = task.splits(500, 40, 1, 2)
    assert (train, val) == task.splits(500, 40, 1, 2)
    other_train, other_val = task.splits(500, 40, 2, 2)
    assert other_train != train and other_val != val
    assert len(train) == 500 and len(val) == 40
    val_keys = {ex.key for ex in val} | {ex.key for ex in other_val}
    assert len({ex.key for ex in val}) == 40  # held-out problems are distinct
    assert not val_keys & ({ex.key for ex in train} | {ex.key for ex in other_train})
    assert all(is_held_out(name, k) for k in val_keys)


def test_held_out_share_of_the_problem_space() -> None:
    held = sum(is_held_out("arith", str(i)) for i in range(20_000))
    assert abs(held / 20_000 - 1 / HELD_OUT_BUCKETS) < 0.01  # sha256 is deterministic: same count on any machine


def test_a_tiny_problem_space_gives_fewer_held_out_problems_not_a_hang() -> None:
    def make(rng: random.Random) -> Example:
        return Example(prompt="p", instruction="i", answer="a", key=str(rng.randrange(30)))

    train, val = hashed_splits("t", make, 50, 20, seed=0)
    assert len(train) == 50 and 0 < len(val) < 20 and len({ex.key for ex in val}) == len(val)


# ------------------------------------------------------------------------------------------------
# config and loading


def test_config_task_names_are_the_catalog() -> None:
    hint = typing.get_type_hints(TaskConfig, include_extras=True)["name"]
    assert set(typing.get_args(typing.get_args(hint)[0])) == set(TASKS)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["task.difficulty=0"], "task.difficulty"),
        (["task.difficulty=6"], "task.difficulty"),
        (["task.difficulty=hard"], "task.difficulty"),
        (["task.name=gsm8k"], "task.name"),  # gsm8k needs data files
        (["task.num_val_prompts=0"], "task.num_val_prompts"),
    ],
)
def test_bad_task_values_name_their_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert info.value.key == key and key in str(info.value)


@pytest.fixture(scope="module")
def tokenizer(model_cache: Path) -> Any:
    return tiny.load_tokenizer(tiny.resolve_model_path(load_config()))


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer: Any) -> Any:
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    return chat


LONG = ["data.max_prompt_length=400", "task.num_prompts=30", "task.num_val_prompts=6"]


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


@pytest.mark.parametrize("name", ["arith", "countdown"])
def test_generated_math_task_end_to_end(tokenizer: Any, name: str) -> None:
    task = build_real_task(load_config(overrides=[f"task.name={name}", *LONG]), tokenizer)
    assert task.scorer.name == TASKS[name].reward_fn
    assert len(task.train.records) == 30 and len(task.val) == 6
    prompt = task.train.next()
    assert prompt.text.startswith("Question: ") and prompt.tokens == tokenizer(prompt.text)["input_ids"]
    record = task.train.records[prompt.index]
    assert record.messages[0].role == "user" and "\\boxed{}" in record.messages[0].content
    right = json.loads(prompt.ground_truth)["solution"] if name == "countdown" else prompt.ground_truth
    assert task.scorer(prompt, _tokens(tokenizer, f"So \\boxed{{{right}}}")) == 1.0
    assert task.scorer(prompt, _tokens(tokenizer, "So \\boxed{}")) == 0.0


def test_chat_models_get_the_messages_through_the_template(chat_tokenizer: Any) -> None:
    task = build_real_task(load_config(overrides=["task.name=arith", *LONG]), chat_tokenizer)
    record = task.train.records[0]
    assert record.messages == (ChatMessage("user", record.text),)
    assert record.text.endswith(arith.INSTRUCTION) and not record.text.startswith("Question:")
    assert chat_tokenizer.decode(record.tokens) == f"<user>{record.text}>"


def test_too_long_math_prompts_name_the_length_key(tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="every train prompt of task 'arith' is longer than 64 tokens") as info:
        build_real_task(load_config(overrides=["task.name=arith"]), tokenizer)
    assert info.value.key == "data.max_prompt_length"


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GSM_ROWS = [
    {"question": "Ann has 3 pens and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A shop sells 1,200 cups a day. How many in 2 days?", "answer": "1,200 * 2 = 2,400\n#### 2,400"},
]


def test_gsm8k_files_load_with_their_gold_number(tmp_path: Path, chat_tokenizer: Any) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", GSM_ROWS)
    val = _write_jsonl(tmp_path / "val.jsonl", GSM_ROWS[:1])
    cfg = load_config(
        overrides=["task.name=gsm8k", f"data.train_files=[{train}]", f"data.val_files=[{val}]", "data.shuffle=false",
                   "data.max_prompt_length=400"]
    )
    task = build_real_task(cfg, chat_tokenizer)
    assert task.scorer.name == "asyncpolicy.tasks.answers:number_reward"
    first, second = task.train.next(), task.train.next()
    assert (first.ground_truth, second.ground_truth) == ("7", "2400")
    assert second.text == f"{GSM_ROWS[1]['question']}\n{gsm8k.BOX_INSTRUCTION}"
    assert task.train.records[1].messages == (ChatMessage("user", second.text),)
    assert task.scorer(second, _tokens(chat_tokenizer, "2 * 1200 = \\boxed{2,400}")) == 1.0
    assert task.scorer(second, _tokens(chat_tokenizer, "\\boxed{2,400} hmm, or 1200")) == 1.0
    assert task.scorer(second, _tokens(chat_tokenizer, "\\boxed{2,401}")) == 0.0
    assert [p.ground_truth for p in task.val] == ["7"]


def test_gsm8k_columns_follow_changed_keys(tmp_path: Path, tokenizer: Any) -> None:
    train = _write_jsonl(tmp_path / "t.jsonl", [{"q": "What is 2 + 2?", "a": "#### 4"}])
    cfg = load_config(
        overrides=["task.name=gsm8k", f"data.train_files=[{train}]", "data.prompt_key=q", "data.answer_key=a",
                   "data.max_prompt_length=200"]
    )
    prompt = build_real_task(cfg, tokenizer).train.next()
    assert (prompt.text, prompt.ground_truth) == ("Question: What is 2 + 2?\nAnswer:", "4")


def test_gsm8k_row_without_a_gold_number_names_file_and_line(tmp_path: Path, tokenizer: Any) -> None:
    train = _write_jsonl(tmp_path / "t.jsonl", [GSM_ROWS[0], {"question": "Why?", "answer": "because #### unknown"}])
    cfg = load_config(overrides=["task.name=gsm8k", f"data.train_files=[{train}]", "data.max_prompt_length=200"])
    with pytest.raises(ConfigError, match=r"t\.jsonl:2: answer .* has no number") as info:
        build_real_task(cfg, tokenizer)
    assert info.value.key == "data.train_files"


def test_gsm8k_file_without_its_columns_names_the_key(tmp_path: Path, tokenizer: Any) -> None:
    train = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "x", "ground_truth": "1"}])
    cfg = load_config(overrides=["task.name=gsm8k", f"data.train_files=[{train}]"])
    with pytest.raises(ConfigError, match=r"t\.jsonl:1 has no column 'question'") as info:
        build_real_task(cfg, tokenizer)
    assert info.value.key == "data.prompt_key"


def test_data_files_under_a_generated_task_still_need_a_reward(tmp_path: Path, tokenizer: Any) -> None:
    train = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "1+1=", "ground_truth": "2"}])
    with pytest.raises(ConfigError, match="task.reward_fn' is required") as info:
        build_real_task(load_config(overrides=["task.name=arith", f"data.train_files=[{train}]"]), tokenizer)
    assert info.value.key == "task.reward_fn"
    reward = "task.reward_fn=asyncpolicy.tasks.answers:number_reward"  # a built-in reward for the user's data
    task = build_real_task(load_config(overrides=[f"data.train_files=[{train}]", reward]), tokenizer)
    prompt = task.train.next()
    assert task.scorer(prompt, _tokens(tokenizer, "\\boxed{2}")) == 1.0
