"""Classical scikit-learn heads -> ONNX (skl2onnx), probabilities as a plain float tensor."""

from __future__ import annotations

import os
from pathlib import Path

from ._lazy import require
from .errors import ExportError

HEAD_INPUT = "features"
HEAD_OUTPUT = "probabilities"


def _zipmap_off(estimator) -> dict:
    """skl2onnx options that return probabilities as a tensor for every classifier inside."""
    opts: dict = {}
    steps = getattr(estimator, "steps", None)
    last = steps[-1][1] if steps else estimator
    opts[id(last)] = {"zipmap": False}
    if last is not estimator:
        opts[id(estimator)] = {"zipmap": False}
    return opts


def head_to_onnx(estimator, feature_dim: int, path: str | os.PathLike, *, opset: int = 17) -> dict:
    """Write ``estimator`` (a fitted classifier or Pipeline) as ONNX.

    Input ``features`` float32 (N, feature_dim); outputs ``label`` (N,) and
    ``probabilities`` float32 (N, C) (no ZipMap, so any runtime reads a tensor).

    Raises:
        ExportError: skl2onnx cannot convert this estimator.

    Example::

        head_to_onnx(rf, 64, "heads/rf.onnx")
    """
    skl2onnx = require("skl2onnx", purpose="exporting classical heads to ONNX")
    from skl2onnx.common.data_types import FloatTensorType

    onnx = require("onnx", purpose="exporting classical heads to ONNX")
    try:
        proto = skl2onnx.convert_sklearn(
            estimator,
            initial_types=[(HEAD_INPUT, FloatTensorType([None, int(feature_dim)]))],
            options=_zipmap_off(estimator),
            target_opset={"": opset, "ai.onnx.ml": 3},
        )
    except Exception as exc:
        raise ExportError(f"skl2onnx cannot convert {type(estimator).__name__}: {type(exc).__name__}: {exc}",
                          hint="the pickle is still exported; run it as a pickle "
                               "(`transfer infer BUNDLE ... --head NAME --head-format pickle`)") from exc
    outs = [o.name for o in proto.graph.output]
    if HEAD_OUTPUT not in outs:
        # older converters call it output_probability
        for node in proto.graph.node:
            node.output[:] = [HEAD_OUTPUT if o == "output_probability" else ("label" if o == "output_label" else o)
                              for o in node.output]
        for o in proto.graph.output:
            o.name = {"output_probability": HEAD_OUTPUT, "output_label": "label"}.get(o.name, o.name)
    from .models.onnx_convert import set_metadata

    set_metadata(proto, role="head")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return {"input": HEAD_INPUT, "output": HEAD_OUTPUT}
