"""The audit's model conversions and Keras references, kept by content.

Every audit has a child process (:mod:`transfer.analysis.audit_model`; or, asked to, a thread of its
own process) import TensorFlow, convert its models with tf2onnx and compute Keras's features of
the first audited images: about 5 s of CPU for a small arc2 (4.5 s of it importing TensorFlow),
more for a large backbone. Auditing the
same model again -- after fixing the data, into another ``--out``, with ``--force`` -- repeats
exactly that work, so its results are kept, one folder per model:

    <root>/audit-onnx/<model key>/model.onnx          the conversion
    <root>/audit-onnx/<model key>/model.json          {"format", "key", "model", "onnx_sha256", "dim", "classes"}
    <root>/audit-onnx/<model key>/parity-<key>.npz    Keras's features and softmax of the parity images
    <root>/audit-onnx/<model key>/parity-<key>.json   {"format", "key", "npz_sha256", "images"}

``root`` is ``RUN/cache`` for a run's models (gone with the run) and the user cache
(:func:`transfer.fsutil.user_cache_dir`) for a chosen backbone. The **model key** is the SHA-256 of
what makes the model and its conversion: a run's trial by the SHA-256 of its ``model.keras`` (and
of the initial weights file for its initial weights), a backbone by name, weights (a file by its
SHA-256) and input size; plus the versions of TensorFlow, Keras, tf2onnx and onnx and the SHA-256
of this package's own source (any change to the code is another key). A **reference key** adds
the SHA-256 of each parity image, in order, the input size and the pixel recipe: the cached Keras
features are those of the pixels the model's loader makes of exactly those files, so the parity
check (ONNX Runtime's features of the pass's pixels against them) keeps its meaning. A model whose
conversion is kept but not the reference of these images still needs the child (it imports
TensorFlow for Keras) or the thread, which then only computes the reference.

Each file is written under a temporary name and renamed into place; the JSON, written last,
records the SHA-256 of the file it describes, and a reader checks it on a copy before using it:
an entry with a missing, cut short or changed file is never used (the audit says so, converts
again and replaces it). At most :data:`KEEP_MODELS` models per root and :data:`KEEP_REFERENCES`
references per model are kept; the least recently used go first. Nothing here imports TensorFlow.

Example::

    entry = CacheEntry.of(model_spec, digests, (28, 28), recipe)
    info, why = entry.conversion(tmp / "source.onnx")   # ({"dim": 64, "classes": 10}, "") on a hit
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..fsutil import atomic_path, json_sha256, read_json, sha256_file, user_cache_dir, write_json_atomic
from ..runfolder import RunLayout
from .audit_model import initial_weights_path
from .features import open_run, resolve_trial

_log = logging.getLogger(__name__)

#: the layout of an entry (another number: the entries of other versions are not read)
FORMAT = 1
#: models kept per cache root (their ONNX files), least recently used removed first
KEEP_MODELS = 16
#: Keras references kept per model (one per set of parity images)
KEEP_REFERENCES = 8
#: the distributions whose versions are part of the model key
VERSIONED = ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx")


@lru_cache(maxsize=1)
def code_identity() -> dict:
    """The versions of the converting libraries and the SHA-256 of this package's source files."""
    from importlib import metadata

    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return {"versions": versions, "source_sha256": h.hexdigest()}


def model_identity(spec: dict) -> dict:
    """What makes the model of ``spec`` (see :func:`transfer.analysis.audit_model.load_source_model`):
    a run's trial by the SHA-256 of its files, a backbone by name, weights and input size.

    Raises:
        RunFolderError: the run or its files cannot be read (the child would fail alike).
    """
    if spec.get("run") is not None:
        run = open_run(spec["run"])
        trial = resolve_trial(run, spec.get("trial", "best"))
        ident = {"model_sha256": sha256_file(trial.model_path)}
        if spec.get("initial"):
            ident["initial_sha256"] = sha256_file(initial_weights_path(run, trial))
        return ident
    weights = spec.get("weights") or "imagenet"
    if Path(weights).is_file():
        weights = {"sha256": sha256_file(weights)}
    return {"backbone": spec["backbone"], "weights": weights, "image_size": int(spec["image_size"])}


def cache_root(spec: dict) -> Path:
    """Where the entries of ``spec``'s model go: ``RUN/cache/audit-onnx`` or the user cache's ``audit-onnx``."""
    if spec.get("run") is not None:
        return RunLayout(spec["run"]).audit_cache_dir
    return user_cache_dir() / "audit-onnx"


class CacheEntry:
    """One model's folder in the cache and the reference of one set of parity images in it."""

    def __init__(self, folder: Path, key: str, model: dict, images: list[str], reference_key: str):
        self.folder, self.key, self.model, self.images = folder, key, model, images
        self.reference_key = reference_key

    @classmethod
    def of(cls, spec: dict, digests: list[str], size, recipe: dict | None) -> CacheEntry:
        """The entry of the model ``spec`` names, for parity images with SHA-256 ``digests``
        decoded at ``size`` with ``recipe``."""
        model = model_identity(spec)
        key = json_sha256({"format": FORMAT, "model": model, "code": code_identity()})
        ref = json_sha256({"format": FORMAT, "model": key, "images": list(digests), "size": [int(v) for v in size],
                       "recipe": recipe})
        return cls(cache_root(spec) / key, key, model, list(digests), ref)

    model_json = property(lambda self: self.folder / "model.json")
    model_onnx = property(lambda self: self.folder / "model.onnx")
    reference_json = property(lambda self: self.folder / f"parity-{self.reference_key[:32]}.json")
    reference_npz = property(lambda self: self.folder / f"parity-{self.reference_key[:32]}.npz")

    def conversion(self, dest: Path) -> tuple[dict | None, str]:
        """Copy the kept conversion to ``dest`` and check the copy: ``({"dim", "classes"}, "")``, or
        ``(None, why)`` -- ``why`` is empty when there is none, else says what is wrong with it."""
        if not self.model_json.is_file():
            return None, ""
        try:
            meta = read_json(self.model_json, max_bytes=1 << 20)
            if meta.get("format") != FORMAT or meta.get("key") != self.key:
                return None, f"{self.model_json} belongs to another entry"
            shutil.copyfile(self.model_onnx, dest)
            got = sha256_file(dest)
            if got != meta.get("onnx_sha256"):
                return None, f"{self.model_onnx} is not the file that was kept (SHA-256 {got[:12]}...)"
            info = {"dim": int(meta["dim"]), "classes": int(meta["classes"])}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"{self.folder} cannot be read ({type(exc).__name__}: {exc})"
        _touch(self.model_json)
        return info, ""

    def reference(self) -> tuple[dict | None, str]:
        """The kept Keras reference of these parity images, ``({"features", "probs"}, "")``, or
        ``(None, why)`` as :meth:`conversion`."""
        if not self.reference_json.is_file():
            return None, ""
        try:
            meta = read_json(self.reference_json, max_bytes=1 << 20)
            if meta.get("format") != FORMAT or meta.get("key") != self.reference_key or meta.get("images") != self.images:
                return None, f"{self.reference_json} belongs to another entry"
            data = self.reference_npz.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta.get("npz_sha256"):
                return None, f"{self.reference_npz} is not the file that was kept"
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                ref = {"features": np.asarray(z["features"], np.float32), "probs": np.asarray(z["probs"], np.float32)}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"{self.reference_npz} cannot be read ({type(exc).__name__}: {exc})"
        if not len(ref["features"]) == len(ref["probs"]) == len(self.images):
            return None, f"{self.reference_npz} holds {len(ref['features'])} images, not {len(self.images)}"
        _touch(self.reference_json)
        return ref, ""

    def store_conversion(self, onnx: Path, info: dict) -> None:
        """Keep the converted ``onnx`` (with ``info``: ``dim``, ``classes``); a cache that cannot be
        written is skipped (logged)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.model_onnx) as tmp:
                shutil.copyfile(onnx, tmp)
            write_json_atomic(self.model_json, {"format": FORMAT, "key": self.key, "model": self.model,
                                                "code": code_identity(), "onnx_sha256": sha256_file(self.model_onnx),
                                                "dim": int(info["dim"]), "classes": int(info["classes"])})
            _prune(self.folder.parent, "*/model.json", KEEP_MODELS, keep=self.model_json)
        except OSError as exc:
            _log.info("audit cache: the conversion was not kept in %s: %s", self.folder, exc)

    def store_reference(self, features: np.ndarray, probs: np.ndarray) -> None:
        """Keep Keras's ``features`` and ``probs`` of the parity images (skipped, logged, when the
        cache cannot be written)."""
        buf = io.BytesIO()
        np.savez(buf, features=np.asarray(features, np.float32), probs=np.asarray(probs, np.float32))
        data = buf.getvalue()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.reference_npz) as tmp:
                tmp.write_bytes(data)
            write_json_atomic(self.reference_json, {"format": FORMAT, "key": self.reference_key,
                                                    "npz_sha256": hashlib.sha256(data).hexdigest(),
                                                    "images": self.images})
            _prune(self.folder, "parity-*.json", KEEP_REFERENCES, keep=self.reference_json)
        except OSError as exc:
            _log.info("audit cache: the Keras reference was not kept in %s: %s", self.folder, exc)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache is still used
        pass


def _prune(folder: Path, pattern: str, limit: int, *, keep: Path) -> None:
    """Remove all but the ``limit`` most recently used entries matching ``pattern`` (by the
    modification time of their JSON) -- never ``keep``."""

    def used(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    entries = sorted(folder.glob(pattern), key=used, reverse=True)
    for js in entries[limit:]:
        if js == keep:
            continue
        if js.name == "model.json":
            shutil.rmtree(js.parent, ignore_errors=True)
        else:
            for p in (js.with_suffix(".npz"), js):
                p.unlink(missing_ok=True)


__all__ = ["FORMAT", "KEEP_MODELS", "KEEP_REFERENCES", "CacheEntry", "cache_root", "code_identity",
           "model_identity"]
