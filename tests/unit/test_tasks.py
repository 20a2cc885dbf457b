"""Built-in tasks, their reward, and loading user data files and reward functions."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from asyncpolicy.config import load_config
from asyncpolicy.errors import ConfigError
from asyncpolicy.models import tiny
from asyncpolicy.tasks import builtin
from asyncpolicy.tasks.loading import build_real_task, encode_prompt


@pytest.fixture(scope="module")
def tokenizer(model_cache: Path) -> Any:
    return tiny.load_tokenizer(tiny.resolve_model_path(load_config()))


@pytest.mark.parametrize(
    ("response", "answer", "credit"),
    [
        ("cba", "cba", 1.0),
        ("cb", "cba", 2 / 3),
        ("cbax", "cba", 3 / 4),
        ("xba", "cba", 2 / 3),
        ("", "", 1.0),
        ("a", "", 0.0),
    ],
)
def test_position_credit(response: str, answer: str, credit: float) -> None:
    assert builtin.position_credit(response, answer) == pytest.approx(credit)


@pytest.mark.parametrize("name", sorted(builtin.TASKS))
def test_splits_are_seeded_disjoint_and_correct(name: str) -> None:
    train, val = builtin.make_splits(name, 300, 40, seed=3)
    assert (train, val) == builtin.make_splits(name, 300, 40, seed=3)
    assert train != builtin.make_splits(name, 300, 40, seed=4)[0]
    assert len(train) == 300 and len(val) == 40
    assert not {e.prompt for e in val} & {e.prompt for e in train}
    for ex in train[:50]:
        body = ex.prompt[:-1]
        if name == "add":
            assert ex.answer == str(sum(map(int, body.split("+"))))
        else:
            assert ex.answer == (body[::-1] if name == "reverse" else body)


def test_builtin_task_tokenises_prompts_and_scores_a_perfect_response(tokenizer: Any) -> None:
    cfg = load_config(overrides=["task.name=reverse", "task.num_prompts=20", "task.num_val_prompts=5"])
    task = build_real_task(cfg, tokenizer)
    prompt = task.train.next()
    assert prompt.tokens == tokenizer(prompt.text)["input_ids"]
    perfect = tokenizer(prompt.ground_truth, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert task.scorer(prompt, perfect) == 1.0
    assert task.scorer(prompt, perfect[:1]) < 1.0
    assert len(task.val) == 5
    assert task.scorer.name == "asyncpolicy.tasks.builtin:position_reward"


def test_unknown_builtin_task_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid enum value 'sort'; one of: reverse, copy, add, arith") as info:
        load_config(overrides=["task.name=sort"])
    assert info.value.key == "task.name"


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_rewards.py").write_text(
        "def score(prompt, response, ground_truth):\n    return float(response == ground_truth) + len(prompt) / 100\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    return "my_rewards:score"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_data_with_user_reward(tmp_path: Path, tokenizer: Any, reward_module: str) -> None:
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": "ab>", "ground_truth": "ba"}, {"prompt": "abc>", "ground_truth": "cba"}]
    )
    cfg = load_config(
        overrides=[f"data.train_files=[{train}]", f"task.reward_fn={reward_module}", "data.shuffle=false"]
    )
    task = build_real_task(cfg, tokenizer)
    prompt = task.train.next()
    assert (prompt.text, prompt.ground_truth) == ("ab>", "ba")
    response = tokenizer("ba", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert task.scorer(prompt, response) == pytest.approx(1.03)
    assert task.scorer.name == reward_module
    assert task.val == []


def test_missing_data_file_names_key_and_file(tmp_path: Path, tokenizer: Any, reward_module: str) -> None:
    missing = tmp_path / "missing.jsonl"
    cfg = load_config(overrides=[f"data.train_files=[{missing}]", f"task.reward_fn={reward_module}"])
    with pytest.raises(ConfigError, match=f"data.train_files.*{missing.name}.*does not exist") as info:
        build_real_task(cfg, tokenizer)
    assert info.value.key == "data.train_files"


def test_empty_data_file_is_an_error(tmp_path: Path, tokenizer: Any, reward_module: str) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = load_config(overrides=[f"data.train_files=[{empty}]", f"task.reward_fn={reward_module}"])
    with pytest.raises(ConfigError, match="holds no prompts"):
        build_real_task(cfg, tokenizer)


def test_missing_column_names_key_file_and_line(tmp_path: Path, tokenizer: Any, reward_module: str) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "ab>", "ground_truth": "ba"}, {"question": "x"}])
    cfg = load_config(overrides=[f"data.train_files=[{train}]", f"task.reward_fn={reward_module}"])
    with pytest.raises(ConfigError, match=r"data.prompt_key.*t\.jsonl:2 has no column 'prompt'") as info:
        build_real_task(cfg, tokenizer)
    assert info.value.key == "data.prompt_key"


@pytest.mark.parametrize(("mode", "kept"), [("skip", 1), ("truncate", 2)])
def test_long_prompts_follow_truncation(
    tmp_path: Path, tokenizer: Any, reward_module: str, mode: str, kept: int
) -> None:
    train = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": "ab>", "ground_truth": "ba"}, {"prompt": "abcdefgh>", "ground_truth": "x"}]
    )
    cfg = load_config(
        overrides=[
            f"data.train_files=[{train}]",
            f"task.reward_fn={reward_module}",
            "data.max_prompt_length=5",
            f"data.truncation={mode}",
        ]
    )
    task = build_real_task(cfg, tokenizer)
    assert len(task.train.records) == kept
    assert all(len(r.tokens) <= 5 for r in task.train.records)
    if mode == "truncate":
        assert task.train.records[1].tokens == tokenizer("abcdefgh>")["input_ids"][-5:]


def test_long_prompt_with_truncation_error_names_file_and_line(
    tmp_path: Path, tokenizer: Any, reward_module: str
) -> None:
    train = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": "ab>", "ground_truth": "ba"}, {"prompt": "abcdefgh>", "ground_truth": "x"}]
    )
    cfg = load_config(
        overrides=[
            f"data.train_files=[{train}]",
            f"task.reward_fn={reward_module}",
            "data.max_prompt_length=5",
            "data.truncation=error",
        ]
    )
    with pytest.raises(ConfigError, match=r"t\.jsonl:2: prompt has 10 tokens, more than 5"):
        build_real_task(cfg, tokenizer)


@pytest.mark.parametrize(
    ("reward_fn", "message"),
    [
        ("no_colon", "not of the form"),
        ("no_such_module_xyz:score", "cannot import"),
        ("json:no_such_fn", "has no function"),
    ],
)
def test_bad_reward_fn_names_task_reward_fn(tmp_path: Path, tokenizer: Any, reward_fn: str, message: str) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "ab>", "ground_truth": "ba"}])
    cfg = load_config(overrides=[f"data.train_files=[{train}]", f"task.reward_fn={reward_fn}"])
    with pytest.raises(ConfigError, match=message) as info:
        build_real_task(cfg, tokenizer)
    assert info.value.key == "task.reward_fn"


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, tokenizer: Any, reward_module: str) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyarrow is installed")
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1")
    cfg = load_config(overrides=[f"data.train_files=[{path}]", f"task.reward_fn={reward_module}"])
    with pytest.raises(ConfigError, match=r"pip install asyncpolicy\[parquet\]"):
        build_real_task(cfg, tokenizer)


def test_prompts_go_through_the_chat_template_when_there_is_one(tokenizer: Any) -> None:
    assert encode_prompt(tokenizer, "abc") == tokenizer("abc")["input_ids"]  # no template: plain, with <bos>
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{{ bos_token }}{{ messages[0]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    assert chat.decode(encode_prompt(chat, "abc")) == "<bos>abc>"


def test_builtin_prompts_follow_truncation_too(tokenizer: Any) -> None:
    base = ["task.name=add", "task.num_prompts=50", "task.num_val_prompts=5", "data.max_prompt_length=5"]
    truncated = build_real_task(load_config(overrides=[*base, "data.truncation=truncate"]), tokenizer)
    assert max(len(r.tokens) for r in truncated.train.records) == 5
    kept = build_real_task(load_config(overrides=[*base, "data.truncation=skip"]), tokenizer)
    assert 0 < len(kept.train.records) < 50  # "1+2=" fits in 5 tokens with <bos>; "12+34=" does not
    with pytest.raises(ConfigError, match="task 'add' train prompt 0: prompt has"):
        build_real_task(
            load_config(overrides=["task.name=add", "data.max_prompt_length=3", "data.truncation=error"]), tokenizer
        )


@pytest.mark.parametrize(
    "row, where",
    [
        ({"prompt": "na\u00efve>", "ground_truth": "x"}, "character 'ï' (U+00EF) at position 3 of the prompt"),
        ({"prompt": "ab>", "ground_truth": "b\u2192a"}, "character '→' (U+2192) at position 2 of the ground truth"),
    ],
)
def test_characters_the_embedded_model_lacks_are_refused(
    tmp_path: Path, tokenizer: Any, reward_module: str, row: dict[str, str], where: str
) -> None:
    """The embedded tokenizer would drop them without a word; the error names file, line and character."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Sort: ab", "ground_truth": "ab"}, row])
    cfg = load_config(overrides=[f"data.train_files=[{train}]", f"task.reward_fn={reward_module}"])
    with pytest.raises(ConfigError) as info:
        build_real_task(cfg, tokenizer)
    assert info.value.key == "data.train_files"
    assert str(info.value).startswith(f"config key 'data.train_files': {train}:2: {where}")


def test_prompts_with_spaces_and_capitals_keep_them(tmp_path: Path, tokenizer: Any, reward_module: str) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Sort these letters: eszy", "ground_truth": "esyz"}])
    task = build_real_task(load_config(overrides=[f"data.train_files=[{train}]", f"task.reward_fn={reward_module}"]), tokenizer)
    prompt = task.train.next()
    assert tokenizer.decode(prompt.tokens, skip_special_tokens=True) == "Sort these letters: eszy"
