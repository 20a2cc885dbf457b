"""User code named by a dotted path `pkg.module:name` (a reward, an environment), imported one way.

Every failure is bad input (`ConfigError` naming the config key, exit 2), found before the run starts.
"""

from __future__ import annotations

import importlib
from typing import Any

from asyncpolicy.errors import ConfigError, first_line


def import_named(path: str, key: str, what: str = "function") -> Any:
    """`pkg.module:name` → the callable it names; a ConfigError naming `key` otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"config key {key!r}: {path!r} is not of the form 'pkg.module:{what}'", key=key)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module may fail any way on import (SyntaxError, its own raise)
        raise ConfigError(
            f"config key {key!r}: cannot import module {module_name!r}: {type(e).__name__}: {first_line(e)}", key=key
        ) from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise ConfigError(f"config key {key!r}: {module_name!r} has no {what} {attr!r}", key=key)
    return obj
