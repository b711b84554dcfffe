"""The deployment bundle: a folder with ``manifest.json`` and the files inference needs.

Layout and manifest schema: docs/design.md. This module has no TensorFlow dependency;
the exporter writes bundles with :func:`finalize_manifest`, everything that loads one
goes through :func:`load_bundle`, which refuses tampered or incomplete bundles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import BundleError, TamperedBundleError
from .fsutil import read_json, sha256_file, write_json_atomic

BUNDLE_FORMAT = "transfer-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Bundle:
    """A loaded, hash-checked bundle."""

    path: Path
    manifest: dict

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def input_size(self) -> tuple[int, int]:
        i = self.manifest["input"]
        return int(i["height"]), int(i["width"])

    @property
    def models(self) -> dict[str, dict]:
        return dict(self.manifest.get("models", {}))

    @property
    def heads(self) -> dict[str, dict]:
        return dict(self.manifest.get("heads", {}))

    def file(self, rel: str) -> Path:
        """Absolute path of a file listed in the manifest."""
        if rel not in self.manifest.get("files", {}):
            raise BundleError(f"{self.path}: file {rel!r} is not listed in {MANIFEST}")
        return self.path / rel

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


def _safe_rel(bundle: Path, rel: str) -> Path:
    p = (bundle / rel).resolve()
    root = bundle.resolve()
    if root not in p.parents and p != root:
        raise TamperedBundleError(f"{bundle / MANIFEST}: file entry {rel!r} points outside the bundle")
    return p


def referenced_files(manifest: dict) -> list[str]:
    """Every file the manifest's ``models`` and ``heads`` entries point at (sorted, unique)."""
    refs = {str(manifest["labels"])} if manifest.get("labels") else set()
    for e in manifest.get("models", {}).values():
        if isinstance(e, dict) and e.get("file"):
            refs.add(str(e["file"]))
    for e in manifest.get("heads", {}).values():
        if isinstance(e, dict):
            refs.update(str(e[k]) for k in ("pickle", "onnx") if e.get(k))
    return sorted(refs)


def check_files(path: str | os.PathLike, manifest: dict, *, hashes: bool = True) -> list[dict]:
    """Check every file of ``manifest['files']``; return a list of problems (empty = OK).

    Each problem: ``{"file": rel, "problem": "missing|size|sha256|unlisted", "expected": ..., "found": ...}``;
    ``unlisted``: a model or head file the manifest refers to has no SHA-256 in ``files``.
    """
    bundle = Path(path)
    problems = []
    listed = manifest.get("files", {})
    for rel in referenced_files(manifest):
        if rel not in listed:  # a model or head the manifest points at must be hashed too
            problems.append({"file": rel, "problem": "unlisted"})
    for rel, entry in sorted(listed.items()):
        p = _safe_rel(bundle, rel)
        if not p.is_file():
            problems.append({"file": rel, "problem": "missing"})
            continue
        size = p.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            problems.append({"file": rel, "problem": "size", "expected": entry["bytes"], "found": size})
            continue
        if hashes:
            digest = sha256_file(p)
            if digest != entry.get("sha256"):
                problems.append({"file": rel, "problem": "sha256", "expected": entry.get("sha256"), "found": digest})
    return problems


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and sanity-check ``manifest.json`` (no hashing)."""
    bundle = Path(path)
    if not bundle.exists():
        raise BundleError(f"bundle not found: {bundle}", hint="create one with `transfer export RUN --out BUNDLE`")
    if not bundle.is_dir():
        raise BundleError(f"not a bundle folder: {bundle}")
    mpath = bundle / MANIFEST
    if not mpath.is_file():
        raise BundleError(
            f"{bundle} has no {MANIFEST}; it is not a transfer bundle or its export did not finish",
            hint="re-run `transfer export`",
        )
    try:
        manifest = read_json(mpath)
    except ValueError as exc:
        raise TamperedBundleError(f"{mpath} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{mpath}: not a transfer bundle manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        made_by = (manifest.get("tools") or {}).get("transfer") if isinstance(manifest.get("tools"), dict) else None
        raise BundleError(
            f"{mpath}: bundle format version {version!r} is not supported (this transfer reads {FORMAT_VERSION})",
            hint=(f"the bundle was written by a newer transfer{f' ({made_by})' if made_by else ''}: upgrade transfer"
                  if newer else "re-export the bundle with this version of transfer"),
        )
    _check_schema(manifest, mpath)
    return manifest


def _check_schema(m: dict, mpath: Path) -> None:
    """Refuse a manifest whose fields have the wrong shape (a hand edit, a truncated copy),
    naming the field, instead of failing later with a KeyError or predicting wrong labels."""

    def bad(what: str, hint: str = "re-export the bundle (the manifest is not meant to be edited by hand)"):
        raise TamperedBundleError(f"{mpath}: {what}", hint=hint)

    for key in ("class_names", "input", "models", "files", "preprocessing"):
        if key not in m:
            raise BundleError(f"{mpath}: manifest has no {key!r}", hint="re-export the bundle")
    names = m["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        bad(f"'class_names' must be a non-empty list of names (got {names!r:.80})")
    if len(set(names)) != len(names):
        bad("'class_names' has duplicate names")
    n = m.get("num_classes")
    if n is not None and n != len(names):
        bad(f"'num_classes' is {n!r} but 'class_names' lists {len(names)} names")
    inp = m["input"]
    if not isinstance(inp, dict):
        bad(f"'input' must be an object (got {inp!r:.80})")
    for k in ("height", "width"):
        v = inp.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(f"'input.{k}' must be a positive integer (got {v!r})")
    if inp.get("channels", 3) != 3:
        bad(f"'input.channels' is {inp.get('channels')!r}; bundles take 3-channel RGB")
    for key in ("models", "heads", "files", "preprocessing"):
        if key in m and not isinstance(m[key], dict):
            bad(f"{key!r} must be an object (got {type(m[key]).__name__})")
    if not m["models"]:
        bad("'models' is empty: the bundle has no model to run")
    for group in ("models", "heads"):
        for k, e in (m.get(group) or {}).items():
            if not isinstance(e, dict):
                bad(f"'{group}.{k}' must be an object")
            files = [e.get("file")] if group == "models" else [e.get("onnx"), e.get("pickle")]
            if not any(files) or not all(f is None or isinstance(f, str) for f in files):
                bad(f"'{group}.{k}' names no file")
    for rel, e in m["files"].items():
        if not isinstance(e, dict) or not isinstance(e.get("sha256"), str):
            bad(f"'files.{rel}' has no SHA-256")
    labels = m.get("labels")
    if labels is not None and not isinstance(labels, str):
        bad(f"'labels' must be a file name (got {labels!r:.80})")


def _check_labels(bundle: Path, m: dict) -> None:
    """The hashed label file must list exactly ``class_names`` (an edited manifest would
    otherwise relabel every prediction silently)."""
    rel = m.get("labels")
    if not rel:
        return  # bundles written before labels.json (still hash-checked file by file)
    try:
        labels = read_json(_safe_rel(bundle, rel))
    except (OSError, ValueError) as exc:
        raise TamperedBundleError(f"{bundle / rel}: cannot read the label file: {exc}", hint="re-export the bundle")
    if labels != m["class_names"]:
        raise TamperedBundleError(
            f"{bundle / MANIFEST}: 'class_names' differ from the exported labels in {rel} "
            f"(manifest {m['class_names'][:5]!r}..., exported {labels[:5] if isinstance(labels, list) else labels!r}...)",
            hint="the manifest was edited after export; re-export the bundle (class names come from the data folders)",
        )


def _check_recipe(bundle: Path, m: dict) -> None:
    """The bundle's pixel recipe must be the one this runtime implements (train/serve parity)."""
    from .data.image import PREPROCESSING

    got = m["preprocessing"]
    diff = sorted(k for k in set(PREPROCESSING) | set(got) if got.get(k) != PREPROCESSING.get(k))
    if diff:
        made_by = (m.get("tools") or {}).get("transfer", "another version")
        raise BundleError(
            f"bundle {bundle} was exported with a pixel recipe this runtime does not implement "
            f"(differs in: {', '.join(diff)}); its predictions would not match training",
            hint=f"run it with the transfer that exported it ({made_by}), or re-export it with this one",
        )


def _check_verdict(bundle: Path, m: dict) -> None:
    """A manifest claiming ``valid`` must agree with the hashed verification record."""
    if not m.get("valid") or "verification.json" not in m["files"]:
        return
    try:
        rec = read_json(bundle / "verification.json")
    except (OSError, ValueError):
        return  # its hash was checked already; a missing file is reported by check_files
    failed = [k for k, v in rec.items() if isinstance(v, dict) and v.get("passed") is False]
    if failed:
        raise TamperedBundleError(
            f"bundle {bundle} says it is valid, but its verification record shows {', '.join(failed)} failed",
            hint="the manifest was edited after export; re-export the bundle",
        )


def load_bundle(path: str | os.PathLike, *, verify_hashes: bool = True, allow_invalid: bool = False) -> Bundle:
    """Open a bundle, checking every file against its SHA-256.

    Raises:
        BundleError: no manifest, unsupported version, a missing file, or the bundle is
            marked invalid (failed verification at export; ``allow_invalid`` overrides).
        TamperedBundleError: a file's size or SHA-256 differs from the manifest (names it).
    """
    bundle = Path(path)
    manifest = read_manifest(bundle)
    problems = check_files(bundle, manifest, hashes=verify_hashes)
    if problems:
        first = problems[0]
        names = ", ".join(f"{p['file']} ({p['problem']})" for p in problems)
        cls = BundleError if all(p["problem"] == "missing" for p in problems) else TamperedBundleError
        if any(p["problem"] == "unlisted" for p in problems):
            cls = TamperedBundleError
        raise cls(
            f"bundle {bundle} does not match its manifest: {names}",
            hint="the file was changed or damaged after export; re-export the bundle"
            if first["problem"] != "missing"
            else "copy the whole bundle folder, or re-export it",
        )
    _check_labels(bundle, manifest)
    _check_recipe(bundle, manifest)
    _check_verdict(bundle, manifest)
    if not manifest.get("valid", False) and not allow_invalid:
        raise BundleError(
            f"bundle {bundle} is marked invalid: it failed verification at export",
            hint=f"see {bundle / 'verification.json'}; re-export, or relax the limits of `transfer export`",
        )
    return Bundle(bundle, manifest)


def unlisted_files(path: str | os.PathLike, manifest: dict) -> list[str]:
    """Files under a bundle folder that ``manifest['files']`` does not list (sorted; the
    manifest itself and hidden files and folders excluded, as :func:`finalize_manifest` skips them)."""
    bundle = Path(path)
    listed = manifest.get("files") or {}
    out = []
    for p in bundle.rglob("*"):
        rel = p.relative_to(bundle).as_posix()
        if (p.is_file() and rel != MANIFEST and rel not in listed
                and not any(part.startswith(".") for part in rel.split("/"))):
            out.append(rel)
    return sorted(out)


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    return {"sha256": sha256_file(p), "bytes": p.stat().st_size}


LABELS = "labels.json"
VERIFICATION = "verification.json"


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
    from .data.image import PREPROCESSING

    h, w = (int(v) for v in input_size)
    names = [str(c) for c in class_names]
    manifest = {
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
    return manifest


#: manifest fields :func:`new_manifest` and :func:`write_bundle` own (content cannot set them)
_OWNED = ("format", "format_version", "valid", "created", "labels", "files", "verification", "class_names",
          "input", "num_classes")


def write_bundle(path: str | os.PathLike, manifest: dict, checks: dict[str, dict], *,
                 images: list[str] | None = None, exclude: tuple[str, ...] = ()) -> dict:
    """Finish a bundle folder holding its model and head files: write ``labels.json`` (the
    class names), ``verification.json`` (``images`` and every check) and ``manifest.json``
    with the checks' summary, ``valid`` (every check passed) and the SHA-256 of every file.

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
    m["verification"] = {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)} for k, v in checks.items()}
    m["valid"] = bool(checks) and all(v.get("passed") is True for v in checks.values())
    m["labels"] = LABELS
    return finalize_manifest(bundle, m, exclude=exclude)


def read_checks(path: str | os.PathLike) -> tuple[dict[str, dict], list[str]]:
    """``(checks, images)`` of a bundle's ``verification.json`` (to add a check and rewrite it)."""
    rec = read_json(Path(path) / VERIFICATION)
    images = rec.pop("images", [])
    return rec, images


def finalize_manifest(path: str | os.PathLike, manifest: dict, *, exclude: tuple[str, ...] = ()) -> dict:
    """Hash every file under ``path`` into ``manifest['files']`` and write manifest.json atomically
    (hidden files and ``exclude`` left out). :func:`write_bundle` ends with it."""
    bundle = Path(path)
    files = {}
    for p in sorted(bundle.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            rel = p.relative_to(bundle).as_posix()
            if rel in exclude:
                continue
            files[rel] = file_entry(p)
    manifest = dict(manifest)
    manifest.setdefault("format", BUNDLE_FORMAT)
    manifest.setdefault("format_version", FORMAT_VERSION)
    manifest["files"] = files
    write_json_atomic(bundle / MANIFEST, manifest)
    return manifest


def verify_bundle(path: str | os.PathLike) -> dict:
    """Re-check a bundle later (``transfer verify``): returns a report; never raises for file problems.

    Report: ``{"bundle", "valid_at_export", "files_checked", "problems": [...], "ok": bool}``.
    """
    bundle = Path(path)
    manifest = read_manifest(bundle)
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
        "ok": not problems and bool(manifest.get("valid", False)),
    }
