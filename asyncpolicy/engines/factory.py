"""Build the engines a config names. Heavy engines are imported only when asked for."""

from __future__ import annotations

import ctypes
import glob
import importlib
import importlib.util
import os
import random
import sys

from asyncpolicy.config import Config
from asyncpolicy.engines.protocols import EngineSet
from asyncpolicy.errors import ConfigError

_MODULES = {  # what each pair of config.ENGINE_PAIRS imports; only the vllm pair needs vllm itself
    ("simulated", "simulated"): ("asyncpolicy.engines.sets.simulated",),
    ("hf", "torch"): ("asyncpolicy.engines.sets.hf_torch",),
    ("hf", "fsdp"): ("asyncpolicy.engines.sets.hf_fsdp",),
    ("vllm", "fsdp"): ("asyncpolicy.engines.sets.vllm_fsdp",),
}


def _preload_torch_libraries() -> None:
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
    pair = (cfg.rollout.engine, cfg.trainer.engine)
    if pair != ("simulated", "simulated"):
        _preload_torch_libraries()
    if cfg.rollout.servers:  # generation runs on the servers: this process needs the client and the trainer only
        try:
            importlib.import_module("asyncpolicy.engines.sets.remote")
        except ImportError as e:
            raise ConfigError(
                f"rollout.servers needs httpx, which is not importable ({e}); install it with `pip install asyncpolicy[remote]`",
                key="rollout.servers",
            ) from None
        trainer = {"torch": "asyncpolicy.engines.training.torch_trainer", "fsdp": "asyncpolicy.engines.training.fsdp_trainer"}
        if cfg.trainer.engine in trainer:
            importlib.import_module(trainer[cfg.trainer.engine])
        return
    for name in _MODULES[pair]:
        module = importlib.import_module(name)
    if pair == ("vllm", "fsdp"):
        module.import_vllm()  # vllm itself (a ConfigError naming the extra when it is missing)


def build_engines(cfg: Config, *, rng: random.Random) -> EngineSet:
    """The generation engine, trainer engine and weight transport of this run (not yet started).

    The pair of engines was checked with the config (`config.ENGINE_PAIRS`).
    """
    if cfg.rollout.servers:
        from asyncpolicy.engines.sets.remote import build_remote_engines

        return build_remote_engines(cfg)
    pair = (cfg.rollout.engine, cfg.trainer.engine)
    if pair == ("simulated", "simulated"):
        from asyncpolicy.engines.sets.simulated import build_simulated_engines

        return build_simulated_engines(cfg, rng)
    if pair == ("hf", "torch"):
        from asyncpolicy.engines.sets.hf_torch import build_hf_torch_engines

        return build_hf_torch_engines(cfg)
    if pair == ("hf", "fsdp"):
        from asyncpolicy.engines.sets.hf_fsdp import build_hf_fsdp_engines

        return build_hf_fsdp_engines(cfg)
    from asyncpolicy.engines.sets.vllm_fsdp import build_vllm_fsdp_engines

    return build_vllm_fsdp_engines(cfg)
