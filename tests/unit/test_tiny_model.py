"""The embedded model is written in HF format once and loaded back through from_pretrained; bad paths are ConfigErrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asyncpolicy.config import load_config
from asyncpolicy.errors import ConfigError
from asyncpolicy.models import tiny


def test_embedded_model_round_trips_through_from_pretrained(model_cache: Path) -> None:
    path = tiny.resolve_model_path(load_config())
    assert Path(path).parent == model_cache
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path(path).iterdir()}
    loaded = tiny.load_model(path)
    tokenizer = tiny.load_tokenizer(path)
    fresh = tiny.build_model(tiny.build_tokenizer())  # the seeded init, never written to disk
    for (name, a), (_, b) in zip(loaded.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    n_params = sum(p.numel() for p in loaded.parameters())
    assert 50_000 < n_params < 1_000_000
    assert loaded.config.eos_token_id == tokenizer.eos_token_id == loaded.generation_config.eos_token_id
    assert loaded.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.chat_template is None


def test_tokenizer_is_one_token_per_character(model_cache: Path) -> None:
    tokenizer = tiny.load_tokenizer(tiny.resolve_model_path(load_config()))
    ids = tokenizer(tiny.ALPHABET)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(tiny.ALPHABET) + 1
    assert len(set(ids)) == len(ids)
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == tiny.ALPHABET


def test_second_resolve_reuses_the_cache(model_cache: Path) -> None:
    path = Path(tiny.resolve_model_path(load_config()))
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert Path(tiny.resolve_model_path(load_config())) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in model_cache.iterdir() if p.name.startswith(".building-")]


def test_missing_model_directory_names_model_path(tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"model.path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="model.path.*is not a directory") as info:
        tiny.resolve_model_path(cfg)
    assert info.value.key == "model.path"


def test_directory_without_config_json_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json.*is missing") as info:
        tiny.resolve_model_path(load_config(overrides=[f"model.path={tmp_path}"]))
    assert info.value.key == "model.path"


def test_directory_without_tokenizer_names_the_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ConfigError, match="no tokenizer file") as info:
        tiny.resolve_model_path(load_config(overrides=[f"model.path={tmp_path}"]))
    assert info.value.key == "model.path"


def test_tokenizer_takes_printable_ascii_newline_and_tab(model_cache: Path) -> None:
    """User prompts keep their spaces and capitals: one token per character, decoded back unchanged."""
    loaded = tiny.load_tokenizer(tiny.resolve_model_path(load_config()))
    built = tiny.build_tokenizer()
    text = "Sort these letters: eszy\n\t~ !"
    for tokenizer in (loaded, built):
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert loaded(text)["input_ids"] == built(text)["input_ids"]
    assert set(tiny.ALPHABET) == {chr(c) for c in range(32, 127)} | {"\n", "\t"}
    assert tiny.character_vocabulary(loaded) == tiny.character_vocabulary(built) == frozenset(tiny.ALPHABET)


def test_a_subword_tokenizer_has_no_character_limit() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    assert tiny.character_vocabulary(PreTrainedTokenizerFast(tokenizer_object=core)) is None
