"""Training curves: loss and accuracy per epoch, train vs val (matplotlib, Agg)."""

from __future__ import annotations

import os
from typing import Sequence

from ._lazy import require
from .fsutil import atomic_path


def plot_curves(history: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> None:
    """Write ``curves.png``: two panels (loss, accuracy), train and val lines per epoch.

    Args:
        history: rows with keys epoch, loss, accuracy, val_loss, val_accuracy.
        path: output PNG (written atomically).
        title: figure title (the trial name).

    Example:
        >>> plot_curves([{"epoch": 1, "loss": 1, "accuracy": .5, "val_loss": 1, "val_accuracy": .5}],
        ...             "/tmp/c.png")  # doctest: +SKIP
    """
    matplotlib = require("matplotlib", purpose="training curves")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    try:
        for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
            ax.plot(epochs, [float(r[key]) for r in history], marker="o", label="train")
            vals = [r.get(f"val_{key}") for r in history]
            if any(v not in (None, "") for v in vals):
                ax.plot(epochs, [float(v) if v not in (None, "") else float("nan") for v in vals], marker="o", label="val")
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    finally:
        plt.close(fig)
