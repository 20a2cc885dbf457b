"""Agentic episodes: environments a model talks to over several turns (docs/agents.md).

`protocol.py` is what an environment implements, `loading.py` finds one by import path and calls
it guarded (a thread and a timeout for plain functions), `tokens.py` is the one rule for the tokens
an observation adds to an episode, and `calc.py` / `guess.py` are the built-in environments.
"""

from asyncpolicy.envs.protocol import Environment, Step

__all__ = ["Environment", "Step"]
