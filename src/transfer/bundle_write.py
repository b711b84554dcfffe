"""Writing the bundle format: :func:`new_manifest` (the caller gives the content, this module the
format fields), :func:`write_bundle` (``labels.json``, ``verification.json``,
``calibration.json`` and ``manifest.json`` with every file's SHA-256), :func:`finalize_manifest`
(re-hash after adding a file), :func:`sign_bundle` and :func:`read_checks` (to add a check).

The exporter stages the folder around these (:mod:`transfer.export.bundle_writer`: where a
bundle may go, the atomic swap); everything that opens a bundle goes through
:func:`transfer.bundle.load_bundle`.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .bundle_format import (
    BUNDLE_FORMAT,
    CALIBRATION,
    CALIBRATION_KEYS,
    FORMAT_VERSION,
    LABELS,
    MANIFEST,
    SIGNATURE,
    VERIFICATION,
    file_entry,
    manifest_bytes,
    read_bundle_json,
    verification_summary,
)
from .data.image import PREPROCESSING
from .fsutil import write_json_atomic, write_text_atomic
from .signing import load_signing_key, sign


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
    m["verification"] = verification_summary(checks)
    m["valid"] = bool(checks) and all(v.get("passed") is True for v in checks.values())
    m["labels"] = LABELS
    return finalize_manifest(bundle, m, exclude=exclude, sign_key=sign_key)


def read_checks(path: str | os.PathLike) -> tuple[dict[str, dict], list[str]]:
    """``(checks, images)`` of a bundle's ``verification.json`` (to add a check and rewrite it)."""
    rec = read_bundle_json(Path(path) / VERIFICATION, "the verification record")
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
    _, raw = manifest_bytes(bundle)
    record = sign(raw, key)
    write_text_atomic(bundle / SIGNATURE, json.dumps(record, indent=2) + "\n")
    return record["key_id"]
