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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ._lazy import require
from .errors import ConfigError, ExportError, TransferError
from .fsutil import atomic_path, read_json, sha256_file, write_json_atomic
from .models.onnx_convert import set_metadata
from .options import check_choices

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


class HeadIntegrityError(TransferError):
    """A saved head does not match its JSON record (SHA-256), or its record is unreadable."""


#: Head kinds, their defaults (make_estimator keyword arguments) and a short description.
HEAD_KINDS: dict[str, dict[str, Any]] = {
    "rf": {"n_estimators": 200, "max_depth": None, "min_samples_leaf": 1, "n_jobs": -1, "random_state": 0},
    "svm": {"C": 1.0, "kernel": "rbf", "gamma": "scale", "random_state": 0},
    "logreg": {"C": 1.0, "max_iter": 1000, "random_state": 0},
    "knn": {"n_neighbors": 5, "weights": "uniform"},
}
DEFAULT_HEADS = ("rf", "svm", "logreg")
HEAD_DESCRIPTIONS = {
    "rf": "RandomForestClassifier",
    "svm": "StandardScaler + SVC (calibrated probabilities)",
    "logreg": "StandardScaler + LogisticRegression",
    "knn": "StandardScaler + KNeighborsClassifier",
}
_SVM_KERNELS = ("rbf", "linear", "poly", "sigmoid")


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


def _positive(kind: str, name: str, v, *, integer: bool, allow_none: bool = False, minimum: float = 0.0):
    if v is None and allow_none:
        return None
    ok = not isinstance(v, bool) and isinstance(v, (int, np.integer) if integer else (int, float, np.number))
    if not ok or not np.isfinite(float(v)) or float(v) <= minimum:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{kind} head: {name} must be {what} > {minimum:g} (got {v!r})",
                          option=param_option(kind, name))
    return int(v) if integer else float(v)


def head_params(kind: str, params: dict | None = None) -> dict:
    """Defaults of ``kind`` updated with ``params``, validated.

    Raises:
        ConfigError: unknown kind, unknown parameter (lists the accepted ones), bad value.
    """
    kind = check_kinds([kind])[0]
    out = dict(HEAD_KINDS[kind])
    params = dict(params or {})
    unknown = [k for k in params if k not in out]
    if unknown:
        raise ConfigError(f"{kind} head: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                          f"accepted: {', '.join(out)}", option="params")
    out.update(params)
    if kind == "rf":
        out["n_estimators"] = _positive(kind, "n_estimators", out["n_estimators"], integer=True)
        out["max_depth"] = _positive(kind, "max_depth", out["max_depth"], integer=True, allow_none=True)
        out["min_samples_leaf"] = _positive(kind, "min_samples_leaf", out["min_samples_leaf"], integer=True)
        if out["n_jobs"] is not None and (isinstance(out["n_jobs"], bool) or not isinstance(out["n_jobs"], int)
                                          or out["n_jobs"] == 0):
            raise ConfigError(f"rf head: n_jobs must be a non-zero integer (-1 = all cores), got {out['n_jobs']!r}",
                              option=param_option(kind, "n_jobs"))
    elif kind == "svm":
        out["C"] = _positive(kind, "C", out["C"], integer=False)
        if out["kernel"] not in _SVM_KERNELS:
            raise ConfigError(f"svm head: unknown kernel {out['kernel']!r}; accepted: {', '.join(_SVM_KERNELS)}",
                              option=param_option(kind, "kernel"))
        g = out["gamma"]
        if not (g in ("scale", "auto") or (isinstance(g, (int, float, np.number)) and not isinstance(g, bool)
                                           and np.isfinite(float(g)) and float(g) > 0)):
            raise ConfigError(f"svm head: gamma must be 'scale', 'auto' or a number > 0 (got {out['gamma']!r})",
                              option=param_option(kind, "gamma"))
    elif kind == "logreg":
        out["C"] = _positive(kind, "C", out["C"], integer=False)
        out["max_iter"] = _positive(kind, "max_iter", out["max_iter"], integer=True)
    elif kind == "knn":
        out["n_neighbors"] = _positive(kind, "n_neighbors", out["n_neighbors"], integer=True)
        if out["weights"] not in ("uniform", "distance"):
            raise ConfigError(f"knn head: weights must be 'uniform' or 'distance' (got {out['weights']!r})",
                              option=param_option(kind, "weights"))
    return out


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


__all__ = ["HEAD_KINDS", "DEFAULT_HEADS", "HEAD_DESCRIPTIONS", "HeadIntegrityError", "check_kinds", "param_option",
           "head_params", "make_estimator", "sklearn_version", "verify_head", "load_head", "save_head",
           "head_to_onnx", "HEAD_INPUT", "HEAD_OUTPUT"]
