"""The registry of engine pairs is the one table: config, factory, serve-rollout and the CLI agree with it."""

from __future__ import annotations

import importlib
import subprocess
import sys
import typing

import pytest

from asyncpolicy.cli import main
from asyncpolicy.config import Config, RolloutConfig, TrainerConfig, load_config
from asyncpolicy.engines import registry
from asyncpolicy.engines.factory import resolve
from asyncpolicy.engines.generation.remote_server import load_server_config
from asyncpolicy.errors import ConfigError


def _choices(struct: type, field: str) -> set[str]:
    """The values a config key's Literal admits."""
    annotated = typing.get_type_hints(struct, include_extras=True)[field]
    return set(typing.get_args(typing.get_args(annotated)[0]))


def test_the_config_admits_exactly_the_registered_engines() -> None:
    assert _choices(RolloutConfig, "engine") == {g.name for g in registry.GENERATIONS}
    assert _choices(TrainerConfig, "engine") == {p.trainer for p in registry.PAIRS}
    assert {p.rollout for p in registry.PAIRS} == {g.name for g in registry.GENERATIONS}  # every engine has a pair
    assert len({(p.rollout, p.trainer) for p in registry.PAIRS}) == len(registry.PAIRS)


def test_config_accepts_every_registered_pair_and_names_them_all_when_refusing_another() -> None:
    for pair in registry.PAIRS:
        extra = ["trainer.n_gpus_per_node=0"] if pair.cpu_fsdp else []
        cfg = load_config(overrides=[f"rollout.engine={pair.rollout}", f"trainer.engine={pair.trainer}", *extra])
        assert registry.find_pair(cfg.rollout.engine, cfg.trainer.engine) is pair
    unpaired = [(g.name, t) for g in registry.GENERATIONS for t in {p.trainer for p in registry.PAIRS}
                if registry.find_pair(g.name, t) is None]
    assert unpaired, "every combination is a pair: nothing to refuse"
    for rollout, trainer in unpaired:
        with pytest.raises(ConfigError, match="do not go together") as e:
            load_config(overrides=[f"rollout.engine={rollout}", f"trainer.engine={trainer}"])
        assert all(f"rollout.engine={p.rollout} with trainer.engine={p.trainer}" in str(e.value) for p in registry.PAIRS)


def test_the_cpu_fsdp_pair_refuses_gpus() -> None:
    pair = next(p for p in registry.PAIRS if p.cpu_fsdp)
    with pytest.raises(ConfigError, match="trainer.n_gpus_per_node=0"):
        load_config(overrides=[f"rollout.engine={pair.rollout}", f"trainer.engine={pair.trainer}", "trainer.n_gpus_per_node=1"])


def test_every_named_module_and_builder_exists() -> None:
    """The registry names code by string: each name resolves (vLLM itself is not imported)."""
    for pair in registry.PAIRS:
        assert callable(resolve(pair.builder))
        for name in (*pair.modules, *pair.remote_modules):
            importlib.import_module(name)
        if pair.ready:
            module, _, attr = pair.ready.partition(":")
            assert callable(getattr(importlib.import_module(module), attr))
    for generation in registry.GENERATIONS:
        assert callable(resolve(generation.server))


def test_serve_rollout_pairs_a_server_with_its_engines_first_partner() -> None:
    for generation in registry.GENERATIONS:
        cfg: Config = load_server_config(None, [f"rollout.engine={generation.name}"])
        first = next(p for p in registry.PAIRS if p.rollout == generation.name)
        assert cfg.trainer.engine == registry.default_trainer(generation.name) == first.trainer


def test_the_cli_help_lists_the_registered_engines(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve-rollout", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(g.name in text for g in registry.GENERATIONS)


def test_the_registry_and_config_import_no_torch() -> None:
    """config.py imports the registry: it must stay plain data (config loads before any engine)."""
    code = "import sys, asyncpolicy.config, asyncpolicy.engines.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
