"""Build the engines a config names, from `registry.py`. Heavy engines are imported only when asked for."""

from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.util
import os
import random
import sys
from collections.abc import Callable
from typing import Any

from asyncpolicy.config import Config
from asyncpolicy.engines import registry
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.errors import ConfigError

def preload_torch_libraries() -> None:
    """Load torch's native libraries with the GIL released, before `import torch` loads them with it held.

    CPython's import of an extension module (and ctypes.CDLL) calls dlopen with the GIL held:
    for libtorch that is 150-300 ms in which no other thread runs, the host's loop included,
    even though the import itself runs in a worker thread. A dlopen called through ctypes' foreign
    function interface releases the GIL; the import then finds the libraries loaded. It follows
    torch's own order and flags (its global deps with RTLD_GLOBAL, then `_C` with Python's flags),
    so symbol visibility is what a plain import gives. Linux only, and only an optimisation: at
    the first library that does not load, it stops and leaves the rest to torch's import.
    """
    if sys.platform != "linux" or "torch" in sys.modules or os.getenv("TORCH_USE_RTLD_GLOBAL"):
        return  # (torch then loads `_C` with RTLD_GLOBAL itself: leave it to do so)
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return
    package = os.path.dirname(spec.origin)
    steps = [(os.path.join(package, "lib", "libtorch_global_deps.so"), os.RTLD_NOW | os.RTLD_GLOBAL)]
    steps += [(path, sys.getdlopenflags()) for path in sorted(glob.glob(os.path.join(package, "_C.*.so")))]
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return
    libc.dlopen.restype = ctypes.c_void_p
    libc.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    for path, flags in steps:
        if not os.path.exists(path) or not libc.dlopen(path.encode(), flags):  # handles kept for the process's life
            return


def import_engine_modules(cfg: Config) -> None:
    """Import what `build_engines` will need (torch, transformers, vllm: seconds).

    Run it in a worker thread before building: importing only fills `sys.modules`, so a cancelled
    start-up may abandon it, and the loop never waits on it.
    """
    pair = _pair(cfg)
    if pair.torch:
        preload_torch_libraries()
    if cfg.rollout.servers:  # generation runs on the servers: this process needs the client and the trainer only
        try:
            importlib.import_module("asyncpolicy.engines.sets.remote")
        except ImportError as e:
            raise ConfigError(
                f"rollout.servers needs httpx, which is not importable ({e}); install it with `pip install asyncpolicy[remote]`",
                key="rollout.servers",
            ) from None
        for name in pair.remote_modules:
            importlib.import_module(name)
        return
    for name in pair.modules:
        importlib.import_module(name)
    if pair.ready:
        resolve(pair.ready)()  # e.g. vllm itself (a ConfigError naming the extra when it is missing)


def build_engines(cfg: Config, *, rng: random.Random) -> EngineSet:
    """The generation engine, trainer engine and weight transport of this run (not yet started)."""
    if cfg.rollout.servers:
        from asyncpolicy.engines.sets.remote import build_remote_engines

        return build_remote_engines(cfg)
    set_builder: Callable[[Config, random.Random], EngineSet] = resolve(_pair(cfg).builder)
    return set_builder(cfg, rng)


def resolve(ref: str) -> Any:
    """A registry's "module:attribute" → the attribute, importing the module now."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _pair(cfg: Config) -> registry.Pair:
    pair = registry.find_pair(cfg.rollout.engine, cfg.trainer.engine)
    assert pair is not None, "config.check_consistency admits registered pairs only"
    return pair
