"""The options of ``transfer heads``, ``transfer evaluate`` and ``transfer features`` (looking
inside a trained run), declared once (:mod:`transfer.options`). Light imports: the CLI reads
it at startup."""

from __future__ import annotations

from dataclasses import dataclass

from ..classical_heads import DEFAULT_HEADS, HEAD_KINDS, param_spec
from ..options import Constraint, Flag, Interval, ListOf, OneOf, Text, option, validate

SPLITS = ("train", "val", "test")
_TRIALS = "best | all | a trial name (comma-separated names)."


def _rule(kind: str, name: str) -> Constraint:
    """The constraint a head parameter is declared with (:data:`transfer.classical_heads.HEAD_PARAMS`)."""
    return param_spec(kind, name).constraint


def _trial() -> str:
    return option("best", Text("best, all or trial names"), _TRIALS)


@dataclass(frozen=True)
class HeadsConfig:
    """Every option of ``transfer heads``: which heads, and their scikit-learn parameters.

    A parameter's field is named ``<kind>_<estimator parameter>``
    (:func:`transfer.classical_heads.param_option`), so the library's error about it names
    its flag. Unset parameters keep :data:`~transfer.classical_heads.HEAD_KINDS`' defaults.
    """

    trial: str = _trial()
    heads: tuple[str, ...] = option(DEFAULT_HEADS, ListOf(OneOf(*HEAD_KINDS)), "Classical heads to fit: rf, svm, "
                                    "logreg, knn.", flag="--head", metavar="H,..")
    rf_n_estimators: int | None = option(None, _rule("rf", "n_estimators"), "RandomForest: number of trees. [default: 200]",
                                         none=True, flag="--rf-trees")
    rf_max_depth: int | None = option(None, _rule("rf", "max_depth"), "RandomForest: maximum depth. [default: unlimited]",
                                      none=True, flag="--rf-depth")
    rf_n_jobs: int | None = option(None, _rule("rf", "n_jobs"), "RandomForest: parallel jobs (-1 = all cores). [default: -1]", none=True,
                                   flag="--rf-jobs")
    svm_c: float | None = option(None, _rule("svm", "C"), "SVM: regularization C. "
                                 "[default: 1.0]", none=True)
    svm_kernel: str | None = option(None, _rule("svm", "kernel"), "SVM kernel. [default: rbf]",
                                    none=True)
    logreg_c: float | None = option(None, _rule("logreg", "C"), "Logistic regression: inverse "
                                    "regularization C. [default: 1.0]", none=True)
    logreg_max_iter: int | None = option(None, _rule("logreg", "max_iter"), "Logistic regression: iterations. "
                                         "[default: 1000]", none=True)
    knn_n_neighbors: int | None = option(None, _rule("knn", "n_neighbors"), "k-NN: neighbours. [default: 5]", none=True,
                                         flag="--knn-k")
    seed: int | None = option(None, _rule("rf", "random_state"), "random_state of rf / svm / logreg. [default: 0]", none=True)

    def __post_init__(self) -> None:
        validate(self)

    def params(self) -> dict[str, dict]:
        """The parameters given, per head kind asked for (:func:`transfer.analysis.head_study.fit_heads`)."""
        given = {("rf", "n_estimators"): self.rf_n_estimators, ("rf", "max_depth"): self.rf_max_depth,
                 ("rf", "n_jobs"): self.rf_n_jobs, ("svm", "C"): self.svm_c, ("svm", "kernel"): self.svm_kernel,
                 ("logreg", "C"): self.logreg_c, ("logreg", "max_iter"): self.logreg_max_iter,
                 ("knn", "n_neighbors"): self.knn_n_neighbors}
        if self.seed is not None:
            given.update({(k, "random_state"): self.seed for k in ("rf", "svm", "logreg")})
        out: dict[str, dict] = {}
        for (kind, key), value in given.items():
            if value is not None and kind in self.heads:
                out.setdefault(kind, {})[key] = value
        return out


@dataclass(frozen=True)
class EvaluateConfig:
    """Every option of ``transfer evaluate``."""

    trial: str = _trial()
    split: str = option("test", OneOf(*SPLITS), "Split evaluated.")
    samples: int = option(16, Interval(int, 0), "Images in the random grid (and at most as many most confidently "
                          "wrong images).")
    seed: int = option(0, Interval(int), "Seed of the random image pick.")
    unknown: tuple[str, ...] = option((), ListOf(Text("a folder of images"), min_items=0), "Images of none of the "
                                      "classes (repeatable): score the bundle's unknown-input detection against the "
                                      "test split instead (AUROC, false accepts at its threshold).", repeat=True,
                                      metavar="DIR")
    bundle: str | None = option(None, Text("a bundle folder"), "With --unknown: the bundle. [default: RUN/bundle]",
                                none=True)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class FeaturesConfig:
    """Every option of ``transfer features``."""

    trial: str = _trial()
    plot: tuple[str, ...] | None = option(None, ListOf(OneOf("pca", "tsne")), "Also write a 2-D scatter of the "
                                          "features (pca, tsne or both: pca,tsne).", none=True, metavar="pca|tsne")
    split: str = option("test", OneOf(*SPLITS), "Split whose features are plotted.")
    max_points: int = option(2000, Interval(int, 1), "At most this many points in the plot.")
    force: bool = option(False, Flag(), "Re-extract even when the cache matches the model.")
    batch_size: int = option(64, Interval(int, 1), "Images per forward pass.")
    workers: int = option(2, Interval(int, 1), "Image decode threads.")

    def __post_init__(self) -> None:
        validate(self)


__all__ = ["HeadsConfig", "EvaluateConfig", "FeaturesConfig"]
