"""Counters as frozen values.

An actor replaces its counters on every change instead of mutating them, so a snapshot or a
statistics view taken earlier never changes under its reader (a checkpoint encodes a consistent
cut without copying), and nothing outside the actor can write them.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

C = TypeVar("C", bound=msgspec.Struct)


def add(counters: C, **amounts: float) -> C:
    """`counters` with each named field increased by its amount (an unknown name is a TypeError)."""
    return msgspec.structs.replace(counters, **{name: getattr(counters, name) + n for name, n in amounts.items()})
