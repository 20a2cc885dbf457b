"""The embedded default model: a tiny Qwen2 causal LM and a character tokenizer, in Hugging Face format.

Why write it to disk at all: after it is built once, `model.path=embedded` and
`model.path=/path/to/Qwen2.5-0.5B-Instruct` take exactly the same code path
(`AutoTokenizer`/`AutoModelForCausalLM.from_pretrained`, local files only), so the CPU default
exercises what users run. The cache directory name carries a hash of everything that defines the
model, so a change to it builds a new one instead of loading a stale one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import structlog
import torch

from asyncpolicy.config import Config
from asyncpolicy.errors import ConfigError, first_line
from asyncpolicy.models.cache import build_once, model_cache

log = structlog.get_logger(__name__)

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
# The characters the embedded model takes, one token each: printable ASCII (space included),
# newline and tab. The built-in tasks' characters come first, so their ids stay small and stable.
_TASK_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789+-=<>?:."
ALPHABET = _TASK_CHARS + "".join(c for c in map(chr, range(32, 127)) if c not in _TASK_CHARS) + "\n\t"
ALPHABET_TEXT = "printable ASCII from space to '~', newline and tab"
# AutoTokenizer loads a qwen2-typed directory as Qwen2's tokenizer, which puts its byte-level
# pre-tokenizer in front of the vocabulary: it sees a space as 'Ġ', a newline as 'Ċ', a tab as 'ĉ'
# (GPT-2's byte-to-unicode table; the other printable characters map to themselves). So the
# vocabulary holds those byte-level forms, and the tokenizer built here is byte-level too: the
# one built in process and the one loaded back encode and decode alike.
_BYTE_LEVEL = {" ": "\u0120", "\n": "\u010a", "\t": "\u0109"}

# About 130 thousand parameters. A 300k version (hidden 128) collapsed onto a shortcut sooner and
# scored lower on `reverse` in the same 400 steps; this one lifts its reward from ~0.01 to 0.3-0.6
# in about a minute on two cores (it does not master the task: middle characters stay hard). Runs
# differ (asynchronous timing changes the batches): with the printable-ASCII vocabulary, six
# default runs across four inits ended between 0.27 and 0.61 over their last 40 steps; one run of
# the earlier 44-character vocabulary ended at 0.60.
TINY_ARCH: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}
TINY_SEED = 1234  # the embedded weights are the same on every machine
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _quiet_transformers() -> None:
    """No per-file progress bars: they would drown the run's own progress line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _version_hash() -> str:
    spec = json.dumps({"arch": TINY_ARCH, "alphabet": ALPHABET, "seed": TINY_SEED, "format": 1}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def embedded_dir() -> Path:
    """Where the embedded model lives, under the model cache."""
    return model_cache() / f"embedded-{_version_hash()}"


def build_tokenizer() -> Any:
    """A character-level `PreTrainedTokenizerFast`: one token per alphabet character plus pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *(_BYTE_LEVEL.get(c, c) for c in ALPHABET)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("", behavior="isolated"),  # every character is a word
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # ' ' -> 'Ġ', as Qwen2's
        ]
    )
    core.decoder = decoders.ByteLevel()  # 'Ġ' -> ' ', characters joined without spaces between them
    # Prompts start with <bos> so the first real character has a context position to attend from.
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )


def character_vocabulary(tokenizer: Any) -> frozenset[str] | None:
    """The characters a character-level tokenizer (the embedded model's, or a checkpoint of it) has
    tokens for; it drops any other character without a word. None for a subword vocabulary, which
    has a token (or bytes) for every character."""
    specials = set(tokenizer.all_special_tokens)
    tokens = [tok for tok in tokenizer.get_vocab() if tok not in specials]
    if any(len(tok) != 1 for tok in tokens):
        return None
    from_byte_level = {v: k for k, v in _BYTE_LEVEL.items()}
    return frozenset(from_byte_level.get(tok, tok) for tok in tokens)


def build_model(tokenizer: Any) -> Any:
    """A seeded, randomly initialised tiny Qwen2; pad/bos/eos ids agree with the tokenizer."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_ARCH,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def ensure_embedded() -> Path:
    """Build the embedded model once (see models/cache.py)."""
    target = embedded_dir()

    def write(tmp: Path) -> None:
        _quiet_transformers()
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        log.info("embedded_model_built", path=str(target), parameters=sum(p.numel() for p in model.parameters()))

    build_once(target, write)
    return target


def resolve_model_path(cfg: Config) -> str:
    """`model.path` as a directory from_pretrained can load, or a ConfigError naming what is missing."""
    if cfg.model.path == "embedded":
        return str(ensure_embedded())
    from asyncpolicy.models import smollm2

    if cfg.model.path == smollm2.NAME:
        return str(smollm2.ensure_smollm2())
    path = Path(cfg.model.path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"config key 'model.path': {str(path)!r} is not a directory", key="model.path")
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"config key 'model.path': {str(path / 'config.json')!r} is missing; "
            "expected a Hugging Face model directory",
            key="model.path",
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"config key 'model.path': no tokenizer file ({', '.join(TOKENIZER_FILES)}) in {str(path)!r}",
            key="model.path",
        )
    check_model_files(path)
    return str(path)


def check_model_files(path: Path) -> None:
    """Read what a run would read first (config.json, the weights' headers): a corrupt file is bad input
    named here, before the run writes anything, not a transformers traceback later."""
    from transformers import AutoConfig

    config_file = path / "config.json"
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"config key 'model.path': {str(config_file)!r} is not valid JSON ({first_line(e)})", key="model.path"
        ) from None
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"config key 'model.path': {str(config_file)!r} is not a model config transformers can load "
            f"({first_line(e)})",
            key="model.path",
        ) from None
    from safetensors import SafetensorError, safe_open

    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):  # reads the header only
                pass
        except (OSError, SafetensorError) as e:
            raise ConfigError(
                f"config key 'model.path': {str(weights)!r} is not a readable safetensors file ({first_line(e)})",
                key="model.path",
            ) from None


def load_tokenizer(path: str) -> Any:
    """The tokenizer, left-padding (generation appends on the right); one that cannot load is bad input."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - `tokenizers` reports a corrupt file as a plain Exception
        raise ConfigError(
            f"config key 'model.path': no tokenizer could be loaded from {path!r} ({first_line(e)})", key="model.path"
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:  # many causal LMs ship without one; padding is always masked
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "float32", attn_implementation: str | None = None) -> Any:
    """The causal LM from a local directory, in `model.dtype` (attention: transformers' default unless given)."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[dtype]
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True, **kw)
