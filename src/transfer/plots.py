"""The one matplotlib set-up (headless Agg, atomic PNG writes) and the training curves.

Every chart of the package (curves, confusion matrices, feature scatters, Grad-CAM grids,
resolution charts, bench throughput) is drawn with :func:`pyplot` and written with
:func:`save_figure`, so all of them work without a display and a kill never leaves a
half-written PNG. matplotlib is imported on first use (``transfer[train]``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

from ._lazy import require
from .fsutil import atomic_path


def pyplot(purpose: str = "charts"):
    """``matplotlib.pyplot`` on the headless Agg backend.

    Raises:
        DependencyMissingError: matplotlib is not installed (the hint names the extra).
    """
    matplotlib = require("matplotlib", purpose=purpose)
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 90) -> None:
    """Write ``fig`` as a PNG atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


@contextlib.contextmanager
def figure(*args, purpose: str = "charts", **kwargs) -> Iterator[tuple]:
    """``plt.subplots(*args, **kwargs)`` closed afterwards: ``with figure(1, 2) as (fig, axes): ...``."""
    plt = pyplot(purpose)
    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
    finally:
        plt.close(fig)


def plot_curves(history: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> None:
    """Write ``curves.png``: two panels (loss, accuracy), train and val lines per epoch.

    Args:
        history: rows with keys epoch, loss, accuracy, val_loss, val_accuracy.
        path: output PNG (written atomically).
        title: figure title (the trial name).

    Example::

        plot_curves([{"epoch": 1, "loss": 1, "accuracy": .5, "val_loss": 1, "val_accuracy": .5}], "curves.png")
    """
    epochs = [int(r["epoch"]) for r in history]
    with figure(1, 2, figsize=(9, 3.5), purpose="training curves") as (fig, axes):
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
        save_figure(fig, path)
