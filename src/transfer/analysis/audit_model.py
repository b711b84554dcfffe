"""The audit's feature model as ONNX, converted in a child process that alone imports TensorFlow.

``transfer data audit`` needs the pooled features of a trained trial's model (or of a chosen
backbone) for every image. Running that model through Keras in the audit's own process costs
twice: importing TensorFlow holds about 700 MB for the rest of the audit (measured: 24 MB ->
704 MB resident on import; the whole 60,000-image audit peaked at 1.39 GB), and Keras's
per-batch ``predict_on_batch`` of arc2 takes 5.7 s per 10,000 Fashion-MNIST images where ONNX
Runtime on one thread takes 2.7 s. So a child process (``python -m
transfer.analysis.audit_model SPEC``) loads the model, converts it with
:func:`transfer.export.onnx.export_onnx` (as ``transfer export`` does), decodes a few of the
audited images with the audit's own pixel functions and writes Keras's features and softmax of
them; it runs while the audit hashes the files. The audit then runs the ONNX graph with ONNX
Runtime and first compares its features with Keras's on those images
(:class:`transfer.analysis.audit._Engine`).

The spec (JSON, one argument): ``{"run", "trial"}`` or ``{"backbone", "weights", "image_size"}``;
``"onnx"``: where to write the model; ``"parity"``: image paths; ``"size"``: (H, W) of the
model input; ``"reference"``: where to write ``x`` (the pixels), ``features`` and ``probs``
(``.npz``). On success the child prints one line ``RESULT {"dim": D, "classes": C}``; on a
:class:`~transfer.errors.TransferError` it prints ``ERROR message`` and exits 1.

Example::

    python -m transfer.analysis.audit_model '{"run": "runs/f", "trial": "best", "onnx": "/tmp/a/m.onnx",
        "parity": ["data/a/1.png"], "size": [28, 28], "reference": "/tmp/a/ref.npz"}'
"""

from __future__ import annotations

import json
import sys

import numpy as np


def load_source_model(spec: dict):
    """The contract classifier the spec names: a run's trial, or ``backbone`` with ``weights`` at ``image_size``."""
    if spec.get("run") is not None:
        from .features import open_run, resolve_trial

        return resolve_trial(open_run(spec["run"]), spec.get("trial", "best")).load_model()
    from ..models.build import build_classifier

    side = int(spec["image_size"])
    model, _ = build_classifier(spec["backbone"], input_shape=(side, side, 3),
                                weights=spec.get("weights") or "imagenet", num_classes=2, seed=0)
    return model


def reference_pixels(paths, size, limit: int) -> np.ndarray:
    """Up to ``limit`` of ``paths`` as model input, decoded and resized as the audit's pass does
    (:func:`transfer.analysis.audit._read_one`); files that do not decode are skipped."""
    from ..data.image import resize_image
    from ..data.stream import decode_item

    out = []
    for p in paths:
        item = decode_item(str(p), None, recipe=None)
        if item.pixels is not None:
            out.append(resize_image(item.pixels, tuple(size), recipe=None))
        if len(out) >= limit:
            break
    h, w = (int(v) for v in size)
    return np.stack(out).astype(np.float32) if out else np.zeros((0, h, w, 3), np.float32)


def convert(spec: dict) -> dict:
    """Do what the child does (see the module docstring) and return ``{"dim", "classes"}``."""
    from ..export.onnx import export_onnx, two_output_model

    model = load_source_model(spec)
    export_onnx(model, spec["onnx"])
    x = reference_pixels(spec.get("parity", []), spec["size"], int(spec.get("limit", 32)))
    two = two_output_model(model)
    if len(x):
        f, p = (np.asarray(a, np.float32) for a in two.predict_on_batch(x))
    else:
        f = np.zeros((0, int(two.outputs[0].shape[-1])), np.float32)
        p = np.zeros((0, int(two.outputs[1].shape[-1])), np.float32)
    np.savez(spec["reference"], x=x, features=f, probs=p)
    return {"dim": int(two.outputs[0].shape[-1]), "classes": int(two.outputs[1].shape[-1])}


def main(argv: list[str]) -> int:
    from ..errors import TransferError

    try:
        res = convert(json.loads(argv[0]))
    except TransferError as exc:
        print("ERROR " + exc.message, flush=True)
        return 1
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
