"""The options of ``transfer data audit``, declared once (:mod:`transfer.options`): where the
features come from (a run's trial, or a backbone), where the audit is written, and how it
searches. Light imports: the CLI reads it at startup."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.near_verify import NEAR_THRESHOLD
from ..options import Flag, Interval, Text, option, validate


@dataclass(frozen=True)
class AuditConfig:
    """Every option of ``transfer data audit``.

    Example::

        AuditConfig(backbone="arc2", weights="none", image_size=16).folds     # 5
        AuditConfig(folds=1)     # ConfigError: invalid folds: 1; accepted: an integer >= 2
    """

    run: str | None = option(None, Text("a run folder"), "A run of this folder: its trial gives the features, "
                             "its splits the leakage check.", none=True)
    trial: str = option("best", Text("best or a trial name"), "The run's trial (best or a name).")
    backbone: str | None = option(None, Text("a backbone name"), "Without --run: the backbone whose pooled "
                                  "features are used.", none=True)
    weights: str | None = option(None, Text("imagenet, none or a weights file"), "With --backbone: imagenet or a "
                                 "weights file. [default: imagenet]", none=True)
    image_size: int | None = option(None, Interval(int, 1), "With --backbone: input side. [default: the "
                                    "backbone's]", none=True)
    out: str | None = option(None, Text("a folder"), "Output folder. [default: RUN/audit, or FOLDER-audit beside "
                             "FOLDER]", none=True)
    near_threshold: float | None = option(
        None, Interval(float, 0, 1, closed="right"), "Verification score (band-passed detail correlation, 0-1) "
        f"from which two images are near duplicates. [default: {NEAR_THRESHOLD}]", none=True)
    folds: int = option(5, Interval(int, 2), "Folds of the heads cross-fitted for label issues; a class with fewer "
                        "readable images is not searched (a note says so).")
    neighbours: int = option(10, Interval(int, 1), "Neighbours of the outlier score.", cli=False)
    batch_size: int = option(256, Interval(int, 1), "Images per forward pass.")
    workers: int = option(2, Interval(int, 1), "Decoding threads.")
    force: bool = option(False, Flag(), "Audit again even when no file changed.")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def threshold(self) -> float:
        """The near-duplicate threshold in force."""
        return float(NEAR_THRESHOLD if self.near_threshold is None else self.near_threshold)


__all__ = ["AuditConfig"]
