"""The served model: one function loads a bundle for serving, one method builds an answer row.

:func:`load_model` is the only place the server opens a bundle (hash-checked by
:func:`transfer.bundle.load_bundle`, so a bundle ``transfer verify`` refuses never
starts), and :meth:`ServedModel.row` the only place a probability row becomes an answer.
Options that change what is loaded or answered (a signature to trust, a calibrated
"unknown" threshold) belong in :class:`ModelOptions` and these two places.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import MANIFEST, Bundle, load_bundle
from ..errors import BundleError


@dataclass(frozen=True)
class ModelOptions:
    """What runs: the bundle's model for ``backend`` on ``providers`` with ``threads``, and ``head``."""

    backend: str | None = None
    providers: str | None = None
    threads: int | None = None
    head: str = "network"
    head_format: str = "onnx"
    trust: tuple[str, ...] | bool | None = None  # public keys; None: TRANSFER_TRUST; False: checked by the Ray driver
    trust_pickle: bool = False
    reject: bool | str = False                # True: the bundle's default unknown-input score; or its name

    @classmethod
    def of(cls, config) -> "ModelOptions":
        """The model options of a :class:`transfer.serve.config.ServeConfig`."""
        return cls(backend=config.backend, providers=config.providers, threads=config.threads or default_threads(),
                   head=config.head, head_format=config.head_format,
                   trust=(tuple(config.trust) if config.trust else False if config.trust == () else None),
                   trust_pickle=config.trust_pickle,
                   reject=(config.unknown_score or True) if config.reject else False)


@dataclass(frozen=True)
class ImagePrediction:
    """One image's answer from the model thread: its probabilities and, with ``--reject``, its
    unknown-input score and whether it looks known."""

    probs: np.ndarray
    score: float | None = None
    known: bool | None = None


class BatchPrediction:
    """The predictions of one batch, indexable per image (the batcher hands ``[i]`` to each request)."""

    def __init__(self, probs: np.ndarray, unknown: tuple[np.ndarray, np.ndarray] | None = None):
        self.probs, self.unknown = probs, unknown

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, i: int) -> ImagePrediction:
        if self.unknown is None:
            return ImagePrediction(self.probs[i])
        return ImagePrediction(self.probs[i], float(self.unknown[0][i]), bool(self.unknown[1][i]))


def default_threads() -> int:
    """ONNX Runtime threads of a server: every core but one, which is left to HTTP and decoding.

    (ONNX Runtime's threads spin while they wait for work; with one per core they take the
    CPU the event loop needs: on 2 cores, 2 threads served ~20 % fewer requests per second
    at ~60 % more CPU per request than 1.)
    """
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def bundle_id(bundle: Bundle) -> str:
    """``sha256:<hex>`` of the bundle's ``manifest.json`` (the manifest holds every file's SHA-256,
    so this names the whole bundle: ``sha256sum BUNDLE/manifest.json`` prints the same hex).

    Raises:
        BundleError: the manifest changed after the bundle was loaded.
    """
    raw = (bundle.path / MANIFEST).read_bytes()
    if json.loads(raw) != bundle.manifest:
        raise BundleError(f"{bundle.path / MANIFEST} changed while the bundle was being loaded",
                          hint="start the server again once the bundle is complete")
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def check_options(bundle: Bundle, options: ModelOptions) -> None:
    """Refuse a backend or head the bundle cannot serve, without creating a session (the Ray
    driver checks this before any replica starts).

    Raises:
        ConfigError / BundleError: as :func:`transfer.runtime.runners.model_key_for` and
            :func:`transfer.runtime.heads.check_head`.
    """
    from ..runtime.heads import check_head
    from ..runtime.infer import reject_detector
    from ..runtime.runners import model_key_for

    model_key_for(bundle, options.backend)
    check_head(bundle, options.head, options.head_format, trust_pickle=options.trust_pickle)
    reject_detector(bundle, options.reject)


class ServedModel:
    """A verified bundle with its runner and head, ready for batches of pixels."""

    def __init__(self, bundle: Bundle, options: ModelOptions):
        from ..runtime.heads import make_head
        from ..runtime.runners import make_runner

        self.bundle = bundle
        self.options = options
        self.id = bundle_id(bundle)
        self.names = bundle.class_names
        self.size = bundle.input_size
        self.runner = make_runner(bundle, options.backend, options.providers, options.threads)
        self.head = make_head(bundle, options.head, options.head_format, trust_pickle=options.trust_pickle)
        from ..runtime.infer import reject_detector

        self.detector = reject_detector(bundle, options.reject)

    def stack(self, images: list[np.ndarray]) -> np.ndarray:
        """The decoded images of one batch as the model's input: uint8 (N, H, W, 3) (the batcher
        calls this in the model thread, just before :meth:`predict`)."""
        return np.stack(images)

    def predict(self, x: np.ndarray) -> tuple[BatchPrediction, float]:
        """Class probabilities of a batch: one model call and one head call (and, with
        ``--reject``, the unknown-input rule on the network's outputs), as
        :func:`transfer.runtime.infer.predict` does for ``transfer infer``.

        Args:
            x: uint8 or float32 (N, H, W, 3) RGB pixels 0..255.

        Returns:
            (a :class:`BatchPrediction` of N images, seconds the calls took).
        """
        from ..runtime.infer import predict

        t = time.perf_counter()
        probs, unknown = predict(self.runner, self.head, self.detector, np.asarray(x, dtype=np.float32))
        return BatchPrediction(np.asarray(probs, dtype=np.float32), unknown), time.perf_counter() - t

    def warm_up(self, max_batch: int) -> float:
        """Run the smallest and the largest batch once (sessions allocate on first use); seconds taken."""
        t = time.perf_counter()
        h, w = self.size
        for n in sorted({1, max_batch}):
            self.predict(np.zeros((n, h, w, 3), np.uint8))
        return time.perf_counter() - t

    def row(self, pred: "ImagePrediction | np.ndarray", topk: int) -> dict:
        """The answer for one image: ``{"top": [{"class", "prob"}, ...]}``, most probable first;
        with ``--reject`` also ``"decision": "known" | "unknown"`` and the rule and score
        (``"unknown": {"score", "value", "threshold"}``), as every ``transfer infer --reject`` row."""
        from ..runtime.infer import top_k

        probs = pred.probs if isinstance(pred, ImagePrediction) else pred
        classes, ps = top_k(probs, self.names, min(topk, len(self.names)))
        out = {"top": [{"class": c, "prob": p} for c, p in zip(classes, ps)]}
        if self.detector is not None and isinstance(pred, ImagePrediction) and pred.known is not None:
            out["decision"] = "known" if pred.known else "unknown"
            out["unknown"] = {"score": self.detector.score, "value": pred.score, "threshold": self.detector.threshold}
        return out

    def info(self) -> dict:
        """What ``GET /v1/model`` shows: classes, input, models, heads, verification."""
        m = self.bundle.manifest
        return {
            "bundle_id": self.id,
            "bundle": Path(self.bundle.path).name,
            "created": m.get("created"),
            "source_trial": (m.get("source") or {}).get("trial"),
            "backbone": m.get("backbone"),
            "class_names": self.names,
            "num_classes": len(self.names),
            "input": dict(m.get("input", {})),
            "preprocessing": m.get("preprocessing"),
            "models": {k: {f: e.get(f) for f in ("file", "precision", "runtime") if f in e}
                       for k, e in self.bundle.models.items()},
            "heads": ["network", *sorted(self.bundle.heads)],
            "default_head": m.get("default_head", "network"),
            "serving": {"backend": self.runner.name, "provider": self.runner.provider,
                        "model": self.runner.model_key, "head": self.head.name,
                        "head_format": self.options.head_format if self.head.name != "network" else None},
            "verification": {"valid": bool(m.get("valid", False)), "checks": m.get("verification", {})},
            "signed_by": self.bundle.signer, "trusted": self.bundle.trusted,
            "calibration": m.get("calibration"),
            "unknown": (dict(self.detector.describe(), rejecting=True) if self.detector is not None
                        else {"rejecting": False, "available": sorted((m.get("unknown") or {}).get("scores", {}))}),
            "tools": m.get("tools", {}),
        }


def load_model(bundle_path, options: ModelOptions) -> ServedModel:
    """Open a bundle for serving: hashes checked, options checked, sessions created.

    Raises:
        BundleError / TamperedBundleError: what ``transfer verify`` refuses.
        ConfigError: a backend, provider or head this bundle or machine cannot serve.
        TensorRTUnavailableError: a TensorRT backend without a GPU.

    Example::

        model = load_model("runs/digits/bundle", ModelOptions(head="rf"))
        probs, seconds = model.predict(pixels)
    """
    trust = list(options.trust) if options.trust else (False if options.trust is False else None)
    bundle = load_bundle(bundle_path, trust=trust)
    check_options(bundle, options)
    return ServedModel(bundle, options)


__all__ = ["ModelOptions", "ImagePrediction", "BatchPrediction", "ServedModel", "load_model", "check_options", "bundle_id", "default_threads"]
