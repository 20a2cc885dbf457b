"""Config loading: every bad key, value or file is a ConfigError naming the culprit."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncpolicy.cli import main
from asyncpolicy.config import Config, describe_fields, load_config, to_dict
from asyncpolicy.errors import ConfigError


def error_of(*overrides: str, path: str | Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value


# -- good input ---------------------------------------------------------------------------------


def test_defaults_load_and_cover_the_seed_keys() -> None:
    keys = {key for key, _, _ in describe_fields()}
    seed_keys = {
        "data.train_batch_size", "data.max_prompt_length", "data.max_response_length", "trainer.total_training_steps",
        "trainer.n_gpus_per_node", "rollout.n_gpus_per_node", "rollout.n", "async_training.staleness_threshold",
        "async_training.max_queue_size", "async_training.generation_timeout",
        "async_training.trigger_parameter_sync_step", "async_training.require_batches", "async_training.partial_rollout",
        "rollout.engine", "trainer.engine", "trainer.save_freq", "output_dir",
    }
    assert seed_keys <= keys
    assert isinstance(load_config(), Config)


def test_every_field_has_a_one_line_description() -> None:
    missing = [key for key, _, desc in describe_fields() if not desc or "\n" in desc]
    assert not missing


def test_seed_style_overrides_apply() -> None:
    cfg = load_config(None, ["async_training.max_queue_size=500", "async_training.staleness_threshold=5"])
    assert (cfg.async_training.max_queue_size, cfg.async_training.staleness_threshold) == (500, 5)


def test_yaml_file_then_overrides_win(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  train_batch_size: 4\nasync_training:\n  staleness_threshold: 3\n  max_queue_size: 100\n")
    cfg = load_config(f, ["data.train_batch_size=2"])
    assert (cfg.data.train_batch_size, cfg.async_training.staleness_threshold, cfg.async_training.max_queue_size) == (2, 3, 100)


def test_toml_file_loads(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[data]\ntrain_batch_size = 16\n[async_training]\nmax_queue_size = 1000\ngeneration_timeout = 30.0\n")
    cfg = load_config(f)
    assert (cfg.data.train_batch_size, cfg.async_training.max_queue_size, cfg.async_training.generation_timeout) == (16, 1000, 30.0)


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert load_config(f) == load_config()


# -- bad keys and values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [("foo=1", "foo"), ("data.foo=1", "data.foo"), ("rollout.simulated.foo=1", "rollout.simulated.foo")],
)
def test_unknown_key_is_named(override: str, key: str) -> None:
    err = error_of(override)
    assert str(err).startswith(f"unknown config key {key!r}") and err.key == key


@pytest.mark.parametrize(
    "override, meant",
    [
        ("trainer.lr_schedul=cosine", "trainer.lr_schedule"),  # a typo in the name
        ("data.lr=0.1", "trainer.lr"),  # the right name in the wrong section
        ("outputdir=x", "output_dir"),
        ("trainr.lr=0.1", "trainer"),  # a typo in the section
    ],
)
def test_unknown_key_suggests_the_closest_one(override: str, meant: str) -> None:
    assert str(error_of(override)).endswith(f"; did you mean {meant!r}?")


def test_unknown_key_without_a_close_one_points_to_the_reference() -> None:
    assert str(error_of("foo=1")) == "unknown config key 'foo' (`python -m asyncpolicy config` lists every key)"


def test_wrong_type_names_the_key_and_the_types() -> None:
    err = error_of("data.train_batch_size=abc")
    assert str(err) == "config key 'data.train_batch_size': expected `int`, got `str`"
    assert err.key == "data.train_batch_size"


def test_negative_staleness_is_refused() -> None:
    err = error_of("async_training.staleness_threshold=-1")
    assert str(err) == "config key 'async_training.staleness_threshold': expected `int` >= 0"


def test_queue_smaller_than_a_batch_is_refused() -> None:
    err = error_of("data.train_batch_size=8", "async_training.max_queue_size=4")
    assert err.key == "async_training.max_queue_size"
    assert str(err) == (
        "config key 'async_training.max_queue_size': 4 is smaller than one batch (data.train_batch_size=8); "
        "the trainer could never fill a batch"
    )


def test_sync_period_longer_than_the_staleness_window_is_refused() -> None:
    err = error_of("async_training.trigger_parameter_sync_step=3", "async_training.staleness_threshold=1")
    assert err.key == "async_training.trigger_parameter_sync_step"


def test_require_batches_must_divide_the_batch() -> None:
    err = error_of("data.train_batch_size=16", "async_training.require_batches=3")
    assert str(err) == "config key 'async_training.require_batches': 3 does not divide data.train_batch_size=16"


def default_of(key: str) -> object:
    value: object = to_dict(Config())
    for part in key.split("."):
        value = value[part]  # type: ignore[index]
    return value


FLOAT_KEYS = [key for key, _, _ in describe_fields() if isinstance(default_of(key), float)]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_key_refuses_non_finite_values(key: str, value: str) -> None:
    """No key gives infinity a meaning: timeouts bound every wait, and an infinite LR only makes NaN losses."""
    assert error_of(f"{key}={value}").key == key


def test_the_timeouts_follow_one_rule() -> None:
    timeouts = [key for key in FLOAT_KEYS if "timeout" in key]
    assert len(timeouts) == 7  # task.env_timeout_s and task.agent_timeout_s joined the engine, step and stop timeouts
    docs = {key: desc for key, _, desc in describe_fields()}
    assert all(docs[key].endswith("(finite)") for key in timeouts)
    assert str(error_of("trainer.lr=.inf")) == "config key 'trainer.lr': inf is not a finite number"


@pytest.mark.parametrize("override", ["seed=99999999999999999999999999", "seed=-1"])
def test_seed_out_of_range_is_refused(override: str) -> None:
    assert error_of(override).key == "seed"


def test_an_int_beyond_64_bits_is_refused() -> None:
    err = error_of("trainer.total_training_steps=100000000000000000000")
    assert str(err) == "config key 'trainer.total_training_steps': 100000000000000000000 does not fit in a 64-bit integer"


def test_unknown_engine_names_the_key_and_the_choices() -> None:
    assert str(error_of("rollout.engine=foo")) == (
        "config key 'rollout.engine': invalid enum value 'foo'; one of: simulated, hf, vllm"
    )
    assert str(error_of("algorithm.adv_estimator=ppo")).endswith("; one of: grpo, rloo")


def test_the_reference_lists_every_enum_keys_values() -> None:
    docs = {key: desc for key, _, desc in describe_fields()}
    assert docs["algorithm.adv_estimator"].endswith("(one of: grpo, rloo)")
    assert docs["rollout.engine"].endswith("(one of: simulated, hf, vllm)")


@pytest.mark.parametrize(
    "override, message",
    [
        ("noequals", "override 'noequals' is not of the form key=value"),
        ("=3", "override '=3' has an empty key"),
        ("data..x=1", "override 'data..x=1' has an empty key"),
    ],
)
def test_bad_override_syntax(override: str, message: str) -> None:
    assert str(error_of(override)) == message


def test_override_into_a_value_is_refused() -> None:
    err = error_of("data.train_batch_size=2", "data.train_batch_size.x=1")
    assert str(err) == "config key 'data.train_batch_size.x': 'train_batch_size' is a value, not a section"


def test_string_key_keeps_numeric_looking_override_text() -> None:
    """`output_dir=2024` is a directory named 2024: a str-typed key keeps the override's text."""
    cfg = load_config(None, ["output_dir=2024", "data.prompt_key=1"])
    assert (cfg.output_dir, cfg.data.prompt_key) == ("2024", "1")


def test_non_string_key_in_a_section_names_the_section() -> None:
    """A mapping with a non-string key inside `data` is reported under 'data', not msgspec's path text."""
    assert error_of("data={1: 2}").key == "data"


# -- bad files ----------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert str(error_of(path=path)) == f"config file {str(path)!r} cannot be read: No such file or directory"


def test_malformed_yaml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data: [\n")
    err = error_of(path=path)
    assert str(err).startswith(f"config file {str(path)!r} is not valid YAML: ") and err.key == str(path)


def test_bad_toml_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("a = \n")
    assert str(error_of(path=path)) == f"config file {str(path)!r} is not valid TOML: Invalid value (at line 1, column 5)"


def test_undecodable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe")
    assert str(error_of(path=path)).startswith(f"config file {str(path)!r} is not UTF-8 text")


def test_a_file_that_is_not_a_mapping_is_named(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert str(error_of(path=path)) == f"config file {str(path)!r} must hold a mapping of sections, not list"


def test_unknown_key_in_a_file_is_named_with_its_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train_batchsize: 2\n")
    assert str(error_of(path=path)) == "unknown config key 'data.train_batchsize'; did you mean 'data.train_batch_size'?"


# -- any override: a config or a ConfigError, nothing else --------------------------------------

KNOWN_KEYS = sorted(key for key, _, _ in describe_fields())
SECTIONS = sorted({key.rsplit(".", 1)[0] for key in KNOWN_KEYS if "." in key})
scalar_text = st.one_of(
    st.integers(-5, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "~", "", "[]", "{}", "[1, 2]", "{a: 1}", "yes", "off", ".nan", "-.inf",
                     "1e3", "0x10", "2020-01-01", "!!binary aGk=", "&a 1", "*a", "'quoted'", '"x"', "[", "{", ":", "- x"]),
    st.text(max_size=12),
)
keys = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(SECTIONS),
    st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(SECTIONS), st.text(max_size=6)),
    st.text(max_size=10),
)
overrides = st.one_of(st.builds(lambda k, v: f"{k}={v}", keys, scalar_text), st.text(max_size=16))


@settings(max_examples=8 * settings().max_examples)  # cheap: microseconds per example
@given(st.lists(overrides, max_size=4))
def test_any_override_gives_a_config_or_a_config_error(words: list[str]) -> None:
    try:
        cfg = load_config(None, words)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=4 * settings().max_examples)
@given(st.lists(overrides, max_size=3))
def test_any_override_through_the_cli_exits_0_or_2(words: list[str]) -> None:
    """`python -m asyncpolicy config WORDS`: the resolved config (0) or one error line (2), never a crash."""
    out, err = io.StringIO(), io.StringIO()
    code: int | str | None  # SystemExit.code's type
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["config", "--", *words])
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue()
