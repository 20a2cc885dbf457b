"""Environments named by import path, and their guarded calls (envs/loading.py)."""

from __future__ import annotations

import threading

import anyio
import pytest

from asyncpolicy.envs.loading import call_env, load_env
from asyncpolicy.envs.protocol import Step
from asyncpolicy.errors import ConfigError


class NoStep:
    def reset(self, prompt: object) -> None:
        return None


class PlainEnv:
    def reset(self, prompt: object) -> None:
        return None

    def step(self, model_text: str) -> Step:
        return Step(observation=threading.current_thread().name, done=True)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
        ("json:NoSuchEnv", "has no environment 'NoSuchEnv'"),
        ("json", "is not of the form 'pkg.module:environment'"),
        (f"{__name__}:NoStep", "has no step method"),
    ],
)
def test_a_bad_environment_path_is_bad_input_naming_the_key(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_env(path)
    assert err.value.key == "task.env" and "'task.env'" in str(err.value)


@pytest.mark.anyio
async def test_a_plain_method_runs_in_a_worker_thread() -> None:
    env = load_env(f"{__name__}:PlainEnv")()
    step = await call_env(env.step, "x", timeout=30.0)
    assert step.done and step.observation != threading.current_thread().name


@pytest.mark.anyio
async def test_a_blocked_plain_or_async_call_times_out_and_the_loop_goes_on() -> None:
    never = threading.Event()

    def blocks(_: object) -> None:
        never.wait()  # a hung tool: only the timeout ends the call

    async def hangs(_: object) -> None:
        await anyio.sleep_forever()

    try:
        for method in (blocks, hangs):
            with pytest.raises(TimeoutError):
                await call_env(method, None, timeout=0.05)
    finally:
        never.set()  # release the abandoned thread
