"""first_failure: what a user sees when a task group wraps an error."""

from __future__ import annotations

from asyncpolicy.errors import ConfigError, RunFailed, first_failure


def test_first_failure_prefers_the_named_run_failure() -> None:
    failed = RunFailed("trainer failed")
    group = BaseExceptionGroup("outer", [ValueError("x"), BaseExceptionGroup("inner", [failed])])
    assert first_failure(group) is failed


def test_first_failure_unwraps_a_sole_error_however_deep() -> None:
    bad = ConfigError("config key 'output_dir': not writable", key="output_dir")
    assert first_failure(BaseExceptionGroup("a", [BaseExceptionGroup("b", [bad])])) is bad


def test_first_failure_keeps_a_group_of_several_unnamed_errors() -> None:
    group = BaseExceptionGroup("a", [ValueError("x"), KeyError("y")])
    assert first_failure(group) is group
