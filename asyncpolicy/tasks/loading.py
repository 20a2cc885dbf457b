"""Prompts and rewards for real models: a built-in task, or the user's JSONL/Parquet files and reward.

A user reward is a dotted path `pkg.module:function` with signature
`score(prompt: str, response: str, ground_truth: str) -> float`. Scorers only compute; the
rollouter guards every call (errors and non-finite values are logged, counted and scored 0).
Every problem with the inputs is a `ConfigError` naming the config key and the file (and line).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import structlog

from asyncpolicy.config import Config, DataConfig
from asyncpolicy.dotted import import_named
from asyncpolicy.errors import ConfigError, first_line
from asyncpolicy.models.tiny import ALPHABET_TEXT, character_vocabulary
from asyncpolicy.samples import Prompt
from asyncpolicy.tasks.base import ChatMessage, Example, PromptRecord, PromptSource, TaskData
from asyncpolicy.tasks.catalog import TASKS, FileTask, GeneratedTask

log = structlog.get_logger(__name__)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, text: str, messages: tuple[ChatMessage, ...] = ()) -> list[int]:
    """Token ids of a prompt, the ids every engine receives (none re-tokenises text).

    With a chat template: `messages` (default: `text` as one user message) rendered once with the
    assistant's header (`add_generation_prompt`) and tokenised once, special tokens as they are.
    Without one: `text` tokenised plainly, or, for a chat of several messages, their contents joined
    by newlines (a system prompt is not lost)."""
    if has_chat_template(tokenizer):
        chat = [msgspec.to_builtins(m) for m in messages] or [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        return [int(i) for i in ids]
    plain = "\n".join(m.content for m in messages) if len(messages) > 1 else text
    return list(tokenizer(plain)["input_ids"])


def prompt_text(messages: tuple[ChatMessage, ...]) -> str:
    """What a chat prompt reads as in rewards and logs: its last user message."""
    users = [m.content for m in messages if m.role == "user"]
    return users[-1] if users else messages[-1].content


def _chat_messages(prompt: object, where: str) -> tuple[ChatMessage, ...] | None:
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
    return tuple(ChatMessage(m["role"], m["content"]) for m in prompt)


def example_prompt(example: Example, chat: bool) -> tuple[str, tuple[ChatMessage, ...]]:
    """(text, messages) of a generated problem: the instruction as the user's message; the text is
    that instruction for a chat model, the plain prompt for a tokenizer without a chat template."""
    return (example.instruction if chat else example.prompt), (ChatMessage("user", example.instruction),)


class RewardScorer:
    """A reward `score(prompt, response, ground_truth)`, named by its dotted path: a task's or the user's."""

    def __init__(self, name: str, fn: Callable[[str, str, str], float], decode: Callable[[list[int]], str]) -> None:
        self.name = name
        self.fn = fn
        self.decode = decode

    def __call__(self, prompt: Prompt, response_tokens: list[int]) -> float:
        return self.fn(prompt.text, self.decode(response_tokens), prompt.ground_truth)


def _scored_by_environment(prompt: str, response: str, ground_truth: str) -> float:
    raise RuntimeError("this task's responses are episodes, scored by its environment: a single response has no reward")


def import_reward_fn(path: str) -> Callable[[str, str, str], float]:
    """`pkg.module:function` → the function; a ConfigError naming task.reward_fn otherwise."""
    fn: Callable[[str, str, str], float] = import_named(path, "task.reward_fn")
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


def _columns(cfg: Config, file_task: FileTask | None) -> tuple[str, str]:
    """(prompt column, answer column): a file task's own unless data.prompt_key/answer_key are changed."""
    data, defaults = cfg.data, DataConfig()
    if file_task is None:
        return data.prompt_key, data.answer_key
    return (
        data.prompt_key if data.prompt_key != defaults.prompt_key else file_task.prompt_column,
        data.answer_key if data.answer_key != defaults.answer_key else file_task.answer_column,
    )


def load_records(
    cfg: Config, files: list[str], key: str, tokenizer: Any, file_task: FileTask | None = None
) -> list[PromptRecord]:
    """Tokenised prompts of data files, as a file task shapes them (gsm8k) or as they are;
    over-long prompts follow `data.truncation`."""
    data = cfg.data
    prompt_column, answer_column = _columns(cfg, file_task)
    records: list[PromptRecord] = []
    skipped = 0
    known_chars = character_vocabulary(tokenizer)
    chat = has_chat_template(tokenizer)
    for path in files:
        before, skipped_before = len(records), skipped
        for number, row in _read_rows(path, key):
            where = f"{path}:{number}"
            for column, column_key in ((prompt_column, "data.prompt_key"), (answer_column, "data.answer_key")):
                if column not in row:
                    raise ConfigError(f"config key {column_key!r}: {where} has no column {column!r}", key=column_key)
            chat_cell = _chat_messages(row[prompt_column], where)
            text = prompt_text(chat_cell) if chat_cell is not None else row[prompt_column]
            answer = str(row[answer_column])
            messages: tuple[ChatMessage, ...] = chat_cell or (ChatMessage("user", text),)
            if file_task is not None:
                try:
                    example = file_task.example(text, answer)
                except ValueError as e:
                    raise ConfigError(f"config key {key!r}: {where}: {e}", key=key) from None
                (text, messages), answer = example_prompt(example, chat), example.answer
            if known_chars is not None:
                contents = [(m.content, "prompt") for m in messages]
                _refuse_unknown_chars(known_chars, (*contents, (answer, "ground truth")), key, where)
            tokens = fit_prompt(encode_prompt(tokenizer, text, messages), cfg, where)
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


def builtin_records(cfg: Config, task: GeneratedTask, tokenizer: Any) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """A generated task's train and held-out splits, tokenised."""
    chat = has_chat_template(tokenizer)
    train, val = task.splits(cfg.task.num_prompts, cfg.task.num_val_prompts, cfg.seed, cfg.task.difficulty)

    def records(examples: list[Example], split: str) -> list[PromptRecord]:
        out = []
        for i, ex in enumerate(examples):
            text, messages = example_prompt(ex, chat)
            where = f"task {cfg.task.name!r} {split} prompt {i}"
            tokens = fit_prompt(encode_prompt(tokenizer, text, messages), cfg, where)
            if tokens is not None:
                out.append(PromptRecord(text=text, tokens=tokens, ground_truth=ex.answer, messages=messages))
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

    task = TASKS[cfg.task.name]  # config's task.name admits only these names
    file_task = task if isinstance(task, FileTask) else None
    val: list[PromptRecord]
    if cfg.data.train_files:
        train, val = load_records(cfg, cfg.data.train_files, "data.train_files", tokenizer, file_task), []
    else:
        assert isinstance(task, GeneratedTask), "check_consistency refuses a file task without data.train_files"
        train, val = builtin_records(cfg, task, tokenizer)
    if cfg.data.val_files:
        val = load_records(cfg, cfg.data.val_files, "data.val_files", tokenizer, file_task)
    if cfg.data.train_files and file_task is None and not cfg.task.reward_fn:
        raise ConfigError(
            "config key 'task.reward_fn' is required with data.train_files (a generated task's reward only fits its "
            "own problems; task.name=gsm8k scores GSM8K-format files)",
            key="task.reward_fn",
        )
    reward_fn = cfg.task.reward_fn or task.reward_fn
    if not reward_fn:  # a game (guess): its environment scores every episode, this scorer is never called
        assert isinstance(task, GeneratedTask) and task.env, "a task without a reward has an environment"
        reward_fn = f"{task.env} (its episodes' reward)"
        scorer = RewardScorer(reward_fn, _scored_by_environment, decode)
    else:
        scorer = RewardScorer(reward_fn, import_reward_fn(reward_fn), decode)
    return TaskData(
        train=PromptSource(train, seed=cfg.seed, shuffle=cfg.data.shuffle),
        val=[
            Prompt(index=i, epoch=0, text=r.text, tokens=r.tokens, ground_truth=r.ground_truth)
            for i, r in enumerate(val)
        ],
        scorer=scorer,
        decode=decode,
    )
