"""Every way a run can end badly, each its own named exception.

The CLI maps them onto exit codes: `ConfigError` (bad input) → 2, any `RunFailed` → 1.
Nothing here is ever swallowed to report a failure as success.
"""

from __future__ import annotations


class AsyncPolicyError(Exception):
    """Base of the project's own errors."""


class ConfigError(AsyncPolicyError):
    """Bad input: a config key, value, file or path. Exit code 2; the message names the culprit."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class RunFailed(AsyncPolicyError):
    """The run started but could not finish. Exit code 1."""


class ActorFailed(RunFailed):
    """An actor (rollouter, trainer, synchronizer, ...) raised; the supervisor names it."""

    def __init__(self, actor: str, cause: BaseException) -> None:
        super().__init__(f"actor {actor!r} failed: {type(cause).__name__}: {cause}")
        self.actor = actor
        self.cause = cause


class SyncFailed(RunFailed):
    """Weight synchronisation failed on every retry."""


class GenerationFailed(RunFailed):
    """A generation kept failing (errors or timeouts) past its retry budget."""


class EngineTimeout(AsyncPolicyError, TimeoutError):
    """A wait on an engine passed its deadline."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type when empty): error reports stay one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def first_failure(group: BaseExceptionGroup) -> BaseException:
    """The first RunFailed inside (possibly nested) task-group exception groups, else the sole
    error the groups wrap, else the group.

    Task groups wrap a child's error; callers want the named failure itself, as the user sees it.
    """
    failures = group.subgroup(lambda e: isinstance(e, RunFailed))
    if failures is not None:
        leaf: BaseException = failures
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        return leaf
    sole: BaseException = group
    while isinstance(sole, BaseExceptionGroup) and len(sole.exceptions) == 1:
        sole = sole.exceptions[0]
    return group if isinstance(sole, BaseExceptionGroup) else sole
