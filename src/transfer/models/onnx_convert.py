"""Keras classifier -> ONNX with a dynamic batch, named input/outputs, preprocessing in the graph."""

from __future__ import annotations

import os
from pathlib import Path

from .._lazy import import_keras, import_tensorflow, require
from ..errors import ExportError, ModelError
from ..onnx_facts import PRECISION_KEY, ROLE_KEY

INPUT_NAME = "image"
OUTPUT_NAMES = ("features", "probs")


def two_output_model(model, extra: dict[str, str] | None = None):
    """``image -> [features, probs]`` sharing the layers of a contract model (no copy); ``extra``
    = ``{output name: layer name}`` adds those layers' outputs after them (the ``feature_map``
    of class activation maps, :mod:`transfer.export.cam_export`).

    Raises:
        ModelError: the model lacks the ``features`` layer or the ``probs`` output.
    """
    keras = import_keras()
    names = {layer.name for layer in model.layers}
    missing = [n for n in ("features", "probs") if n not in names]
    if missing:
        raise ModelError(
            f"model {model.name!r} has no layer named {', '.join(missing)}; it does not follow the model "
            "contract (input 'image' -> ... -> 'features' -> ... -> 'probs')",
            hint="export models trained by `transfer train`",
        )
    outs = [model.get_layer(n).output for n in ("features", "probs", *(extra or {}).values())]
    return keras.Model(model.inputs, outs, name="transfer_export")


def rename_outputs(proto, names) -> None:
    """Give a converted graph's outputs ``names``, in order (and every node that reads or writes them)."""
    mapping = {o.name: n for o, n in zip(proto.graph.output, names) if o.name != n}
    if not mapping:
        return
    for node in proto.graph.node:
        node.output[:] = [mapping.get(o, o) for o in node.output]
        node.input[:] = [mapping.get(i, i) for i in node.input]
    for o in proto.graph.output:
        o.name = mapping.get(o.name, o.name)


def export_onnx(model, path: str | os.PathLike, *, opset: int = 17, extra: dict[str, str] | None = None) -> dict:
    """Convert a contract model to ONNX with tf2onnx (``from_keras`` with an explicit signature).

    The graph takes ``image`` float32 (N, H, W, 3) RGB 0..255 with a dynamic N, and returns
    ``features`` (N, D) and ``probs`` (N, C), then one output per ``extra`` entry (``{output name:
    layer name}``, e.g. ``{"feature_map": "out_relu"}``). Augmentation never reaches here (it lives in
    the input pipeline), so no random op ends up in the graph.

    Returns:
        ``{"inputs": {...}, "outputs": {...}, "opset": opset}`` as found in the written file.

    Raises:
        ExportError: tf2onnx failed, or the written graph lacks the expected names.

    Example::

        export_onnx(load_model("runs/d/trials/arc2-t100/model.keras"), "model.onnx")
    """
    tf = import_tensorflow()
    tf2onnx = require("tf2onnx", purpose="ONNX export")
    onnx = require("onnx", purpose="ONNX export")
    two = two_output_model(model, extra)
    names = OUTPUT_NAMES + tuple(extra or {})
    h, w, c = (int(d) for d in model.input_shape[1:4])
    spec = [tf.TensorSpec((None, h, w, c), tf.float32, name=INPUT_NAME)]
    path = Path(path)
    try:
        proto, _ = tf2onnx.convert.from_keras(two, input_signature=spec, opset=opset)
    except Exception as exc:  # tf2onnx raises many kinds
        raise ExportError(f"tf2onnx could not convert model {model.name!r}: {type(exc).__name__}: {exc}",
                          hint=f"try another opset (now {opset}); `transfer --debug export ...` shows the traceback",
                          option="opset") from exc
    rename_outputs(proto, names)  # tf2onnx names outputs after the Keras layers ("features", "probs"); make sure
    ins = [i.name for i in proto.graph.input]
    if ins != [INPUT_NAME]:
        raise ExportError(f"exported graph has inputs {ins}, expected ['{INPUT_NAME}']")
    proto.doc_string = "transfer: image (N,H,W,3) float32 RGB 0..255 -> features, probs"
    set_metadata(proto, role="model", precision="fp32")
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return {"inputs": {INPUT_NAME: INPUT_NAME}, "outputs": {n: n for n in names}, "opset": opset}


def set_metadata(proto, *, role: str, precision: str | None = None) -> None:
    """Stamp what the file is into its ``metadata_props`` (``transfer.role``: model / head,
    ``transfer.precision``): the runtime checks the manifest's claims against them
    (:func:`transfer.bundle.check_model_graph`), without needing the ``onnx`` package."""
    values = {ROLE_KEY: role, **({PRECISION_KEY: precision} if precision else {})}
    keep = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    for p in keep:
        proto.metadata_props.add(key=p.key, value=p.value)
    for k, v in values.items():
        proto.metadata_props.add(key=k, value=v)


def stamp_onnx(path: str | os.PathLike, *, role: str, precision: str | None = None) -> None:
    """:func:`set_metadata` on a written file (the int8 model ONNX Runtime's quantizer wrote)."""
    onnx = require("onnx", purpose="ONNX export")
    proto = onnx.load(str(path))
    set_metadata(proto, role=role, precision=precision)
    onnx.save(proto, str(path))
