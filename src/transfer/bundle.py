"""The deployment bundle: a folder with ``manifest.json`` and the files inference needs.

Layout and manifest schema: docs/design.md; what the checks protect against:
docs/security.md. This module has no TensorFlow dependency. The exporter writes bundles
with :func:`new_manifest` and :func:`write_bundle` (the only code that spells the format
fields); everything that loads one goes through :func:`load_bundle`, which refuses a
tampered, incomplete or self-contradicting bundle before anything in it is run:

* the manifest is read with bounded size and depth, and every field it must have is
  there with the right shape (a removed field cannot switch a check off);
* every file it refers to (labels, verification record, models, their external data,
  heads) is listed with its SHA-256, lies inside the bundle and has that hash;
* its claims agree with the hashed files: class names with ``labels.json``, the
  verification summary and ``valid`` with ``verification.json``, the pixel recipe with
  this runtime, and every ONNX model's inputs, outputs and precision with the graph
  itself (:func:`check_model_graph`, run by the runners on the session they open);
* with trust configured (``trust=`` or ``TRANSFER_TRUST``), ``signature.json`` must be a
  valid Ed25519 signature of the manifest by a trusted key (:mod:`transfer.signing`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .unknown_scores import SCORE_ARRAYS, SCORE_PARAMS, SCORES, array_problems
from .data.image import PREPROCESSING, recipe_version
from .errors import BundleError, TamperedBundleError
from .fsutil import JSONLimitError, loads_json, read_json, sha256_file, write_json_atomic, write_text_atomic
from .onnx_facts import PRECISION_KEY, ROLE_KEY, external_data, facts_of_session, graph_precision
from .signing import SignatureError, check_signature, load_signing_key, sign, trust_store

BUNDLE_FORMAT = "transfer-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.json"
VERIFICATION = "verification.json"
SIGNATURE = "signature.json"
#: the calibration and unknown-input records again, hashed (the manifest's copies must equal them)
CALIBRATION = "calibration.json"
CALIBRATION_KEYS = ("calibration", "unknown")

#: limits of the JSON files of a bundle (a manifest is a few KB; hostile ones are refused, not parsed)
MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 16

PRECISIONS = ("fp32", "fp16", "int8")
#: runtime -> the prefix of its models' keys (``onnx-fp32``, ``trt-fp16``)
RUNTIMES = {"onnxruntime": "onnx", "tensorrt": "trt"}

REEXPORT = "re-export the bundle (the manifest is not meant to be edited by hand)"


class UntrustedBundleError(TamperedBundleError):
    """Trust is configured and the bundle is unsigned or signed by a key that is not trusted."""


@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle. ``signer``: the key id of a valid signature (or ``None``);
    ``trusted``: that key is among the trusted keys; ``digest``: the SHA-256 of the exact
    ``manifest.json`` bytes that were checked (the manifest holds every file's hash, so this
    names the whole bundle).

    What the runtime reads is set once, when the bundle is made (:func:`load_bundle` checked
    it before): ``class_names``, ``input_size``, ``feature_dim``, ``recipe`` (the pixel recipe
    the runtime decodes with), the ``models`` and ``heads`` entries, and ``paths`` (every
    listed file's absolute path, inside the bundle). Reading them runs no check again.
    """

    path: Path
    manifest: dict
    signer: str | None = None
    trusted: bool = False
    digest: str | None = None  # SHA-256 (hex) of the manifest bytes that were checked (None: made in code)
    class_names: list[str] = field(init=False, repr=False, compare=False)
    input_size: tuple[int, int] | None = field(init=False, repr=False, compare=False)
    feature_dim: int | None = field(init=False, repr=False, compare=False)
    recipe: dict | None = field(init=False, repr=False, compare=False)
    models: dict[str, dict] = field(init=False, repr=False, compare=False)
    heads: dict[str, dict] = field(init=False, repr=False, compare=False)
    paths: dict[str, Path] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m, put = self.manifest, lambda k, v: object.__setattr__(self, k, v)
        put("path", Path(self.path))
        put("class_names", list(m.get("class_names") or []))
        i = m.get("input") or {}
        put("input_size", (int(i["height"]), int(i["width"])) if "height" in i and "width" in i else None)
        put("feature_dim", int(m["feature_dim"]) if m.get("feature_dim") is not None else None)
        put("recipe", dict(m["preprocessing"]) if isinstance(m.get("preprocessing"), dict) else None)
        put("models", dict(m.get("models") or {}))
        put("heads", dict(m.get("heads") or {}))
        put("paths", {rel: _safe_rel(self.path, rel) for rel in (m.get("files") or {})})

    def file(self, rel: str) -> Path:
        """Absolute path of a file listed in the manifest (:attr:`paths`, or an error naming it)."""
        if rel not in self.paths:
            raise BundleError(f"{self.path}: file {rel!r} is not listed in {MANIFEST}")
        return self.paths[rel]

    def model_entry(self, key: str) -> dict:
        """The ``models`` entry ``key`` (``onnx-fp32``, ``trt-fp16`` ...).

        Raises:
            BundleError: no such model (the hint lists the ones there are).
        """
        return self._entry("models", "model", key, [])

    def head_entry(self, name: str) -> dict:
        """The ``heads`` entry ``name`` (``rf`` ...); ``network`` is not a bundled head."""
        return self._entry("heads", "head", name, ["network"])

    def _entry(self, group: str, what: str, key: str, always: list[str]) -> dict:
        entries = dict(self.manifest.get(group) or {})
        if key not in entries:
            raise BundleError(f"bundle {self.path} has no {what} {key!r}",
                              hint=f"available: {', '.join(always + sorted(entries)) or '(none)'}")
        return entries[key]

    def check_model_graph(self, key: str, session) -> None:
        """See :func:`check_model_graph`."""
        check_model_graph(self, key, session)

    def check_head_graph(self, name: str, session) -> None:
        """See :func:`check_head_graph`."""
        check_head_graph(self, name, session)


# ---- paths and files ---------------------------------------------------------------------

def _safe_rel(bundle: Path, rel: str) -> Path:
    """``bundle/rel`` when ``rel`` is a plain relative path that stays inside the bundle (links
    resolved), else TamperedBundleError."""
    bad = (not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or posixpath.isabs(rel)
           or posixpath.normpath(rel) != rel or rel.split("/")[0] == "..")
    p = (bundle / rel).resolve() if not bad else None
    root = bundle.resolve()
    if bad or (root not in p.parents and p != root):
        raise TamperedBundleError(f"{bundle / MANIFEST}: file entry {rel!r} points outside the bundle",
                                  hint=REEXPORT)
    return p


def referenced_files(manifest: dict) -> list[str]:
    """Every file the manifest relies on: labels, verification record, model files and their
    external data, head files (sorted, unique)."""
    refs = {str(manifest[k]) for k in ("labels",) if manifest.get(k)} | {VERIFICATION}
    for e in (manifest.get("models") or {}).values():
        if isinstance(e, dict):
            refs.update(str(f) for f in [e.get("file"), *(e.get("external_data") or [])] if f)
    for e in (manifest.get("heads") or {}).values():
        if isinstance(e, dict):
            refs.update(str(e[k]) for k in ("pickle", "onnx") if e.get(k))
    if any(k in manifest for k in CALIBRATION_KEYS):
        refs.add(CALIBRATION)
    unknown = manifest.get("unknown")
    if isinstance(unknown, dict) and isinstance(unknown.get("scores"), dict):
        refs.update(str(e["file"]) for e in unknown["scores"].values() if isinstance(e, dict) and e.get("file"))
    cam = manifest.get("cam")
    if isinstance(cam, dict) and cam.get("weights"):
        refs.add(str(cam["weights"]))
    return sorted(refs)


def check_files(path: str | os.PathLike, manifest: dict, *, hashes: bool = True) -> list[dict]:
    """Check every file of ``manifest['files']``; return a list of problems (empty = OK).

    Each problem: ``{"file": rel, "problem": "missing|size|sha256|unlisted", "expected": ..., "found": ...}``;
    ``unlisted``: a file the manifest relies on has no SHA-256 in ``files``.
    """
    bundle = Path(path)
    problems = []
    listed = manifest.get("files", {})
    for rel in referenced_files(manifest):
        if rel not in listed:  # everything the manifest points at must be hashed too
            problems.append({"file": rel, "problem": "unlisted"})
    for rel, entry in sorted(listed.items()):
        p = _safe_rel(bundle, rel)
        if not p.is_file():
            problems.append({"file": rel, "problem": "missing"})
            continue
        size = p.stat().st_size
        if size != entry["bytes"]:
            problems.append({"file": rel, "problem": "size", "expected": entry["bytes"], "found": size})
            continue
        if hashes:
            digest = sha256_file(p)
            if digest != entry["sha256"]:
                problems.append({"file": rel, "problem": "sha256", "expected": entry["sha256"], "found": digest})
    return problems


def unlisted_files(path: str | os.PathLike, manifest: dict) -> list[str]:
    """Files under a bundle folder that ``manifest['files']`` does not list (sorted; the
    manifest, its signature and hidden files and folders excluded, as :func:`finalize_manifest`
    skips them)."""
    bundle = Path(path)
    listed = manifest.get("files") or {}
    out = []
    for p in bundle.rglob("*"):
        rel = p.relative_to(bundle).as_posix()
        if (p.is_file() and rel not in (MANIFEST, SIGNATURE) and rel not in listed
                and not any(part.startswith(".") for part in rel.split("/"))):
            out.append(rel)
    return sorted(out)


def hidden_entries(path: str | os.PathLike) -> list[str]:
    """Hidden files and folders at the top of a bundle folder (``.git``, ``.DS_Store``): never
    part of a bundle, never deleted by an export that replaces it."""
    return sorted(p.name for p in Path(path).iterdir() if p.name.startswith("."))


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    return {"sha256": sha256_file(p), "bytes": p.stat().st_size}


# ---- reading the manifest ----------------------------------------------------------------

def _read_json_file(path: Path, what: str) -> Any:
    try:
        return read_json(path, max_depth=MAX_JSON_DEPTH, max_bytes=MAX_JSON_BYTES)
    except JSONLimitError as exc:
        raise TamperedBundleError(f"{path}: {what} is not a bundle's: {exc}", hint=REEXPORT) from None
    except ValueError as exc:
        raise TamperedBundleError(f"{path} is not valid JSON: {exc}", hint=REEXPORT) from None


def _manifest_path(bundle: Path) -> Path:
    if not bundle.exists():
        raise BundleError(f"bundle not found: {bundle}", hint="create one with `transfer export RUN --out BUNDLE`")
    mpath = bundle / MANIFEST
    if not bundle.is_dir() or not mpath.is_file():
        raise BundleError(
            f"{bundle} is not a bundle folder: it has no {MANIFEST}"
            + ("" if bundle.is_dir() else " (it is a file)") + ", or its export did not finish",
            hint="give the folder `transfer export` wrote; re-run `transfer export` if it was interrupted",
        )
    return mpath


def _manifest_bytes(bundle: Path) -> tuple[Path, bytes]:
    mpath = _manifest_path(bundle)
    with open(mpath, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise TamperedBundleError(f"{mpath} is larger than {MAX_JSON_BYTES:,} bytes; not a bundle's manifest",
                                  hint=REEXPORT)
    return mpath, raw


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


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and check ``manifest.json`` (bounded, complete schema; no hashing)."""
    mpath, raw = _manifest_bytes(Path(path))
    return parse_manifest(raw, mpath)


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


# ---- the claims against the files ---------------------------------------------------------

def _check_labels(bundle: Path, m: dict) -> None:
    """The hashed label file must list exactly ``class_names`` (an edited manifest would
    otherwise relabel every prediction silently)."""
    rel = m["labels"]
    labels = _read_json_file(_safe_rel(bundle, rel), "the label file")
    if labels != m["class_names"]:
        shown = labels[:5] if isinstance(labels, list) else labels
        raise TamperedBundleError(
            f"{bundle / MANIFEST}: 'class_names' differ from the exported labels in {rel} "
            f"(manifest {m['class_names'][:5]!r}..., exported {shown!r:.80}...)",
            hint="the manifest was edited after export; re-export the bundle (class names come from the data folders)",
        )


def _check_recipe(bundle: Path, m: dict) -> None:
    """The bundle's pixel recipe must be one this runtime implements (train/serve parity): the
    runtime decodes the bundle's images with the recipe it records, old versions included."""
    try:
        recipe_version(m["preprocessing"])
    except ValueError as exc:
        tools = m.get("tools")
        made_by = tools.get("transfer", "another version") if isinstance(tools, dict) else "another version"
        raise BundleError(
            f"bundle {bundle} was exported with a {exc}; its predictions would not match training",
            hint=f"run it with the transfer that exported it ({made_by}), or re-export it with this one",
        ) from None


def _summary(checks: dict) -> dict:
    """The manifest's ``verification`` block: each check's plain fields (nested ones stay in the record)."""
    return {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)} for k, v in checks.items()}


def _check_verdict(bundle: Path, m: dict) -> None:
    """The manifest's ``verification`` block must be the summary of the hashed
    ``verification.json``, every model and head must have a check, and ``valid: true`` needs
    every check passed."""
    rec = _read_json_file(bundle / VERIFICATION, "the verification record")
    if not isinstance(rec, dict) or not all(isinstance(v, dict) and isinstance(v.get("passed"), bool)
                                            for k, v in rec.items() if k != "images"):
        raise TamperedBundleError(f"{bundle / VERIFICATION} is not a verification record", hint=REEXPORT)
    checks = {k: v for k, v in rec.items() if k != "images"}
    summary = _summary(checks)

    def same(a, b) -> bool:  # as JSON text: a NaN difference equals itself
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    if not same(summary, m["verification"]):
        differ = sorted(k for k in set(checks) | set(m["verification"])
                        if not same(summary.get(k), m["verification"].get(k)))
        raise TamperedBundleError(
            f"bundle {bundle}: the manifest's verification summary does not match {VERIFICATION} "
            f"(differs in: {', '.join(differ)})",
            hint="the manifest was edited after export; re-export the bundle")
    needed = [*m["models"], *(f"head-{h}" for h in m["heads"])]
    unchecked = [k for k in needed if k not in checks]
    if unchecked:
        raise TamperedBundleError(f"bundle {bundle}: {', '.join(unchecked)} ha{'s' if len(unchecked) == 1 else 've'} "
                                  f"no verification in {VERIFICATION}; an unverified model is never loaded",
                                  hint="the manifest was edited after export; re-export the bundle")
    failed = [k for k, v in checks.items() if v["passed"] is False]
    if m["valid"] and failed:
        raise TamperedBundleError(
            f"bundle {bundle} says it is valid, but its verification record shows {', '.join(failed)} failed",
            hint="the manifest was edited after export; re-export the bundle",
        )


def _check_calibration(bundle: Path, m: dict) -> None:
    """The manifest's calibration and unknown-input records must be the hashed ``calibration.json``
    (an edited threshold would otherwise change which images are called unknown)."""
    present = {k: m[k] for k in CALIBRATION_KEYS if k in m}
    if not present and CALIBRATION not in m["files"]:
        return
    rec = _read_json_file(bundle / CALIBRATION, "the calibration record")
    if json.dumps(rec, sort_keys=True) != json.dumps(present, sort_keys=True):
        differ = [k for k in CALIBRATION_KEYS if json.dumps((rec or {}).get(k), sort_keys=True)
                  != json.dumps(present.get(k), sort_keys=True)]
        raise TamperedBundleError(
            f"bundle {bundle}: the manifest's {' and '.join(differ) or 'calibration'} record does not match "
            f"{CALIBRATION}", hint="the manifest was edited after export; re-export the bundle")


def _npz_headers(path: Path) -> dict[str, tuple[tuple, str]]:
    """``{array name: (shape, dtype kind)}`` of an ``.npz`` read from its headers only (no array
    data, nothing unpickled).

    Raises:
        ValueError: not a zip of ``.npy`` members, or a member whose header cannot be read.
    """
    import zipfile

    import numpy as np

    out = {}
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(str(exc)) from None
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy") or "/" in info.filename:
                raise ValueError(f"member {info.filename!r} is not a top-level .npy array")
            with zf.open(info) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            out[info.filename[:-4]] = (tuple(int(d) for d in shape), dtype.kind)
    return out


def _check_unknown_arrays(bundle: Path, m: dict) -> None:
    """The hashed parameter file of the unknown-input scores must hold the arrays the offered
    scores need, floating point (an object array would be a pickle), shaped for the bundle's
    feature width and classes, and a kNN bank with at least ``k`` rows -- read from the array
    headers, before any score is computed."""
    unk = m.get("unknown")
    if not isinstance(unk, dict) or not unk.get("scores"):
        return
    by_file: dict[str, list[str]] = {}
    for name, e in unk["scores"].items():
        if SCORE_ARRAYS[name]:
            by_file.setdefault(e["file"], []).append(name)
    for rel, names in by_file.items():
        path = _safe_rel(bundle, rel)
        try:
            headers = _npz_headers(path)
        except (OSError, ValueError, EOFError) as exc:
            raise TamperedBundleError(f"{path}: not the unknown-input parameters of a bundle ({exc})",
                                      hint=REEXPORT) from None
        needed = sorted({a for n in names for a in SCORE_ARRAYS[n]})
        problems = array_problems(headers, feature_dim=m["feature_dim"], num_classes=len(m["class_names"]),
                                  needed=needed)
        if "knn" in names and "bank" in headers and unk["scores"]["knn"]["k"] > headers["bank"][0][0]:
            problems.append(f"kNN k = {unk['scores']['knn']['k']} but the bank holds {headers['bank'][0][0]} rows")
        if problems:
            raise TamperedBundleError(f"{path} does not fit its manifest: {'; '.join(problems)}", hint=REEXPORT)


def _check_cam(bundle: Path, m: dict) -> None:
    """The class-activation-map record (``cam``, :mod:`transfer.export.cam_export`): either
    ``available: false`` with a reason, or a layer, a feature-map shape (h, w, K), models that
    exist, and a hashed weights file holding only ``kernel`` float (K, classes) -- read from its
    array header, nothing unpickled."""
    cam = m.get("cam")
    if cam is None:
        return
    where = f"{bundle / MANIFEST}: 'cam'"
    if not isinstance(cam, dict) or not isinstance(cam.get("available"), bool):
        raise TamperedBundleError(f"{where} must be an object with available: true|false", hint=REEXPORT)
    if not cam["available"]:
        if not isinstance(cam.get("reason"), str) or not cam["reason"]:
            raise TamperedBundleError(f"{where} says no maps but gives no reason", hint=REEXPORT)
        return
    shape, models = cam.get("shape"), cam.get("models")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise TamperedBundleError(f"{where}.shape must be [h, w, channels], got {shape!r:.80}", hint=REEXPORT)
    if not isinstance(models, list) or not models or any(k not in m["models"] for k in models):
        raise TamperedBundleError(f"{where}.models must name models of the bundle, got {models!r:.80}", hint=REEXPORT)
    if not isinstance(cam.get("layer"), str) or cam.get("output") != "feature_map":
        raise TamperedBundleError(f"{where} needs its layer and output 'feature_map'", hint=REEXPORT)
    path = _safe_rel(bundle, str(cam.get("weights")))
    try:
        headers = _npz_headers(path)
    except (OSError, ValueError, EOFError) as exc:
        raise TamperedBundleError(f"{path}: not the class weights of a bundle's maps ({exc})", hint=REEXPORT) from None
    want = (shape[2], len(m["class_names"]))
    if set(headers) != {"kernel"} or headers["kernel"][1] != "f" or headers["kernel"][0] != want:
        got = ", ".join(f"{k} {v[0]} kind {v[1]!r}" for k, v in headers.items()) or "nothing"
        raise TamperedBundleError(f"{path} does not fit its manifest: it holds {got}, the maps need kernel {want} "
                                  "float", hint=REEXPORT)


def _check_external_data(bundle: Path, m: dict) -> None:
    """Weights in external files: each must be declared by its model's entry (and so listed and
    hashed) and lie inside the bundle; heads have none."""
    onnx_files = [(f"models.{k}", e["file"], e.get("external_data", [])) for k, e in m["models"].items()
                  if e.get("runtime", "onnxruntime") == "onnxruntime"]
    onnx_files += [(f"heads.{k}", e["onnx"], []) for k, e in m["heads"].items() if e.get("onnx")]
    for where, rel, declared in onnx_files:
        refs = external_data(_safe_rel(bundle, rel))
        if refs is None:
            raise TamperedBundleError(
                f"{bundle / rel} refers to external data this runtime cannot list without the onnx package",
                hint="pip install onnx to check it, or re-export the bundle (transfer writes no external data)")
        for ref in refs:
            target = posixpath.normpath(posixpath.join(posixpath.dirname(rel), ref.replace("\\", "/")))
            if posixpath.isabs(ref) or target.split("/")[0] == ".." or "\\" in ref:
                raise TamperedBundleError(f"{bundle / rel} loads weights from {ref!r}, outside the bundle; refusing "
                                          "to load it", hint="re-export the bundle")
            if target not in declared:
                raise TamperedBundleError(
                    f"{bundle / rel} loads weights from {target}, which its manifest entry {where} does not "
                    "declare (so nothing checks their hash)", hint="re-export the bundle")


def _check_signature(bundle: Path, raw: bytes, trust) -> tuple[str | None, bool]:
    """``(signer key id or None, trusted)``; refuses a signature that does not verify, and with
    trust configured an unsigned bundle or a signer that is not trusted."""
    store = trust_store(trust)
    sig = bundle / SIGNATURE
    signer, raw_key = None, None
    if sig.is_file():
        record = _read_json_file(sig, "the signature")
        try:
            signer = check_signature(record, raw)
        except SignatureError as exc:
            raise TamperedBundleError(f"bundle {bundle}: {SIGNATURE} does not verify: {exc}",
                                      hint="the manifest or the signature was changed after signing; "
                                           "re-export (and sign) the bundle") from None
        import base64

        raw_key = base64.b64decode(record["public_key"])
    if store is None:
        return signer, False
    trusted = signer is not None and store.keys.get(signer) == raw_key
    if not trusted:
        why = "it is not signed" if signer is None else f"it is signed by {signer}, which is not a trusted key"
        raise UntrustedBundleError(
            f"bundle {bundle} is refused: {why} ({store.describe()})",
            hint="sign it with a trusted key (`transfer sign BUNDLE --key KEY` or `transfer export RUN --sign KEY`), "
                 "or trust the key it was signed with")
    return signer, True


def load_bundle(path: str | os.PathLike, *, verify_hashes: bool = True, allow_invalid: bool = False,
                trust=None) -> Bundle:
    """Open a bundle, checking every file against its SHA-256 and the manifest against the files.

    Args:
        path: the bundle folder.
        verify_hashes: hash every file (``False``: sizes only, after a caller hashed them).
        allow_invalid: open a bundle that failed verification at export (``transfer verify``).
        trust: trusted public keys (a ``.pub`` file, a folder of them, a list,
            :class:`transfer.signing.TrustStore`); ``None``: ``TRANSFER_TRUST`` if set, else no
            signature is required; ``False``: none required whatever the environment says.
            With trust, only a bundle signed by a trusted key loads, and its pickled heads
            may be unpickled (:attr:`Bundle.trusted`).

    Raises:
        BundleError: no manifest, unsupported version, a missing file, or the bundle is
            marked invalid (failed verification at export; ``allow_invalid`` overrides).
        TamperedBundleError: a file's size or SHA-256 differs from the manifest (names it),
            a required field is missing, or the manifest contradicts its files.
        UntrustedBundleError: trust is configured and the bundle is not signed by a trusted key.
    """
    bundle = Path(path)
    mpath, raw = _manifest_bytes(bundle)
    signer, trusted = _check_signature(bundle, raw, trust)
    manifest = parse_manifest(raw, mpath)
    problems = check_files(bundle, manifest, hashes=verify_hashes)
    if problems:
        first = problems[0]
        names = ", ".join(f"{p['file']} ({p['problem']})" for p in problems)
        cls = BundleError if all(p["problem"] == "missing" for p in problems) else TamperedBundleError
        raise cls(
            f"bundle {bundle} does not match its manifest: {names}",
            hint="the file was changed or damaged after export; re-export the bundle"
            if first["problem"] != "missing"
            else "copy the whole bundle folder, or re-export it",
        )
    _check_labels(bundle, manifest)
    _check_recipe(bundle, manifest)
    _check_verdict(bundle, manifest)
    _check_calibration(bundle, manifest)
    _check_unknown_arrays(bundle, manifest)
    _check_cam(bundle, manifest)
    _check_external_data(bundle, manifest)
    if not manifest["valid"] and not allow_invalid:
        raise BundleError(
            f"bundle {bundle} is marked invalid: it failed verification at export",
            hint=f"see {bundle / VERIFICATION}; re-export, or relax the limits of `transfer export`",
        )
    return Bundle(bundle, manifest, signer, trusted, hashlib.sha256(raw).hexdigest())


# ---- the claims against the ONNX graphs ---------------------------------------------------

def _dims(shape: tuple, expected: tuple) -> bool:
    """``expected`` = (None, d1, d2, ...): the batch dimension must be dynamic; the others must
    equal the manifest's (a dimension the graph leaves open does not contradict it)."""
    return (len(shape) == len(expected) and shape[0] is None
            and all(d is None or d == e for d, e in zip(shape[1:], expected[1:])))


def _show(t) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in t.shape) + f") {t.type}"


def _graph_problems(facts, wants: list[tuple[str, str, tuple]]) -> list[str]:
    problems = []
    for kind, name, expected in wants:
        t = facts.input(name) if kind == "input" else facts.output(name)
        want = "(" + ", ".join("N" if e is None else str(e) for e in expected) + ") tensor(float)"
        if t is None:
            problems.append(f"has no {kind} {name!r} (the manifest expects {want})")
        elif t.type != "tensor(float)" or not _dims(t.shape, expected):
            problems.append(f"{kind} {name!r} is {_show(t)}, the manifest says {want}")
    return problems


def _refuse_graph(bundle: Bundle, rel: str, problems: list[str]) -> None:
    if problems:
        raise TamperedBundleError(f"{bundle.path / rel} does not match its manifest entry: {'; '.join(problems)}",
                                  hint="the manifest was edited or the file swapped after export; re-export the bundle")


def check_model_graph(bundle: Bundle, key: str, session) -> None:
    """The ONNX model ``key`` must take ``image`` (N, H, W, 3) float32 at the manifest's input
    size and give ``features`` (N, feature_dim) and ``probs`` (N, classes), and be of the
    declared precision (the ``transfer.precision`` the exporter stamped into it, or its
    graph's quantize nodes when ``onnx`` is installed). ``session``: an open ONNX Runtime
    session of the file (the one that will run it; sessions are made by
    :mod:`transfer.runtime.sessions`). TensorRT engines are checked by their runner.

    Raises:
        TamperedBundleError: naming what differs.
    """
    e = bundle.model_entry(key)
    if e.get("runtime", "onnxruntime") != "onnxruntime":
        return
    facts = facts_of_session(session)
    h, w = bundle.input_size
    wants = [("input", "image", (None, h, w, 3)), ("output", "features", (None, bundle.feature_dim)),
             ("output", "probs", (None, len(bundle.class_names)))]
    cam = bundle.manifest.get("cam") or {}
    if cam.get("available") and key in cam.get("models", []):  # the maps' feature map, as recorded
        wants.append(("output", "feature_map", (None, *cam["shape"])))
    problems = _graph_problems(facts, wants)
    if facts.metadata.get(ROLE_KEY, "model") != "model":
        problems.append(f"it is a {facts.metadata[ROLE_KEY]}, not a model")
    precision = facts.metadata.get(PRECISION_KEY) or graph_precision(bundle.file(e["file"]))
    if precision is None:
        problems.append("its precision cannot be read (no transfer.precision in it, and the onnx package is not "
                        "installed to read its graph)")
    elif precision != e["precision"]:
        problems.append(f"it is a {precision} model, the manifest says {e['precision']}")
    _refuse_graph(bundle, e["file"], problems)


def check_head_graph(bundle: Bundle, name: str, session) -> None:
    """The ONNX head ``name`` must take its input (N, feature_dim) float32 and give its output
    (N, classes) float32. ``session``: an open ONNX Runtime session of its file.

    Raises:
        TamperedBundleError: naming what differs.
    """
    e = bundle.head_entry(name)
    if not e.get("onnx"):
        return
    facts = facts_of_session(session)
    problems = _graph_problems(facts, [("input", e.get("input", "features"), (None, bundle.feature_dim)),
                                       ("output", e.get("output", "probabilities"),
                                        (None, len(bundle.class_names)))])
    if facts.metadata.get(ROLE_KEY, "head") != "head":
        problems.append(f"it is a {facts.metadata[ROLE_KEY]}, not a head")
    _refuse_graph(bundle, e["onnx"], problems)


def check_graphs(bundle: Bundle, open_session) -> list[dict]:
    """Every ONNX model and head against its manifest entry (``transfer verify``); problems as
    ``{"file", "problem"}``, empty when all agree. ``open_session(path)``: a session that can
    read a file's inputs, outputs and metadata
    (:func:`transfer.runtime.sessions.light_session`)."""
    problems = []
    checks = [(e["file"], check_model_graph, k) for k, e in sorted(bundle.models.items())
              if e.get("runtime", "onnxruntime") == "onnxruntime"]
    checks += [(e["onnx"], check_head_graph, k) for k, e in sorted(bundle.heads.items()) if e.get("onnx")]
    for rel, check, key in checks:
        try:
            check(bundle, key, open_session(bundle.file(rel)))
        except TamperedBundleError as exc:
            problems.append({"file": rel, "problem": exc.message})
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime cannot open it: that is the finding
            problems.append({"file": rel, "problem": f"ONNX Runtime cannot open it: {type(exc).__name__}: {exc}"})
    return problems


# ---- writing -------------------------------------------------------------------------------

def new_manifest(*, class_names, input_size: tuple[int, int], feature_dim: int, models: dict,
                 heads: dict | None = None, preprocessing: dict | None = None, **content) -> dict:
    """A manifest for :func:`write_bundle`: the caller gives the content (class names, input
    size, feature width, model and head entries, and informational fields such as
    ``tools``, ``source``, ``backbone``, ``opset``); this module owns the format fields
    (``format``, ``format_version``, ``created``, ``labels``, ``files``, ``valid``,
    ``verification``) and the input block's fixed recipe (RGB float32 NHWC 0..255).

    Example::

        m = new_manifest(class_names=["cat", "dog"], input_size=(224, 224), feature_dim=1280,
                         models={"onnx-fp32": {"file": "model.onnx", "precision": "fp32",
                                               "runtime": "onnxruntime"}},
                         tools=tool_versions(), source={"run": "/runs/cd", "trial": "xception-t030"})
        write_bundle("bundle/", m, {"onnx-fp32": check})
    """
    h, w = (int(v) for v in input_size)
    names = [str(c) for c in class_names]
    return {
        "format": BUNDLE_FORMAT, "format_version": FORMAT_VERSION, "valid": False,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **{k: v for k, v in content.items() if k not in _OWNED},
        "class_names": names, "labels": LABELS,
        "input": {"name": "image", "height": h, "width": w, "channels": 3, "color": "RGB", "dtype": "float32",
                  "range": [0, 255], "layout": "NHWC"},
        "preprocessing": dict(preprocessing if preprocessing is not None else PREPROCESSING),
        "feature_dim": int(feature_dim), "num_classes": len(names),
        "models": dict(models), "heads": dict(heads or {}),
        "default_head": content.get("default_head", "network"),
        "files": {}, "verification": {},
    }


#: manifest fields :func:`new_manifest` and :func:`write_bundle` own (content cannot set them)
_OWNED = ("format", "format_version", "valid", "created", "labels", "files", "verification", "class_names",
          "input", "num_classes")


def write_bundle(path: str | os.PathLike, manifest: dict, checks: dict[str, dict], *,
                 images: list[str] | None = None, exclude: tuple[str, ...] = (), sign_key=None) -> dict:
    """Finish a bundle folder holding its model and head files: write ``labels.json`` (the
    class names), ``verification.json`` (``images`` and every check) and ``manifest.json``
    with the checks' summary, ``valid`` (every check passed) and the SHA-256 of every file;
    with ``sign_key`` (:func:`transfer.signing.load_signing_key`) also ``signature.json``.

    ``checks`` maps a model key or ``head-<name>`` to its verification (a dict with
    ``passed``; nested dicts stay in verification.json only). Call it again after adding a
    model (a TensorRT engine) with the updated checks. ``exclude``: files of the folder that
    are not part of the bundle (left unlisted).

    Returns:
        the manifest as written.
    """
    bundle = Path(path)
    m = dict(manifest)
    write_json_atomic(bundle / LABELS, list(m["class_names"]))
    write_json_atomic(bundle / VERIFICATION, {"images": list(images or []), **checks})
    records = {k: m[k] for k in CALIBRATION_KEYS if k in m}
    if records:
        write_json_atomic(bundle / CALIBRATION, records)
    m["verification"] = _summary(checks)
    m["valid"] = bool(checks) and all(v.get("passed") is True for v in checks.values())
    m["labels"] = LABELS
    return finalize_manifest(bundle, m, exclude=exclude, sign_key=sign_key)


def read_checks(path: str | os.PathLike) -> tuple[dict[str, dict], list[str]]:
    """``(checks, images)`` of a bundle's ``verification.json`` (to add a check and rewrite it)."""
    rec = _read_json_file(Path(path) / VERIFICATION, "the verification record")
    images = rec.pop("images", [])
    return rec, images


def finalize_manifest(path: str | os.PathLike, manifest: dict, *, exclude: tuple[str, ...] = (),
                      sign_key=None) -> dict:
    """Hash every file under ``path`` into ``manifest['files']`` and write manifest.json atomically
    (hidden files, the signature and ``exclude`` left out); sign it with ``sign_key``, else
    remove a signature the new manifest would not match. :func:`write_bundle` ends with it."""
    bundle = Path(path)
    files = {}
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        if p.is_file() and rel not in (MANIFEST, SIGNATURE) and not any(s.startswith(".") for s in rel.split("/")):
            if rel in exclude:
                continue
            files[rel] = file_entry(p)
    manifest = dict(manifest)
    manifest.setdefault("format", BUNDLE_FORMAT)
    manifest.setdefault("format_version", FORMAT_VERSION)
    manifest["files"] = files
    write_json_atomic(bundle / MANIFEST, manifest)
    if sign_key is not None:
        sign_bundle(bundle, sign_key)
    else:
        (bundle / SIGNATURE).unlink(missing_ok=True)
    return manifest


def sign_bundle(path: str | os.PathLike, key) -> str:
    """Write ``signature.json``: ``key`` (a path or :class:`transfer.signing.SigningKey`) signs the
    exact bytes of ``manifest.json``. Returns the key id. Sign only a bundle you checked
    (``transfer sign`` loads it first)."""
    bundle = Path(path)
    if not hasattr(key, "private"):
        key = load_signing_key(key)
    _, raw = _manifest_bytes(bundle)
    record = sign(raw, key)
    write_text_atomic(bundle / SIGNATURE, json.dumps(record, indent=2) + "\n")
    return record["key_id"]


# ---- transfer verify -----------------------------------------------------------------------

def verify_bundle(path: str | os.PathLike, *, trust=None) -> dict:
    """Re-check a bundle later (``transfer verify``): returns a report; never raises for file problems.

    Report: ``{"bundle", "valid_at_export", "files_checked", "problems": [...], "unlisted_files",
    "signer", "ok"}``.

    Raises:
        BundleError / TamperedBundleError: no bundle, a manifest of the wrong shape, a
            signature that does not verify, or (with trust) an untrusted one.
    """
    bundle = Path(path)
    mpath, raw = _manifest_bytes(bundle)
    signer, trusted = _check_signature(bundle, raw, trust)
    manifest = parse_manifest(raw, mpath)
    problems = check_files(bundle, manifest, hashes=True)
    listed = set(manifest.get("files", {}))
    reported = {p["file"] for p in problems}
    extra = [rel for rel in unlisted_files(bundle, manifest) if rel not in reported]
    return {
        "bundle": str(bundle),
        "valid_at_export": bool(manifest.get("valid", False)),
        "files_checked": len(listed),
        "problems": problems,
        "unlisted_files": extra,
        "signer": signer,
        "trusted": trusted,
        "ok": not problems and bool(manifest.get("valid", False)),
    }
