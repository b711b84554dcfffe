"""The one way to predict with a bundle: its model's runner, the head, the unknown-input rule and top-k.

``transfer infer`` (locally and on Ray workers) and ``transfer serve`` (uvicorn and Ray Serve
replicas) each hold a :class:`Predictor` and call :meth:`Predictor.predict` on batches of
pixels; rows and answers are then built from its :class:`Prediction` (by
:func:`transfer.runtime.rows.prediction_rows` and
:meth:`transfer.serve.model.ServedModel.row`).

A predictor is made from a bundle that :func:`transfer.bundle.load_bundle` loaded and
checked once; :meth:`Predictor.open` checks the options against that bundle first (no
session is made for a backend, head or score it cannot serve), then opens the runner and the
head, whose graphs are checked against the manifest once, on the sessions that will run them.

Example::

    bundle = load_bundle("runs/digits/bundle")
    with Predictor.open(bundle, ModelOptions(head="rf", reject=True)) as p:
        pred = p.predict(pixels)              # float32 or uint8 (N, H, W, 3)
        pred.probs, pred.known                # the head's probabilities; False: answer "unknown"
        p.top_k(pred.probs[0], 3)             # (['7', '1', '9'], [0.97, 0.02, 0.004])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle
from .heads import Head, check_head, make_head
from .predict_config import ModelOptions
from .rows import RejectRule, top_k
from .runner_base import Outputs, Runner
from .runners import make_runner, model_key_for
from .unknown import UnknownDetector, make_detector


@dataclass(frozen=True)
class Prediction:
    """The predictions of one batch, one row per image.

    Attributes:
        probs: the head's class probabilities (N, C).
        outputs: what the model returned (``features``, the network's ``probs``, and any
            further named output of the model contract).
        scores / known: with an unknown-input rule, each image's score and whether it is
            at or above the threshold (``False``: answer "unknown"); else ``None``.
    """

    probs: np.ndarray
    outputs: Outputs
    scores: np.ndarray | None = None
    known: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.probs)


def check_options(bundle: Bundle, options: ModelOptions, *, trust_pickle: bool = False) -> UnknownDetector | None:
    """Refuse a backend, head or unknown-input score the bundle cannot serve, without making a
    session (a Ray driver checks this before any worker starts); returns the detector of the
    rule (``None`` without ``reject``).

    Raises:
        BundleError: no such model, engine or head (form); UntrustedBundleError: a pickled
            head of a bundle that is not trusted; ConfigError: no such unknown-input score.
    """
    model_key_for(bundle, options.backend)
    check_head(bundle, options.head, options.head_format, trust_pickle=trust_pickle)
    rule = options.reject_rule
    return make_detector(bundle, None if rule is True else rule) if rule else None


class Predictor:
    """A checked bundle ready for batches of pixels: runner + head + unknown-input rule + top-k.

    A context manager like its runner (``with`` activates and releases it; used without
    ``with``, the runner activates on its first batch).
    """

    def __init__(self, bundle: Bundle, runner: Runner, head: Head, detector: UnknownDetector | None = None):
        self.bundle, self.runner, self.head, self.detector = bundle, runner, head, detector
        self.names = bundle.class_names
        self.input_size = bundle.input_size
        self.recipe = bundle.recipe

    @classmethod
    def open(cls, bundle: Bundle, options: ModelOptions | None = None, *, trust_pickle: bool = False,
             spinning: bool = True) -> "Predictor":
        """The predictor of ``options`` on a loaded bundle.

        Args:
            bundle: from :func:`transfer.bundle.load_bundle` (hashes and manifest checked).
            options: backend, providers, threads, head, reject rule (default: ONNX Runtime
                fp32 on the best provider, the network's softmax).
            trust_pickle: a pickled head may run from a bundle no trusted key signed.
            spinning: ONNX Runtime's idle threads spin between calls (see
                :func:`transfer.runtime.sessions.make_session`; a server turns it off).

        Raises:
            as :func:`check_options`; TamperedBundleError: a graph is not what the manifest
            says; TensorRTUnavailableError: a TensorRT backend without a GPU.
        """
        options = options or ModelOptions()
        detector = check_options(bundle, options, trust_pickle=trust_pickle)
        runner = make_runner(bundle, options.backend, options.providers, options.threads, spinning=spinning)
        head = make_head(bundle, options.head, options.head_format, trust_pickle=trust_pickle)
        return cls(bundle, runner, head, detector)

    # -- lifecycle: the runner's ---------------------------------------------------------------

    def activate(self) -> "Predictor":
        self.runner.activate()
        return self

    def deactivate(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> "Predictor":
        return self.activate()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.runner.__exit__(exc_type, exc, tb)

    # -- one batch -------------------------------------------------------------------------------

    def predict(self, x: np.ndarray) -> Prediction:
        """The predictions of one batch: one model call, one head call and, with an unknown-input
        rule, its scores on the network's own outputs (the same rule whatever the head).

        Args:
            x: uint8 or float32 (N, H, W, 3) RGB pixels 0..255 (N may be 0).
        """
        out = self.runner.infer(x)
        if not len(out):
            return Prediction(out.probs, out)
        probs = np.asarray(self.head(out.features, out.probs), dtype=np.float32)
        if self.detector is None:
            return Prediction(probs, out)
        scores, known = self.detector(out.features, out.probs)
        return Prediction(probs, out, scores, known)

    def top_k(self, probs: np.ndarray, k: int) -> tuple[list[str], list[float]]:
        """The ``k`` most probable class names of one image and their probabilities, best first
        (at most the bundle's classes)."""
        return top_k(probs, self.names, min(k, len(self.names)))

    @property
    def rule(self) -> RejectRule | None:
        """The unknown-input rule every row and answer records (``None`` without one)."""
        return RejectRule(self.detector.score, self.detector.threshold) if self.detector is not None else None

    def describe(self) -> dict:
        """What runs: backend, provider, model entry and head (``GET /v1/model``'s ``serving``)."""
        return {"backend": self.runner.name, "provider": self.runner.provider, "model": self.runner.model_key,
                "head": self.head.name}


__all__ = ["Predictor", "Prediction", "check_options"]
