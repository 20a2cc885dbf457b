"""PNG plots for the report, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def save(fig: Any, out_dir: Path, name: str, caption: str) -> str:
    """Write `<name>.png` with the machine and command in its caption; returns the file name for the report."""
    fig.text(0.99, 0.005, caption, ha="right", va="bottom", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
