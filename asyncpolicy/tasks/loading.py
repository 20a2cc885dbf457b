"""Prompts and rewards for real models: a built-in task, or the user's JSONL/Parquet files and reward.

A user reward is a dotted path `pkg.module:function` with signature
`score(prompt: str, response: str, ground_truth: str) -> float`. Scorers only compute; the
rollouter guards every call (errors and non-finite values are logged, counted and scored 0).
Every problem with the inputs is a `ConfigError` naming the config key and the file (and line).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from asyncpolicy.config import Config
from asyncpolicy.errors import ConfigError, first_line
from asyncpolicy.models.tiny import ALPHABET_TEXT, character_vocabulary
from asyncpolicy.samples import Prompt
from asyncpolicy.tasks import builtin
from asyncpolicy.tasks.base import Message, PromptRecord, PromptSource, TaskData

log = structlog.get_logger(__name__)


def encode_prompt(tokenizer: Any, prompt: str | list[Message]) -> list[int]:
    """Token ids of a prompt (a text is one user message): with a chat template, rendered once with the
    assistant's header (`add_generation_prompt`) and tokenised once, its special tokens as they are;
    these ids are what every engine receives. Without a template: the text (a chat's contents joined
    by newlines) tokenised plain."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return [int(i) for i in ids]
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in messages)
    return list(tokenizer(text)["input_ids"])


def prompt_text(messages: list[Message]) -> str:
    """What a chat prompt reads as in rewards and logs: its last user message."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else messages[-1]["content"]


class BuiltinScorer:
    """Per-position credit of the decoded response against the ground truth."""

    name = "asyncpolicy.tasks.builtin:position_credit"

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode

    def __call__(self, prompt: Prompt, response_tokens: list[int]) -> float:
        return builtin.position_credit(self.decode(response_tokens), prompt.ground_truth)


class UserScorer:
    """A user's `score(prompt, response, ground_truth)`, named by its dotted path."""

    def __init__(self, name: str, fn: Callable[[str, str, str], float], decode: Callable[[list[int]], str]) -> None:
        self.name = name
        self.fn = fn
        self.decode = decode

    def __call__(self, prompt: Prompt, response_tokens: list[int]) -> float:
        return self.fn(prompt.text, self.decode(response_tokens), prompt.ground_truth)


def import_reward_fn(path: str) -> Callable[[str, str, str], float]:
    """`pkg.module:function` → the function; a ConfigError naming task.reward_fn otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"config key 'task.reward_fn': {path!r} is not of the form 'pkg.module:function'", key="task.reward_fn"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module may fail any way on import (SyntaxError, its own raise)
        raise ConfigError(
            f"config key 'task.reward_fn': cannot import module {module_name!r}: {type(e).__name__}: {first_line(e)}",
            key="task.reward_fn",
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(
            f"config key 'task.reward_fn': {module_name!r} has no function {attr!r}", key="task.reward_fn"
        )
    return fn


def _read_rows(path: str, key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number from 1, row) of a JSONL or Parquet file; `key` names the config key for errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key {key!r}: file {path!r} does not exist", key=key)
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(
                f"config key {key!r}: {path!r} is Parquet, which needs pyarrow: pip install asyncpolicy[parquet]",
                key=key,
            ) from None
        try:
            rows = pq.read_table(p).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(f"config key {key!r}: {path!r} is not a readable Parquet file: {first_line(e)}", key=key) from None
        yield from enumerate(rows, start=1)
        return
    try:
        f = p.open("rb")
    except OSError as e:
        raise ConfigError(f"config key {key!r}: file {path!r} cannot be read: {e.strerror or e}", key=key) from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"config key {key!r}: {path}:{number} is not UTF-8 text ({e.reason} at byte {e.start} of the line)",
                    key=key,
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"config key {key!r}: {path}:{number} is not valid JSON: {e.msg}", key=key) from None
            if not isinstance(row, dict):
                raise ConfigError(f"config key {key!r}: {path}:{number} is not a JSON object", key=key)
            yield number, row


def _refuse_unknown_chars(known: frozenset[str], texts: tuple[tuple[str, str], ...], key: str, where: str) -> None:
    """A character-level model would drop these characters without a word: bad input, named."""
    for text, what in texts:
        for column, char in enumerate(text, start=1):
            if char not in known:
                raise ConfigError(
                    f"config key {key!r}: {where}: character {char!r} (U+{ord(char):04X}) at position {column} of the "
                    f"{what} is not in the model's character vocabulary (the embedded model takes {ALPHABET_TEXT}); "
                    "use a Hugging Face model (model.path) for other text",
                    key=key,
                )


def fit_prompt(tokens: list[int], cfg: Config, where: str) -> list[int] | None:
    """A prompt within `data.max_prompt_length` as `data.truncation` says; None = skip it."""
    limit = cfg.data.max_prompt_length
    if len(tokens) <= limit:
        return tokens
    if cfg.data.truncation == "error":
        raise ConfigError(
            f"config key 'data.max_prompt_length': {where}: prompt has {len(tokens)} tokens, more than "
            f"{limit} (data.truncation=error)",
            key="data.max_prompt_length",
        )
    if cfg.data.truncation == "skip":
        return None
    return tokens[-limit:]  # keep the end: the question and the assistant header


def _chat_messages(prompt: object, where: str) -> list[Message] | None:
    """A prompt cell is a text, or a chat (verl's format): a list of {"role": ..., "content": ...} objects.
    None for a text; anything else is bad input, named."""
    if isinstance(prompt, str):
        return None
    ok = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    )
    if not ok:
        raise ConfigError(
            f"config key 'data.prompt_key': {where}: prompt is {type(prompt).__name__}, not a string or a list of "
            '{"role": ..., "content": ...} messages',
            key="data.prompt_key",
        )
    assert isinstance(prompt, list)
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def load_records(cfg: Config, files: list[str], key: str, tokenizer: Any) -> list[PromptRecord]:
    """Tokenised prompts of data files; over-long prompts follow `data.truncation`."""
    data = cfg.data
    records: list[PromptRecord] = []
    skipped = 0
    known_chars = character_vocabulary(tokenizer)
    for path in files:
        before, skipped_before = len(records), skipped
        for number, row in _read_rows(path, key):
            where = f"{path}:{number}"
            for column, column_key in ((data.prompt_key, "data.prompt_key"), (data.answer_key, "data.answer_key")):
                if column not in row:
                    raise ConfigError(f"config key {column_key!r}: {where} has no column {column!r}", key=column_key)
            messages = _chat_messages(row[data.prompt_key], where)
            text = prompt_text(messages) if messages is not None else row[data.prompt_key]
            answer = str(row[data.answer_key])
            if known_chars is not None:
                contents = [m["content"] for m in messages] if messages is not None else [text]
                _refuse_unknown_chars(known_chars, (*((c, "prompt") for c in contents), (answer, "ground truth")), key, where)
            tokens = fit_prompt(encode_prompt(tokenizer, messages if messages is not None else text), cfg, where)
            if tokens is None:
                skipped += 1
                continue
            records.append(PromptRecord(text=text, tokens=tokens, ground_truth=answer, messages=messages))
        if len(records) == before and skipped == skipped_before:
            raise ConfigError(f"config key {key!r}: file {path!r} holds no prompts", key=key)
    if skipped:
        log.warning(
            "prompts_skipped", reason="longer than data.max_prompt_length", skipped=skipped, kept=len(records), key=key
        )
    if not records:
        raise ConfigError(
            f"config key {key!r}: every prompt is longer than data.max_prompt_length={data.max_prompt_length}", key=key
        )
    return records


def builtin_records(cfg: Config, tokenizer: Any) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """The named built-in task's train and held-out splits, tokenised."""
    if cfg.task.name not in builtin.TASKS:
        raise ConfigError(
            f"config key 'task.name': unknown task {cfg.task.name!r}; built in: {', '.join(builtin.TASKS)} "
            "(or give data.train_files)",
            key="task.name",
        )
    chat = bool(getattr(tokenizer, "chat_template", None))
    train, val = builtin.make_splits(cfg.task.name, cfg.task.num_prompts, cfg.task.num_val_prompts, cfg.seed)

    def records(examples: list[builtin.Example], split: str) -> list[PromptRecord]:
        out = []
        for i, ex in enumerate(examples):
            text = ex.instruction if chat else ex.prompt
            tokens = fit_prompt(encode_prompt(tokenizer, text), cfg, f"task {cfg.task.name!r} {split} prompt {i}")
            if tokens is not None:
                out.append(PromptRecord(text=text, tokens=tokens, ground_truth=ex.answer))
        if len(out) < len(examples):
            log.warning(
                "prompts_skipped",
                reason="longer than data.max_prompt_length",
                skipped=len(examples) - len(out),
                split=split,
            )
        if not out and split == "train":  # an empty val split only means no validation
            raise ConfigError(
                f"config key 'data.max_prompt_length': every {split} prompt of task {cfg.task.name!r} is longer "
                f"than {cfg.data.max_prompt_length} tokens",
                key="data.max_prompt_length",
            )
        return out

    return records(train, "train"), records(val, "val")


def build_real_task(cfg: Config, tokenizer: Any) -> TaskData:
    """Train source, held-out prompts, scorer and decoder for a real tokenizer."""

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    if cfg.data.train_files:
        train = load_records(cfg, cfg.data.train_files, "data.train_files", tokenizer)
        val = load_records(cfg, cfg.data.val_files, "data.val_files", tokenizer) if cfg.data.val_files else []
    else:
        train, val = builtin_records(cfg, tokenizer)
        if cfg.data.val_files:
            val = load_records(cfg, cfg.data.val_files, "data.val_files", tokenizer)
    if cfg.task.reward_fn:
        scorer: Any = UserScorer(cfg.task.reward_fn, import_reward_fn(cfg.task.reward_fn), decode)
    elif cfg.data.train_files:
        raise ConfigError(
            "config key 'task.reward_fn' is required with data.train_files (a built-in reward only fits its own task)",
            key="task.reward_fn",
        )
    else:
        scorer = BuiltinScorer(decode)
    return TaskData(
        train=PromptSource(train, seed=cfg.seed, shuffle=cfg.data.shuffle),
        val=[
            Prompt(index=i, epoch=0, text=r.text, tokens=r.tokens, ground_truth=r.ground_truth)
            for i, r in enumerate(val)
        ],
        scorer=scorer,
        decode=decode,
    )
