"""Classical scikit-learn heads: their kinds and parameters, saving and loading with a
checked SHA-256, and conversion to ONNX (below ``analysis``, which fits them on a run's
features, and ``export``, which puts them in a bundle).

Every head is saved with what is needed to trust it later::

    heads/<trial>/<head>.pkl     the pickled estimator (written atomically)
    heads/<trial>/<head>.json    {"kind", "estimator", "sha256" (of the .pkl), "sklearn",
                                  "feature_dim", "classes", "class_names", "trial", "params",
                                  "model_sha256", "accuracy", "fit_seconds", "predict_ms_per_image",
                                  "created"}

:func:`load_head` checks the SHA-256 recorded in the JSON before unpickling (a pickle can
run code). :func:`head_to_onnx` writes a fitted head as ONNX, probabilities as a plain float
tensor.
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ._lazy import require
from .errors import ConfigError, ExportError, TransferError
from .fsutil import atomic_path, read_json, sha256_file, write_json_atomic
from .models.onnx_convert import set_metadata
from .options import Check, Interval, OneOf, OptionSpec, check_choices, option, specs, to_dict, validate

HEAD_INPUT = "features"
HEAD_OUTPUT = "probabilities"


def _zipmap_off(estimator) -> dict:
    """skl2onnx options that return probabilities as a tensor for every classifier inside."""
    opts: dict = {}
    steps = getattr(estimator, "steps", None)
    last = steps[-1][1] if steps else estimator
    opts[id(last)] = {"zipmap": False}
    if last is not estimator:
        opts[id(estimator)] = {"zipmap": False}
    return opts


def head_to_onnx(estimator, feature_dim: int, path: str | os.PathLike, *, opset: int = 17) -> dict:
    """Write ``estimator`` (a fitted classifier or Pipeline) as ONNX.

    Input ``features`` float32 (N, feature_dim); outputs ``label`` (N,) and
    ``probabilities`` float32 (N, C) (no ZipMap, so any runtime reads a tensor).

    Raises:
        ExportError: skl2onnx cannot convert this estimator.

    Example::

        head_to_onnx(rf, 64, "heads/rf.onnx")
    """
    skl2onnx = require("skl2onnx", purpose="exporting classical heads to ONNX")
    from skl2onnx.common.data_types import FloatTensorType

    onnx = require("onnx", purpose="exporting classical heads to ONNX")
    try:
        proto = skl2onnx.convert_sklearn(
            estimator,
            initial_types=[(HEAD_INPUT, FloatTensorType([None, int(feature_dim)]))],
            options=_zipmap_off(estimator),
            target_opset={"": opset, "ai.onnx.ml": 3},
        )
    except Exception as exc:
        raise ExportError(f"skl2onnx cannot convert {type(estimator).__name__}: {type(exc).__name__}: {exc}",
                          hint="the pickle is still exported; run it as a pickle "
                               "(`transfer infer BUNDLE ... --head NAME --head-format pickle`)") from exc
    outs = [o.name for o in proto.graph.output]
    if HEAD_OUTPUT not in outs:
        # older converters call it output_probability
        for node in proto.graph.node:
            node.output[:] = [HEAD_OUTPUT if o == "output_probability" else ("label" if o == "output_label" else o)
                              for o in node.output]
        for o in proto.graph.output:
            o.name = {"output_probability": HEAD_OUTPUT, "output_label": "label"}.get(o.name, o.name)
    set_metadata(proto, role="head")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return {"input": HEAD_INPUT, "output": HEAD_OUTPUT}


_SVM_KERNELS = ("rbf", "linear", "poly", "sigmoid")


class HeadIntegrityError(TransferError):
    """A saved head does not match its JSON record (SHA-256), or its record is unreadable."""


def _non_zero_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v != 0


def _gamma(v) -> bool:
    if isinstance(v, str):
        return v in ("scale", "auto")
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and bool(np.isfinite(v)) and v > 0


def _read_int(v):
    return int(v) if isinstance(v, str) else v


#: the seed every head takes (``random_state``): an integer, or unset for none
_SEED = Interval(int)


@dataclass(frozen=True)
class RfParams:
    """The parameters of an ``rf`` head (scikit-learn's ``RandomForestClassifier``)."""

    n_estimators: int = option(200, Interval(int, 1), "RandomForest: number of trees.")
    max_depth: int | None = option(None, Interval(int, 1), "RandomForest: maximum depth (unset: unlimited).",
                                   none=True)
    min_samples_leaf: int = option(1, Interval(int, 1), "RandomForest: fewest images in a leaf.")
    n_jobs: int | None = option(-1, Check(_non_zero_int, "a non-zero integer (-1 = all cores)", read=_read_int),
                                "RandomForest: parallel jobs (-1 = all cores).", none=True)
    random_state: int | None = option(0, _SEED, "Seed.", none=True)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class SvmParams:
    """The parameters of an ``svm`` head (``StandardScaler`` + ``SVC``)."""

    C: float = option(1.0, Interval(float, 0, closed="neither"), "SVM: regularization C.")
    kernel: str = option("rbf", OneOf(*_SVM_KERNELS), "SVM kernel.")
    gamma: Any = option("scale", Check(_gamma, "'scale', 'auto' or a number > 0"), "SVM: kernel coefficient.")
    random_state: int | None = option(0, _SEED, "Seed.", none=True)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class LogregParams:
    """The parameters of a ``logreg`` head (``StandardScaler`` + ``LogisticRegression``)."""

    C: float = option(1.0, Interval(float, 0, closed="neither"), "Logistic regression: inverse regularization C.")
    max_iter: int = option(1000, Interval(int, 1), "Logistic regression: iterations.")
    random_state: int | None = option(0, _SEED, "Seed.", none=True)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class KnnParams:
    """The parameters of a ``knn`` head (``StandardScaler`` + ``KNeighborsClassifier``)."""

    n_neighbors: int = option(5, Interval(int, 1), "k-NN: neighbours.")
    weights: str = option("uniform", OneOf("uniform", "distance"), "k-NN: neighbour weights.")

    def __post_init__(self) -> None:
        validate(self)


#: each head kind's parameters, declared once (:mod:`transfer.options`): their checks, and the
#: constraints ``transfer heads``' flags reuse (:func:`param_spec`)
HEAD_PARAMS: dict[str, type] = {"rf": RfParams, "svm": SvmParams, "logreg": LogregParams, "knn": KnnParams}
#: Head kinds and their defaults (make_estimator keyword arguments).
HEAD_KINDS: dict[str, dict[str, Any]] = {k: to_dict(cls()) for k, cls in HEAD_PARAMS.items()}
DEFAULT_HEADS = ("rf", "svm", "logreg")
HEAD_DESCRIPTIONS = {
    "rf": "RandomForestClassifier",
    "svm": "StandardScaler + SVC (calibrated probabilities)",
    "logreg": "StandardScaler + LogisticRegression",
    "knn": "StandardScaler + KNeighborsClassifier",
}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_kinds(heads: Iterable[str] | str) -> tuple[str, ...]:
    """Validate head names (a list, or one comma-separated string); unknown names list the accepted ones.

    Raises:
        ConfigError: unknown or no head.
    """
    return tuple(check_choices(heads, HEAD_KINDS, "head", option="heads"))


def param_option(kind: str, name: str) -> str:
    """The name a head parameter goes by outside its kind (``svm``, ``C`` -> ``svm_c``); errors carry it."""
    return f"{kind}_{name}".lower()


def param_spec(kind: str, name: str) -> OptionSpec:
    """The declared spec of one head parameter (``rf``, ``n_estimators``): what ``transfer heads``'
    flag for it checks."""
    return next(spec for f, spec in specs(HEAD_PARAMS[kind]) if f.name == name)


def head_params(kind: str, params: dict | None = None) -> dict:
    """Defaults of ``kind`` updated with ``params``, checked by the kind's declared parameters
    (:data:`HEAD_PARAMS`).

    Raises:
        ConfigError: unknown kind, unknown parameter (lists the accepted ones), bad value
            (``option``: the parameter's name outside its kind, :func:`param_option`).
    """
    kind = check_kinds([kind])[0]
    params = dict(params or {})
    unknown = [k for k in params if k not in HEAD_KINDS[kind]]
    if unknown:
        raise ConfigError(f"{kind} head: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                          f"accepted: {', '.join(HEAD_KINDS[kind])}", option="params")
    try:
        return to_dict(HEAD_PARAMS[kind](**params))
    except ConfigError as exc:
        raise ConfigError(f"{kind} head: {exc.message}", hint=exc.hint,
                          option=param_option(kind, exc.option) if exc.option else "params") from None


def make_estimator(kind: str, **params):
    """An unfitted scikit-learn estimator for ``kind`` with sensible defaults.

    Kinds: ``rf`` RandomForest (200 trees, all cores), ``svm`` StandardScaler + RBF SVC
    with probabilities (``CalibratedClassifierCV(SVC(), ensemble=False)``, the
    replacement scikit-learn 1.9 gives for the deprecated ``SVC(probability=True)``),
    ``logreg`` StandardScaler + LogisticRegression, ``knn`` StandardScaler + k-NN.

    Args:
        kind: one of :data:`HEAD_KINDS`.
        **params: overrides of :data:`HEAD_KINDS` ``[kind]`` (e.g. ``n_estimators=500``, ``C=10``).

    Returns:
        An estimator with ``fit`` / ``predict`` / ``predict_proba``.

    Raises:
        ConfigError: unknown kind or parameter, bad value.

    Example::

        make_estimator("rf", n_estimators=50).n_estimators   # 50
    """
    p = head_params(kind, params)
    kind = check_kinds([kind])[0]
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "rf":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(**p)
    if kind == "svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        svc = SVC(C=p["C"], kernel=p["kernel"], gamma=p["gamma"], random_state=p["random_state"])
        return Pipeline([("scale", StandardScaler()), ("svm", CalibratedClassifierCV(svc, ensemble=False))])
    if kind == "logreg":
        from sklearn.linear_model import LogisticRegression

        return Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(**p))])
    from sklearn.neighbors import KNeighborsClassifier

    return Pipeline([("scale", StandardScaler()), ("knn", KNeighborsClassifier(**p))])


# --------------------------------------------------------------------------- saving / loading


def sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


def verify_head(pkl: str | os.PathLike) -> dict:
    """Check a head's ``.pkl`` against the SHA-256 in its ``.json``; returns the JSON record.

    Raises:
        HeadIntegrityError: missing file / record, unreadable record, or SHA-256 mismatch.
    """
    pkl = Path(pkl)
    if pkl.suffix == ".json":
        pkl = pkl.with_suffix(".pkl")
    js = pkl.with_suffix(".json")
    if not pkl.is_file():
        raise HeadIntegrityError(f"head file not found: {pkl}", hint="fit it with `transfer heads RUN --head NAME`")
    if not js.is_file():
        raise HeadIntegrityError(
            f"{pkl} has no record {js.name} (SHA-256, scikit-learn version, classes); refusing to unpickle it",
            hint="re-fit the head with `transfer heads RUN --head NAME`",
        )
    try:
        meta = read_json(js)
        want = meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HeadIntegrityError(f"the head record {js} is unreadable or has no sha256: {exc}",
                                 hint="re-fit the head with `transfer heads RUN --head NAME`") from exc
    got = sha256_file(pkl)
    if got != want:
        raise HeadIntegrityError(
            f"{pkl} has been modified: its SHA-256 is {got}, the record {js.name} says {want}; "
            "refusing to unpickle it (a pickle can run code)",
            hint="delete it and re-fit with `transfer heads RUN --head NAME`",
        )
    return meta


def load_head(path: str | os.PathLike) -> tuple[Any, dict]:
    """Load a saved head after checking its SHA-256 against its JSON record.

    Args:
        path: ``heads/<trial>/<head>.pkl`` (or its ``.json``).

    Returns:
        ``(estimator, record)``.

    Raises:
        HeadIntegrityError: see :func:`verify_head`, or the pickle cannot be read.

    Example::

        est, meta = load_head("runs/digits/heads/arc2-t100/rf.pkl")
        est.predict_proba(X).shape[1] == len(meta["classes"])     # True
    """
    pkl = Path(path)
    if pkl.suffix == ".json":
        pkl = pkl.with_suffix(".pkl")
    meta = verify_head(pkl)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # version warnings: the record names the version
            with open(pkl, "rb") as f:
                est = pickle.load(f)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a broken artifact
        raise HeadIntegrityError(f"cannot unpickle {pkl}: {exc}",
                                 hint=f"it was saved with scikit-learn {meta.get('sklearn')}; re-fit the head") from exc
    return est, meta


def save_head(est, folder: Path, record: dict) -> dict:
    """Pickle ``est`` as ``<kind>.pkl`` and write its record (with the pickle's SHA-256) as ``<kind>.json``."""
    pkl = folder / f"{record['kind']}.pkl"
    with atomic_path(pkl, suffix=".pkl") as tmp:
        with open(tmp, "wb") as f:
            pickle.dump(est, f, protocol=pickle.HIGHEST_PROTOCOL)
    record = {**record, "sha256": sha256_file(pkl), "created": _now()}
    write_json_atomic(folder / f"{record['kind']}.json", record)
    return record


__all__ = ["HEAD_KINDS", "HEAD_PARAMS", "RfParams", "SvmParams", "LogregParams", "KnnParams", "param_spec", "DEFAULT_HEADS", "HEAD_DESCRIPTIONS", "HeadIntegrityError", "check_kinds", "param_option",
           "head_params", "make_estimator", "sklearn_version", "verify_head", "load_head", "save_head",
           "head_to_onnx", "HEAD_INPUT", "HEAD_OUTPUT"]
