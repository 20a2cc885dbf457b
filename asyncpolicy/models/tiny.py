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
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import structlog
import torch

from asyncpolicy.config import Config
from asyncpolicy.errors import ConfigError

log = structlog.get_logger(__name__)

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
# Every character the built-in tasks use (tasks/builtin.py), one token each. Printable ASCII
# without space on purpose: AutoTokenizer loads a qwen2-typed directory with Qwen2's byte-level
# pre-tokenizer, which maps these characters to themselves but a space to 'Ġ' (not in the vocab).
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789+-=<>?:."

# About 126 thousand parameters. A 300k version (hidden 128) collapsed onto a shortcut sooner and
# scored lower on `reverse` in the same 400 steps; this one lifts its reward from ~0.03 to ~0.6 in
# about a minute on two cores (it does not master the task: middle characters stay hard).
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
    """Where the embedded model lives: $ASYNCPOLICY_CACHE or ~/.cache/asyncpolicy, never the repo."""
    root = Path(os.environ.get("ASYNCPOLICY_CACHE") or Path.home() / ".cache" / "asyncpolicy")
    return root / f"embedded-{_version_hash()}"


def build_tokenizer() -> Any:
    """A character-level `PreTrainedTokenizerFast`: one token per alphabet character plus pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *ALPHABET])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # every character is a word
    core.decoder = decoders.Fuse()  # join characters back without spaces between them
    # Prompts start with <bos> so the first real character has a context position to attend from.
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )


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
    """Build the embedded model once; concurrent builders race safely (temp dir, then rename)."""
    target = embedded_dir()
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _quiet_transformers()
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("embedded_model_built", path=str(target), parameters=n_params)
    return target


def resolve_model_path(cfg: Config) -> str:
    """`model.path` as a directory from_pretrained can load, or a ConfigError naming what is missing."""
    if cfg.model.path == "embedded":
        return str(ensure_embedded())
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
    return str(path)


def load_tokenizer(path: str) -> Any:
    """The tokenizer, left-padding (generation appends on the right)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:  # many causal LMs ship without one; padding is always masked
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str = "float32") -> Any:
    """The causal LM from a local directory, in `model.dtype`."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
