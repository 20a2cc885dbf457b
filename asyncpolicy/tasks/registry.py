"""Pick the task a config names and give the runtime its prompts and scorer."""

from __future__ import annotations

import random
from typing import Any

from asyncpolicy.agents.episode import agent_spec
from asyncpolicy.config import Config
from asyncpolicy.engines.simulated import SimulatedTokenizer
from asyncpolicy.envs.loading import episode_spec
from asyncpolicy.samples import Prompt
from asyncpolicy.tasks.base import PromptRecord, PromptSource, TaskData


class SimulatedScorer:
    """Scores simulated engines' random tokens (see engines/simulated.py)."""

    name = "asyncpolicy.engines.simulated:simulated_reward"

    def __call__(self, prompt: Prompt, response_tokens: list[int]) -> float:
        from asyncpolicy.engines.simulated import simulated_reward

        return simulated_reward(response_tokens)


def simulated_task(cfg: Config) -> TaskData:
    """Random-token prompts for the simulated engines."""
    rng = random.Random(cfg.seed)
    n_tokens = min(8, cfg.data.max_prompt_length)

    def records(n: int) -> list[PromptRecord]:
        return [
            PromptRecord(text=f"sim-{i}", tokens=[rng.randrange(1, 64) for _ in range(n_tokens)]) for i in range(n)
        ]

    val = [
        Prompt(index=i, epoch=0, text=r.text, tokens=r.tokens) for i, r in enumerate(records(cfg.task.num_val_prompts))
    ]
    return TaskData(
        train=PromptSource(records(cfg.task.num_prompts), seed=cfg.seed, shuffle=cfg.data.shuffle),
        val=val,
        scorer=SimulatedScorer(),
        decode=SimulatedTokenizer().decode,
    )


def build_task(cfg: Config, tokenizer: Any) -> TaskData:
    """Simulated prompts for simulated engines; otherwise the named built-in task or the data files.
    With an environment (`task.env`, or the task's own) or an agent (`task.agent`, replacing the
    task's own environment) its responses are episodes."""
    if cfg.rollout.engine == "simulated":
        task = simulated_task(cfg)
        tok = SimulatedTokenizer()
        task.episodes = agent_spec(cfg, tok, tok.decode) or episode_spec(cfg, tok, tok.decode)
        return task
    from asyncpolicy.tasks.catalog import TASKS, GeneratedTask
    from asyncpolicy.tasks.loading import build_real_task

    task = build_real_task(cfg, tokenizer)
    own = TASKS[cfg.task.name]
    if cfg.task.agent:
        task.episodes = agent_spec(cfg, tokenizer, task.decode)
    elif isinstance(own, GeneratedTask):
        task.episodes = episode_spec(cfg, tokenizer, task.decode, own.env, own.max_turns, own.max_turn_tokens)
    else:
        task.episodes = episode_spec(cfg, tokenizer, task.decode)
    return task
