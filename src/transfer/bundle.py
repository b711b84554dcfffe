"""The deployment bundle: a folder with ``manifest.json`` and the files inference needs.

Layout and manifest schema: docs/design.md. This module has no TensorFlow dependency;
the exporter writes bundles with :func:`finalize_manifest`, everything that loads one
goes through :func:`load_bundle`, which refuses tampered or incomplete bundles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
        models = self.models
        if key not in models:
            raise BundleError(
                f"bundle {self.path} has no model {key!r}",
                hint=f"available: {', '.join(sorted(models)) or '(none)'}",
            )
        return models[key]

    def head_entry(self, name: str) -> dict:
        heads = self.heads
        if name not in heads:
            raise BundleError(
                f"bundle {self.path} has no head {name!r}",
                hint=f"available: network{', ' if heads else ''}{', '.join(sorted(heads))}",
            )
        return heads[name]


def _safe_rel(bundle: Path, rel: str) -> Path:
    p = (bundle / rel).resolve()
    root = bundle.resolve()
    if root not in p.parents and p != root:
        raise TamperedBundleError(f"{bundle / MANIFEST}: file entry {rel!r} points outside the bundle")
    return p


def referenced_files(manifest: dict) -> list[str]:
    """Every file the manifest's ``models`` and ``heads`` entries point at (sorted, unique)."""
    refs = set()
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
        raise BundleError(
            f"{mpath}: bundle format version {version!r} is not supported (this transfer reads {FORMAT_VERSION})",
            hint="re-export the bundle with this version of transfer",
        )
    for key in ("class_names", "input", "models", "files", "preprocessing"):
        if key not in manifest:
            raise BundleError(f"{mpath}: manifest has no {key!r}")
    return manifest


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
    if not manifest.get("valid", False) and not allow_invalid:
        raise BundleError(
            f"bundle {bundle} is marked invalid: it failed verification at export",
            hint=f"see {bundle / 'verification.json'}; re-export, or relax the limits of `transfer export`",
        )
    return Bundle(bundle, manifest)


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    return {"sha256": sha256_file(p), "bytes": p.stat().st_size}


def finalize_manifest(path: str | os.PathLike, manifest: dict, *, exclude: tuple[str, ...] = ()) -> dict:
    """Hash every file under ``path`` into ``manifest['files']`` and write manifest.json atomically."""
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
    extra = sorted(
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".") and p.relative_to(bundle).as_posix() not in listed
    )
    return {
        "bundle": str(bundle),
        "valid_at_export": bool(manifest.get("valid", False)),
        "files_checked": len(listed),
        "problems": problems,
        "unlisted_files": extra,
        "ok": not problems and bool(manifest.get("valid", False)),
    }
