"""The model cache: where built-in models are built, once, and never half.

Why a rename: a build takes seconds (the embedded model) to a minute (a GGUF conversion) and may be
interrupted or raced by another process. Each build writes into a temp directory beside its
target and renames it into place, so a directory that exists is complete, and a concurrent
builder that wins the race is as good.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def model_cache() -> Path:
    """$ASYNCPOLICY_CACHE or ~/.cache/asyncpolicy, never the repo."""
    return Path(os.environ.get("ASYNCPOLICY_CACHE") or Path.home() / ".cache" / "asyncpolicy")


def build_once(target: Path, write: Callable[[Path], None]) -> bool:
    """`write(tmp)` a Hugging Face directory and rename it to `target`, unless `target` is there; True when built here."""
    if (target / "config.json").exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a lost race: a real failure
                raise
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def has_weights(model_path: str) -> bool:
    """Whether a model directory holds weights, or only a config (engines then start from random or dummy weights)."""
    return any(f.endswith(WEIGHT_SUFFIXES) for f in os.listdir(model_path))
