"""Autotune: a controller that moves the admission window and the effective staleness at run time."""

from asyncpolicy.autotune.policy import Bounds, Decision, Limits, Memory, Observation, decide
from asyncpolicy.autotune.tuner import Autotuner, AutotuneStatistics

__all__ = ["Autotuner", "AutotuneStatistics", "Bounds", "Decision", "Limits", "Memory", "Observation", "decide"]
