"""The manifest's schema: a ``manifest.json`` parsed (bounded JSON, a format version this
transfer reads) and every field it must have checked for its shape -- class names, input,
models, heads, files, verification summary, the calibration and unknown-input records -- so
a removed or misshapen field is named instead of switching a check off or relabelling a
prediction. What the fields claim about the files is :mod:`transfer.bundle_claims`'.
"""

from __future__ import annotations

from pathlib import Path

from .bundle_format import (
    BUNDLE_FORMAT,
    FORMAT_VERSION,
    MAX_JSON_DEPTH,
    PRECISIONS,
    REEXPORT,
    RUNTIMES,
)
from .errors import BundleError, TamperedBundleError
from .fsutil import JSONLimitError, loads_json
from .unknown_scores import SCORE_ARRAYS, SCORE_PARAMS, SCORES


def parse_manifest(raw: bytes, mpath: Path) -> dict:
    """A manifest from its bytes: bounded JSON, a supported format version, the complete schema."""
    try:
        manifest = loads_json(raw.decode("utf-8"), max_depth=MAX_JSON_DEPTH, what=str(mpath))
    except JSONLimitError as exc:
        raise TamperedBundleError(f"{exc}; not a bundle's manifest", hint=REEXPORT) from None
    except ValueError as exc:
        raise TamperedBundleError(f"{mpath} is not valid JSON: {exc}", hint=REEXPORT) from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{mpath}: not a transfer bundle manifest (format={fmt!r:.60})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        tools = manifest.get("tools")
        made_by = tools.get("transfer") if isinstance(tools, dict) else None
        raise BundleError(
            f"{mpath}: bundle format version {version!r:.20} is not supported (this transfer reads {FORMAT_VERSION})",
            hint=(f"the bundle was written by a newer transfer{f' ({made_by})' if made_by else ''}: upgrade transfer"
                  if newer else "re-export the bundle with this version of transfer"),
        )
    _check_schema(manifest, mpath)
    return manifest


class _Schema:
    """The manifest's required fields and their shapes (a missing or misshapen one is named)."""

    def __init__(self, m: dict, mpath: Path):
        self.m, self.mpath = m, mpath

    def bad(self, what: str):
        raise TamperedBundleError(f"{self.mpath}: {what}", hint=REEXPORT)

    def need(self, key: str, kind: type | tuple, what: str, where: dict | None = None, name: str | None = None):
        where = self.m if where is None else where
        if key not in where:
            self.bad(f"manifest has no {name or key!r}")
        v = where[key]
        if isinstance(v, bool) and kind is not bool or not isinstance(v, kind):
            self.bad(f"{name or key!r} must be {what} (got {v!r:.80})")
        return v

    def positive(self, key: str, where: dict | None = None, name: str | None = None) -> int:
        v = self.need(key, int, "a positive integer", where, name)
        if v < 1:
            self.bad(f"{name or key!r} must be a positive integer (got {v!r})")
        return v

    def file_name(self, v, name: str) -> str:
        if not isinstance(v, str) or not v:
            self.bad(f"{name!r} must name a file (got {v!r:.80})")
        return v


def _check_schema(m: dict, mpath: Path) -> None:
    """Refuse a manifest whose required fields are missing or of the wrong shape (a hand edit, a
    truncated copy), naming the field, instead of failing later or predicting wrong labels."""
    s = _Schema(m, mpath)
    s.need("valid", bool, "true or false")
    names = s.need("class_names", list, "a non-empty list of names")
    if not names or not all(isinstance(n, str) and n for n in names):
        s.bad(f"'class_names' must be a non-empty list of names (got {names!r:.80})")
    if len(set(names)) != len(names):
        s.bad("'class_names' has duplicate names")
    if s.positive("num_classes") != len(names):
        s.bad(f"'num_classes' is {m['num_classes']!r} but 'class_names' lists {len(names)} names")
    s.file_name(m.get("labels"), "labels")
    inp = s.need("input", dict, "an object")
    for k in ("height", "width"):
        s.positive(k, inp, f"input.{k}")
    if inp.get("channels", 3) != 3:
        s.bad(f"'input.channels' is {inp.get('channels')!r}; bundles take 3-channel RGB")
    if inp.get("dtype", "float32") != "float32":
        s.bad(f"'input.dtype' is {inp.get('dtype')!r}; bundle models take float32 pixels")
    feature_dim = s.positive("feature_dim")
    for key in ("preprocessing", "models", "heads", "files", "verification"):
        s.need(key, dict, "an object")
    if not m["models"]:
        s.bad("'models' is empty: the bundle has no model to run")
    for k, e in m["models"].items():
        _check_model_entry(s, k, e)
    for k, e in m["heads"].items():
        _check_head_entry(s, k, e, feature_dim)
    default = m.get("default_head", "network")
    if default != "network" and default not in m["heads"]:
        s.bad(f"'default_head' is {default!r}, which is neither 'network' nor a head of the bundle")
    for rel, e in m["files"].items():
        if not isinstance(e, dict) or not isinstance(e.get("sha256"), str) or len(e["sha256"]) != 64:
            s.bad(f"'files.{rel}' has no SHA-256")
        if isinstance(e.get("bytes"), bool) or not isinstance(e.get("bytes"), int) or e["bytes"] < 0:
            s.bad(f"'files.{rel}' has no size in bytes")
    for k, v in m["verification"].items():
        if not isinstance(v, dict) or not isinstance(v.get("passed"), bool):
            s.bad(f"'verification.{k}' has no passed: true|false")
    _check_calibration_entries(s, m)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _check_calibration_entries(s: _Schema, m: dict) -> None:
    """``calibration`` (a temperature applied, or ``method: none`` with the reason; ``applied``
    agrees with the fp32 model's ``calibrated``) and ``unknown`` (``method: none`` with the
    reason, or scores this runtime computes, each with a finite threshold, its parameter file
    and scalars, and a default among them)."""
    cal = m.get("calibration")
    if cal is not None:
        if not isinstance(cal, dict) or not isinstance(cal.get("method"), str):
            s.bad("'calibration' must be an object with a method")
        applied = cal.get("applied", cal["method"] != "none")  # bundles from before the check had no 'applied'
        if not isinstance(applied, bool) or applied != (cal["method"] != "none"):
            s.bad(f"'calibration.applied' is {cal.get('applied')!r} but the method is {cal['method']!r}")
        if applied and not (_finite(cal.get("temperature")) and cal["temperature"] > 0):
            s.bad(f"'calibration.temperature' must be a positive number (got {cal.get('temperature')!r})")
        if not applied and cal.get("temperature", 1.0) != 1.0:
            s.bad(f"'calibration.temperature' is {cal['temperature']!r} but no temperature was applied")
        if not applied and not isinstance(cal.get("reason"), str):
            s.bad("'calibration' applies no temperature and does not say why ('reason')")
        fp32 = m["models"].get("onnx-fp32")
        if isinstance(fp32, dict) and bool(fp32.get("calibrated", False)) != applied:
            s.bad(f"'models.onnx-fp32.calibrated' is {fp32.get('calibrated')!r} but 'calibration.applied' is "
                  f"{applied!r}")
    unk = m.get("unknown")
    if unk is None:
        return
    if isinstance(unk, dict) and unk.get("method") == "none":
        if not isinstance(unk.get("reason"), str) or unk.get("scores"):
            s.bad("'unknown' with method 'none' must give its reason and no scores")
        return
    if not isinstance(unk, dict) or not isinstance(unk.get("scores"), dict) or not unk["scores"]:
        s.bad("'unknown' must be an object with its scores")
    for name, e in unk["scores"].items():
        where = f"unknown.scores.{name}"
        if name not in SCORES:
            s.bad(f"'{where}' is not a score this transfer computes ({', '.join(SCORES)})")
        if not isinstance(e, dict) or not _finite(e.get("threshold")):
            s.bad(f"'{where}' has no numeric threshold")
        if SCORE_ARRAYS[name]:
            s.file_name(e.get("file"), f"{where}.file")
        for k in SCORE_PARAMS[name]:
            if not _finite(e.get(k)):
                s.bad(f"'{where}.{k}' must be a number (got {e.get(k)!r:.40})")
        if name == "knn" and not (isinstance(e["k"], int) and e["k"] >= 1):
            s.bad(f"'{where}.k' must be a positive integer (got {e['k']!r:.40})")
        acc = e.get("val_acceptance", 0.5)
        if not _finite(acc) or not 0 <= acc <= 1:
            s.bad(f"'{where}.val_acceptance' must be a fraction (got {acc!r:.40})")
    if unk.get("default") not in unk["scores"]:
        s.bad(f"'unknown.default' is {unk.get('default')!r}, not one of its scores")
    acc = unk.get("accept", 0.95)
    if not _finite(acc) or not 0 < acc < 1:
        s.bad(f"'unknown.accept' must be a fraction in (0, 1) (got {acc!r:.40})")


def _check_model_entry(s: _Schema, key: str, e) -> None:
    if not isinstance(e, dict):
        s.bad(f"'models.{key}' must be an object")
    s.file_name(e.get("file"), f"models.{key}.file")
    runtime = e.get("runtime", "onnxruntime")
    precision = e.get("precision")
    if runtime not in RUNTIMES or precision not in PRECISIONS:
        s.bad(f"'models.{key}' has runtime {runtime!r} and precision {precision!r}; accepted: "
              f"{', '.join(RUNTIMES)} and {', '.join(PRECISIONS)}")
    if key != f"{RUNTIMES[runtime]}-{precision}":
        s.bad(f"'models.{key}' is a {runtime} {precision} model; its key would be "
              f"{RUNTIMES[runtime]}-{precision!r} (the runtime chooses models by key)")
    ext = e.get("external_data", [])
    if not isinstance(ext, list) or not all(isinstance(x, str) and x for x in ext):
        s.bad(f"'models.{key}.external_data' must be a list of file names")


def _check_head_entry(s: _Schema, name: str, e, feature_dim: int) -> None:
    if not isinstance(e, dict):
        s.bad(f"'heads.{name}' must be an object")
    files = [e.get("onnx"), e.get("pickle")]
    if not any(files) or not all(f is None or isinstance(f, str) for f in files):
        s.bad(f"'heads.{name}' names no file")
    for k in ("input", "output"):
        if k in e and not isinstance(e[k], str):
            s.bad(f"'heads.{name}.{k}' must be a tensor name")
    if e.get("feature_dim", feature_dim) != feature_dim:
        s.bad(f"'heads.{name}' takes {e.get('feature_dim')!r}-d features but the models give {feature_dim}-d")
