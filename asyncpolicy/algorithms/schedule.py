"""The learning-rate schedule both trainers use: linear warm-up, then constant or cosine decay.

Counted in optimizer updates (steps × require_batches), so the curve is the same however a step
is split, and a resumed run continues it from the update it had reached.
"""

from __future__ import annotations

import math


def lr_lambda(update: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak LR for optimizer update number `update` (0-based)."""
    if warmup and update < warmup:
        return (update + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))
