"""The bundle format's vocabulary: the names of its files, its format version and limits, which
files a manifest relies on, paths inside a bundle folder and the hashes of its files.

Everything below :mod:`transfer.bundle` (the loader) and :mod:`transfer.bundle_write` (the
writer) shares these: the schema (:mod:`transfer.bundle_schema`), the claims checked against
the files (:mod:`transfer.bundle_claims`) and the exporter's staging
(:mod:`transfer.export.bundle_writer`). No other module spells a bundle's file names.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any

from .errors import BundleError, TamperedBundleError
from .fsutil import JSONLimitError, read_json, sha256_file

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


# ---- paths and files ---------------------------------------------------------------------

def safe_rel(bundle: Path, rel: str) -> Path:
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
    external data, head files, calibration, unknown scores, the maps' weights or graph (sorted, unique)."""
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
    if isinstance(cam, dict):
        refs.update(str(cam[k]) for k in ("weights", "graph") if cam.get(k))
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
        p = safe_rel(bundle, rel)
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
    manifest, its signature and hidden files and folders excluded, as :func:`transfer.bundle_write.finalize_manifest`
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
    """A ``files`` entry of the manifest: ``{"sha256", "bytes"}`` of a file."""
    p = Path(path)
    return {"sha256": sha256_file(p), "bytes": p.stat().st_size}


# ---- reading its files ----------------------------------------------------------------------

def read_bundle_json(path: Path, what: str) -> Any:
    """A JSON file of a bundle, bounded in size and depth (a hostile one is refused, not parsed)."""
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


def manifest_bytes(bundle: Path) -> tuple[Path, bytes]:
    """``(path, bytes)`` of a bundle folder's manifest, read once (bounded): what is parsed, signed
    and digested are the same bytes."""
    mpath = _manifest_path(bundle)
    with open(mpath, "rb") as f:
        raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise TamperedBundleError(f"{mpath} is larger than {MAX_JSON_BYTES:,} bytes; not a bundle's manifest",
                                  hint=REEXPORT)
    return mpath, raw


def verification_summary(checks: dict) -> dict:
    """The manifest's ``verification`` block: each check's plain fields (nested ones stay in the record)."""
    return {k: {kk: vv for kk, vv in v.items() if not isinstance(vv, dict)} for k, v in checks.items()}
