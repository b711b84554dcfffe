"""Verification of exported models on real images: run everything, then compare (Polygraphy's
``Comparator.run`` / ``compare_accuracy``).

Every check runs a candidate (ONNX fp32, int8, fp16: :class:`~transfer.runtime.runners.OrtRunner`;
a TensorRT engine: :class:`~transfer.runtime.trt_runner.TrtRunner`; an ONNX head) and its
reference (Keras: :class:`~transfer.export.keras_runner.KerasRunner`; ONNX fp32; the pickled
head) on the same real validation images (:func:`run_all`), then compares their outputs with
:func:`transfer.export.compare.compare_outputs` under a rule (:func:`parity_check` or
:func:`accuracy_check`), which adds ``passed`` and the limits it was judged by. The exporter
marks a bundle invalid when any check fails.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.stream import decode_batches
from ..errors import DataError
from ..progress import ProgressLike, as_progress
from ..runtime.heads import OnnxHead
from ..runtime.runner_base import Outputs, Runner, infer_batches
from ..runtime.runners import OrtRunner
from .compare import compare_outputs

#: images per model call when a check runs an ONNX model or engine over the verification images
BATCH = 64


def verification_images(run, size: tuple[int, int], n: int, progress: ProgressLike = None, *,
                        fold: int | None = None):
    """Up to ``n`` readable images of the val split (then test), with their labels.

    Pixels come from :func:`transfer.data.stream.decode_batches`, the one decode loop of the
    package (the pixel path of training and the runtime); undecodable files are skipped.

    Returns:
        ``(x float32 (k, H, W, 3), labels int (k,), [paths])``.

    Raises:
        DataError: no readable val or test image.

    Example::

        x, y, used = verification_images(RunFolder("runs/digits"), (32, 32), 64)
    """

    xs, ys, used = [], [], []
    for split in ("val", "test"):
        paths, labels = run.split_paths(split, fold=fold)  # a k-fold trial: its own fold's val
        start = 0
        for pb in decode_batches(paths, size, batch=64, recipe=getattr(run, "recipe", None)):
            take = pb.ok_index[: n - len(used)]
            xs.append(pb.x[: len(take)])
            ys += [int(labels[start + i]) for i in take]
            used += [str(paths[start + i]) for i in take]
            start += len(pb.items)
            if len(used) >= n:
                break
        if len(used) >= n:
            break
    if not used:
        raise DataError(f"no readable validation or test image in {run.path} to verify the export with",
                        hint="check the data folder named in dataset.json is still there")
    as_progress(progress).say(f"verification set: {len(used)} image(s) from the val/test splits")
    return np.concatenate(xs).astype(np.float32), np.asarray(ys), used


def run_all(sources: Sequence[Runner | Outputs], x: np.ndarray, batch: int | None = BATCH) -> list[Outputs]:
    """The outputs of every source on the same images ``x``: a runner is activated, run over
    ``x`` in batches of ``batch`` (``None``: one call) and released; outputs computed before
    (a reference already run) are passed through.

    Example::

        cand, ref = run_all([OrtRunner(b / "model.onnx", "cpu"), KerasRunner(model, batch_size=32)], x)
        parity_check(ref.probs, cand.probs, y, atol=1e-4, min_agreement=0.999, reference_name="Keras")
    """
    out = []
    for source in sources:
        if isinstance(source, Outputs):
            out.append(source)
            continue
        with source:
            out.append(infer_batches(source, x, batch or max(1, len(x))))
    return out


def parity_check(reference: np.ndarray, candidate: np.ndarray, labels: Sequence[int] | None, *,
                 atol: float, min_agreement: float, reference_name: str) -> dict:
    """Same-precision check (ONNX fp32 vs Keras, ONNX head vs pickle, TensorRT fp32).

    Passes when top-1 agreement >= ``min_agreement`` and max |dp| <= ``atol`` (a NaN fails).

    Example::

        parity_check(np.eye(2), np.eye(2), [0, 1], atol=1e-4, min_agreement=0.999,
                     reference_name="keras")["passed"]
        # True
    """
    v = compare_outputs(reference, candidate, labels)
    v["passed"] = bool(v["top1_agreement"] >= min_agreement and v["max_abs_diff"] <= atol)
    v["reference"] = reference_name
    v["limits"] = {"atol": atol, "min_agreement": min_agreement}
    return v


def accuracy_check(reference: np.ndarray, candidate: np.ndarray, labels: Sequence[int], *,
                   max_accuracy_drop: float, reference_name: str) -> dict:
    """Reduced-precision check (int8, fp16): passes when the accuracy drop <= the limit.

    The validation accuracy of both sides is recorded next to each other.

    Example::

        accuracy_check(np.eye(2), np.eye(2)[::-1], [0, 1], max_accuracy_drop=0.01,
                       reference_name="onnx-fp32")["passed"]
        # False
    """
    if labels is None:
        raise ValueError("an accuracy check needs labels")
    v = compare_outputs(reference, candidate, labels)
    drop = v["accuracy_drop"]
    v["passed"] = bool(np.isfinite(drop) and drop <= max_accuracy_drop and np.all(np.isfinite(candidate)))
    v["reference"] = reference_name
    v["limits"] = {"max_accuracy_drop": max_accuracy_drop}
    return v


def summary_line(key: str, v: dict) -> str:
    """One human line of a check, as ``transfer export`` prints it."""
    verdict = "PASS" if v["passed"] else "FAIL"
    if "max_accuracy_drop" in v.get("limits", {}):
        return (f"verify {key} vs {v['reference']} on {v['images']} images: accuracy "
                f"{v['candidate_accuracy']:.4f} vs {v['reference_accuracy']:.4f} (drop "
                f"{100 * v['accuracy_drop']:.2f} points, limit {100 * v['limits']['max_accuracy_drop']:.2f}), "
                f"top-1 agreement {v['top1_agreement']:.4f} -> {verdict}")
    return (f"verify {key} vs {v['reference']} on {v['images']} images: max |dp| {v['max_abs_diff']:.2e}, "
            f"mean {v['mean_abs_diff']:.2e}, top-1 agreement {v['top1_agreement']:.4f} -> {verdict}")


def deep_check(bundle, batch: int = 2) -> list[dict]:
    """Run every ONNX model and head of a loaded bundle once (``transfer verify --deep``).

    Feeds ``batch`` synthetic images (a fixed gradient, RGB 0..255) to each ONNX model
    of the manifest and checks the output names and shapes ((N, feature_dim), (N,
    num_classes)) and that probabilities are finite and sum to 1; feeds the fp32 features
    to each ONNX head the same way. TensorRT engines are skipped (they need their GPU).

    Args:
        bundle: a :class:`transfer.bundle.Bundle` (already hash-checked).

    Returns:
        problems, each ``{"file", "problem"}``; empty when everything ran.

    Example::

        deep_check(load_bundle("runs/digits/bundle"))
        # []
    """
    m = bundle.manifest
    h, w = bundle.input_size
    d, c = int(m.get("feature_dim", -1)), len(m["class_names"])
    grad = np.linspace(0, 255, h * w * 3, dtype=np.float32).reshape(1, h, w, 3)
    x = np.concatenate([grad, 255 - grad] * batch)[:batch]
    problems: list[dict] = []
    feats = None

    def bad_probs(p, n, precision: str = "fp32") -> str | None:
        if p.shape != (n, c):
            return f"probabilities of shape {p.shape}, expected {(n, c)}"
        if not np.all(np.isfinite(p)):
            return "probabilities are not finite"
        # an int8 graph quantizes the softmax output too: up to half a step (1/255) per class
        tol = 1e-3 if precision != "int8" else max(0.02, c / 255.0)
        if not np.allclose(p.sum(1), 1.0, atol=tol):
            return f"probabilities sum to {np.round(p.sum(1), 4).tolist()}, not 1 (+-{tol:g})"
        return None

    for key, e in sorted(bundle.models.items()):
        if e.get("runtime") != "onnxruntime":
            continue
        try:
            out = run_all([OrtRunner(bundle.file(e["file"]), "cpu", name=key, model_key=key)], x)[0]
            f, p = out.features, out.probs
        except Exception as exc:  # noqa: BLE001 - any failure to run is the finding
            problems.append({"file": e["file"], "problem": f"{key} does not run: {type(exc).__name__}: {exc}"})
            continue
        if f.shape != (batch, d):
            problems.append({"file": e["file"], "problem": f"features of shape {f.shape}, expected {(batch, d)}"})
        msg = bad_probs(p, batch, e.get("precision", "fp32"))
        if msg:
            problems.append({"file": e["file"], "problem": msg})
        if key == "onnx-fp32":
            feats = f
    for name, e in sorted(bundle.heads.items()):
        if feats is None or not e.get("onnx"):
            continue
        try:
            head = OnnxHead(bundle.file(e["onnx"]), name, input=e.get("input", "features"),
                            output=e.get("output", "probabilities"))
            p = head(feats, None)
        except Exception as exc:  # noqa: BLE001
            problems.append({"file": e["onnx"], "problem": f"head {name} does not run: {type(exc).__name__}: {exc}"})
            continue
        msg = bad_probs(np.asarray(p), batch)
        if msg:
            problems.append({"file": e["onnx"], "problem": msg})
    return problems
