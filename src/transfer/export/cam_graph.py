"""Grad-CAM as an ONNX graph: the maps of a bundle whose head has no exact class activation map.

A head like the small CNNs' ``Flatten -> Dense(64, relu) -> Dense`` is not linear in the feature
map, so the ``feature_map @ kernel`` identity of :mod:`transfer.export.cam_export` does not hold.
Grad-CAM (Selvaraju et al. 2017) still defines the map: the class score's gradient with respect to
a layer's activations ``A`` (N, h, w, K), averaged over the cells, weights the channels of ``A``.
That needs a backward pass, so export writes it as its own graph, ``cam.onnx``:
``image`` float32 (N, H, W, 3) pixels 0..255 and ``class`` int64 (N,) -> ``cam`` float32 (N, h, w),
the raw Grad-CAM of that class at that layer, on the same logits ``transfer gradcam`` uses (the
``probs`` layer's input times its kernel plus bias: a calibration temperature scales them and not
the map).

TensorFlow writes some backward operations as ops of its own that tf2onnx passes through
unconverted and ONNX Runtime refuses (measured with tf2onnx 1.17, TensorFlow 2.21: ``ShapeN``
in every ``Conv2D`` gradient, ``ReluGrad``, ``Relu6Grad``, ``MaxPoolGrad``, the batch-norm and
depthwise-convolution gradients). The graph is therefore built with ``tf.gradients`` under a
gradient override map (:data:`OVERRIDES`) that spells each of those gradients in forward ops
tf2onnx converts: the same numbers (``Conv2DBackpropInput`` with ``tf.shape`` instead of
``ShapeN``; ReLU's and ReLU6's masks; max pooling's gradient to the first maximum of each
window, as TensorFlow's CPU kernel gives it; inference batch norm's scale; a depthwise
convolution's as a depthwise convolution of the zero-interleaved, padded gradient with the kernel
turned by 180 degrees; ``Mean``'s as a broadcast, since its own ``Reshape`` fails in ONNX
Runtime; ``AddV2``'s and ``Mul``'s summed down to each input's static shape, without
``BroadcastGradientArgs``; the sigmoid's ``y (1 - y)``). A model with any other op whose gradient does not convert (e.g. average pooling's
``AvgPoolGrad``) gets no graph, and export records why (:class:`CamGraphError`); every graph is
checked against Keras's own Grad-CAM on the verification images before it goes in the bundle.

Example::

    io = write_gradcam_graph(model, "conv2", "bundle/cam.onnx")     # {"inputs": ..., "outputs": ...}
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import maps as cammaps
from .._lazy import import_keras, import_tensorflow, require
from ..analysis.gradcam import compute_maps
from ..errors import TransferError
from ..fsutil import atomic_path
from ..models.onnx_convert import rename_outputs
from ..runtime.sessions import make_session

#: the graph's inputs and output, and its file in a bundle
IMAGE, CLASS, CAM = "image", "class", "cam"
CAM_GRAPH = "cam.onnx"
#: the written graph must give Keras's Grad-CAM to this Pearson correlation (median over the
#: verification images) to go in the bundle
MIN_PEARSON = 0.999
#: TensorFlow op -> the gradient registered for it here (:func:`_register`)
OVERRIDES = {"Relu": "TransferOnnxRelu", "Relu6": "TransferOnnxRelu6", "Conv2D": "TransferOnnxConv2D",
             "MaxPool": "TransferOnnxMaxPool", "FusedBatchNormV3": "TransferOnnxFusedBatchNorm",
             "DepthwiseConv2dNative": "TransferOnnxDepthwise", "Mean": "TransferOnnxMean", "AddV2": "TransferOnnxAdd",
             "Mul": "TransferOnnxMul", "Sigmoid": "TransferOnnxSigmoid"}
METHOD = ("Grad-CAM (Selvaraju et al. 2017) computed by the bundle's cam.onnx graph: the class logit's gradient "
          "with respect to the layer's activations, averaged over the cells, weights its channels")

_registered = False
#: what the overrides could not spell while the current graph was traced (TensorFlow wraps an
#: exception raised while tracing into its own, so they are collected and raised after it)
_problems: list[str] = []


def _refuse(tf, why: str, like):
    """Note why a gradient cannot be written and give a stand-in (zeros) so tracing can finish."""
    _problems.append(why)
    return tf.zeros_like(like)


class CamGraphError(TransferError):
    """The Grad-CAM graph of a model could not be made (the reason goes in the manifest)."""


def _register(tf) -> None:
    """Register the gradients of :data:`OVERRIDES` once per process."""
    global _registered
    if _registered:
        return

    @tf.RegisterGradient(OVERRIDES["Relu"])
    def _relu(op, grad):
        return grad * tf.cast(op.outputs[0] > 0, grad.dtype)

    @tf.RegisterGradient(OVERRIDES["Relu6"])
    def _relu6(op, grad):
        y = op.outputs[0]
        return grad * tf.cast(tf.logical_and(y > 0, y < 6), grad.dtype)

    @tf.RegisterGradient(OVERRIDES["Conv2D"])
    def _conv2d(op, grad):
        x, k = op.inputs
        if op.get_attr("data_format") not in (b"NHWC", "NHWC"):
            return _refuse(tf, "a Conv2D layer is not NHWC", x), None
        dx = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(x), filter=k, out_backprop=grad, strides=op.get_attr("strides"),
            padding=op.get_attr("padding"), explicit_paddings=op.get_attr("explicit_paddings"),
            dilations=op.get_attr("dilations"), data_format="NHWC")
        return dx, None  # the weights' gradient is not needed

    @tf.RegisterGradient(OVERRIDES["MaxPool"])
    def _max_pool(op, grad):
        ks, st = list(op.get_attr("ksize")), list(op.get_attr("strides"))
        pad = op.get_attr("padding")
        pad = pad.decode() if isinstance(pad, bytes) else pad
        if ks != st or ks[1] != ks[2] or ks[0] != 1 or ks[3] != 1 or pad != "VALID":
            return _refuse(tf, f"max pooling with window {ks[1:3]}, strides {st[1:3]}, padding {pad} (only "
                               "non-overlapping VALID windows have a converted gradient)", op.inputs[0])
        f = int(ks[1])
        x = op.inputs[0]
        shape = tf.shape(x)
        h, w = shape[1] // f * f, shape[2] // f * f
        windows = tf.nn.space_to_depth(x[:, :h, :w, :], f)            # (N, h/f, w/f, f*f*C): (dy, dx, c)
        c = tf.shape(x)[3]
        cells = tf.reshape(windows, tf.concat([tf.shape(windows)[:3], [f * f, c]], 0))
        first = tf.one_hot(tf.argmax(cells, axis=3), f * f, axis=3, dtype=grad.dtype)  # the first maximum
        spread = tf.reshape(first * grad[:, :, :, None, :], tf.shape(windows))
        dx = tf.nn.depth_to_space(spread, f)
        return tf.pad(dx, [[0, 0], [0, shape[1] - h], [0, shape[2] - w], [0, 0]])

    @tf.RegisterGradient(OVERRIDES["FusedBatchNormV3"])
    def _batch_norm(op, *grads):  # inference mode: y = (x - mean) * scale / sqrt(var + eps) + offset
        if op.get_attr("is_training") or op.get_attr("data_format") not in (b"NHWC", "NHWC"):
            return _refuse(tf, "a BatchNormalization layer in training mode or not NHWC", op.inputs[0]), \
                None, None, None, None
        _, scale, _, _, var = op.inputs[:5]
        return grads[0] * scale * tf.math.rsqrt(var + op.get_attr("epsilon")), None, None, None, None

    @tf.RegisterGradient(OVERRIDES["DepthwiseConv2dNative"])
    def _depthwise(op, grad):
        # the input's gradient of a depthwise convolution is a depthwise convolution of the
        # gradient (zeros between its cells for a stride, padded by the kernel) with the kernel
        # turned by 180 degrees; then the padding the forward pass added is cut off again
        x, k = op.inputs
        if op.get_attr("data_format") not in (b"NHWC", "NHWC") or list(op.get_attr("dilations")) != [1, 1, 1, 1]:
            return _refuse(tf, "a depthwise convolution that is not NHWC or is dilated", x), None
        if k.shape[3] != 1 or k.shape[0] is None or k.shape[1] is None:
            return _refuse(tf, "a depthwise convolution with a channel multiplier other than 1", x), None
        kh, kw = int(k.shape[0]), int(k.shape[1])
        sh, sw = (int(v) for v in list(op.get_attr("strides"))[1:3])
        pad = op.get_attr("padding")
        pad = pad.decode() if isinstance(pad, bytes) else pad
        if pad not in ("SAME", "VALID"):
            return _refuse(tf, f"a depthwise convolution with padding {pad}", x), None
        shape = tf.shape(x)
        h, w = shape[1], shape[2]
        ho, wo = tf.shape(grad)[1], tf.shape(grad)[2]
        g = grad
        if sh > 1:  # a cell every sh rows
            g = tf.reshape(tf.stack([g] + [tf.zeros_like(g)] * (sh - 1), axis=2),
                           tf.stack([shape[0], ho * sh, wo, shape[3]]))[:, :(ho - 1) * sh + 1]
        if sw > 1:
            g = tf.reshape(tf.stack([g] + [tf.zeros_like(g)] * (sw - 1), axis=3),
                           tf.stack([shape[0], (ho - 1) * sh + 1, wo * sw, shape[3]]))[:, :, :(wo - 1) * sw + 1]
        g = tf.pad(g, [[0, 0], [kh - 1, kh - 1], [kw - 1, kw - 1], [0, 0]])
        full = tf.nn.depthwise_conv2d(g, k[::-1, ::-1], [1, 1, 1, 1], "VALID")  # (ho-1)*s + k per side
        if pad == "SAME":
            top = tf.maximum((ho - 1) * sh + kh - h, 0) // 2
            left = tf.maximum((wo - 1) * sw + kw - w, 0) // 2
        else:
            top = left = 0
        full = full[:, top:, left:]
        got_h, got_w = tf.shape(full)[1], tf.shape(full)[2]
        full = tf.pad(full, [[0, 0], [0, tf.maximum(h - got_h, 0)], [0, tf.maximum(w - got_w, 0)], [0, 0]])
        return full[:, :h, :w], None

    @tf.RegisterGradient(OVERRIDES["Mean"])
    def _mean(op, grad):
        x, axes = op.inputs
        shape = tf.shape(x)
        rank = tf.size(shape)
        axes = tf.math.floormod(tf.reshape(tf.cast(axes, tf.int32), [-1]), rank)
        kept = tf.tensor_scatter_nd_update(shape, axes[:, None], tf.ones_like(axes))
        count = tf.cast(tf.reduce_prod(shape) // tf.reduce_prod(kept), grad.dtype)
        return tf.broadcast_to(tf.reshape(grad, kept), shape) / count, None

    def _unbroadcast(grad, x):
        """``grad`` (the output's shape) summed down to ``x``'s static shape (a broadcast input)."""
        if x.shape.rank is None or grad.shape.rank is None:
            return _refuse(tf, "an elementwise op on tensors of unknown rank", x)
        g = grad
        if x.shape.rank < g.shape.rank:
            g = tf.reduce_sum(g, axis=list(range(g.shape.rank - x.shape.rank)))
        axes = [i for i, d in enumerate(x.shape) if d == 1 and g.shape[i] != 1]
        return tf.reduce_sum(g, axis=axes, keepdims=True) if axes else g

    @tf.RegisterGradient(OVERRIDES["AddV2"])
    def _add(op, grad):  # a residual connection: the gradient goes to both sides (summed where broadcast)
        return _unbroadcast(grad, op.inputs[0]), _unbroadcast(grad, op.inputs[1])

    @tf.RegisterGradient(OVERRIDES["Mul"])
    def _mul(op, grad):  # swish's and squeeze-excitation's products
        a, b = op.inputs
        return _unbroadcast(grad * b, a), _unbroadcast(grad * a, b)

    @tf.RegisterGradient(OVERRIDES["Sigmoid"])
    def _sigmoid(op, grad):
        y = op.outputs[0]
        return grad * y * (1 - y)

    _registered = True


def gradcam_function(model, layer: str):
    """A ``tf.function`` ``(image, class) -> cam`` (see the module docstring) whose backward ops are
    those of :data:`OVERRIDES`."""
    tf = import_tensorflow()
    keras = import_keras()
    _register(tf)
    dense = model.get_layer("probs")
    graph = keras.Model(model.inputs[0], [model.get_layer(layer).output, dense.input])
    h, w, c = (int(d) for d in model.input_shape[1:4])
    spec = [tf.TensorSpec((None, h, w, c), tf.float32, name=IMAGE), tf.TensorSpec((None,), tf.int64, name=CLASS)]

    @tf.function(input_signature=spec)
    def cam(image, cls):
        with tf.compat.v1.get_default_graph().gradient_override_map(OVERRIDES):
            acts, feats = graph(image, training=False)
            logits = tf.matmul(feats, dense.kernel) + dense.bias
            score = tf.gather(logits, cls, axis=1, batch_dims=1)
        grads = tf.gradients(score, acts)[0]
        if grads is None:
            return tf.identity(_refuse(tf, f"the class score does not depend on layer {layer!r}", acts[..., 0]),
                               name=CAM)
        weights = tf.reduce_mean(grads, axis=[1, 2])
        return tf.identity(tf.einsum("nhwk,nk->nhw", acts, weights), name=CAM)

    return cam


def _captures_as_constants(proto, fn) -> None:
    """Constant tensors the function captured (e.g. a Normalization layer's mean and variance, kept
    as tensors, not variables) become graph inputs in tf2onnx's output; make them initializers
    holding the captured values, so the graph takes ``image`` and ``class`` only."""
    from onnx import numpy_helper

    inputs = {i.name: i for i in proto.graph.input}
    values = {}
    for outer, inner in fn.get_concrete_function().graph.captures:
        if inner.name in inputs and inner.name not in (IMAGE, CLASS) and hasattr(outer, "numpy"):
            try:
                values[inner.name] = np.asarray(outer.numpy())
            except Exception:  # noqa: BLE001 -- a resource handle (a variable tf2onnx froze) has no value here
                continue
    for name, value in values.items():
        proto.graph.initializer.append(numpy_helper.from_array(value, name))
        proto.graph.input.remove(inputs[name])


def write_gradcam_graph(model, layer: str, path: str | os.PathLike, *, opset: int = 17) -> dict:
    """``cam.onnx`` for ``layer`` of a contract model; returns ``{"inputs", "outputs", "opset"}``.

    Raises:
        CamGraphError: a gradient that does not convert (its op named) or a graph ONNX Runtime
            refuses.
    """
    tf2onnx = require("tf2onnx", purpose="ONNX export")
    onnx = require("onnx", purpose="ONNX export")
    _problems.clear()
    try:
        fn = gradcam_function(model, layer)
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=opset)
    except Exception as exc:  # tf2onnx and TensorFlow raise many kinds
        if _problems:
            raise CamGraphError(f"the Grad-CAM graph at layer {layer!r} cannot be written: "
                                f"{'; '.join(dict.fromkeys(_problems))}") from None
        raise CamGraphError(f"the Grad-CAM graph at layer {layer!r} did not convert ({type(exc).__name__}: "
                            f"{str(exc)[:300]})") from None
    if _problems:
        raise CamGraphError(f"the Grad-CAM graph at layer {layer!r} cannot be written: "
                            f"{'; '.join(dict.fromkeys(_problems))}")
    _captures_as_constants(proto, fn)
    known = {s.domain: s.version for s in proto.opset_import}
    unknown = sorted({n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")
                      and not onnx.defs.has(n.op_type, known.get("", opset))})
    if unknown:
        raise CamGraphError(f"the Grad-CAM graph at layer {layer!r} has TensorFlow ops ONNX does not define: "
                            f"{', '.join(unknown)} (their gradients are not in this exporter's overrides)")
    ins, outs = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    rename_outputs(proto, [CAM])
    if ins != [IMAGE, CLASS] or len(outs) != 1:
        raise CamGraphError(f"the Grad-CAM graph has inputs {ins} and outputs {outs}; expected "
                            f"[{IMAGE}, {CLASS}] -> [{CAM}]")
    path = Path(path)
    with atomic_path(path, suffix=".onnx") as tmp:
        onnx.save(proto, str(tmp))
    return {"inputs": {IMAGE: "float32 (N, H, W, 3)", CLASS: "int64 (N,)"}, "outputs": {CAM: "float32 (N, h, w)"},
            "opset": opset}


def check_graph(model, plan, path: str | os.PathLike, x, *, batch: int = 32) -> dict:
    """The written graph's maps against Keras's Grad-CAM (:func:`transfer.analysis.gradcam.compute_maps`,
    method gradcam, same layer) on images ``x``, both through :func:`transfer.maps.to_input_maps`:
    the per-image Pearson correlation (median, minimum) and the largest difference.

    Raises:
        CamGraphError: ONNX Runtime cannot run it, or the median correlation is below :data:`MIN_PEARSON`.
    """
    x = np.asarray(x, np.float32)
    ref, _, cls = compute_maps(model, x, method="gradcam", layer=plan.layer)
    try:
        sess, _ = make_session(path, "cpu")
        raw = np.concatenate([sess.run([CAM], {IMAGE: x[i:i + batch], CLASS: cls[i:i + batch].astype(np.int64)})[0]
                              for i in range(0, len(x), batch)]) if len(x) else np.zeros((0, *plan.shape[:2]))
    except Exception as exc:  # noqa: BLE001 -- ONNX Runtime raises its own kinds
        raise CamGraphError(f"ONNX Runtime cannot run the Grad-CAM graph at layer {plan.layer!r} "
                            f"({type(exc).__name__}: {str(exc)[:300]})") from None
    got = cammaps.to_input_maps(raw, x.shape[1:3], geometry=plan.geometry)
    # an empty map agrees only with another empty one
    r = [v if (v := cammaps.map_pearson(a, b)) is not None else float(np.allclose(a, b, atol=1e-6))
         for a, b in zip(ref, got)]
    out = {"images": int(len(x)), "pearson_median": float(np.median(r)) if r else float("nan"),
           "pearson_min": float(min(r)) if r else float("nan"),
           "max_abs_diff": float(np.abs(ref - got).max()) if len(x) else 0.0, "min_pearson": MIN_PEARSON,
           "against": "Keras Grad-CAM (transfer gradcam --method gradcam) at the same layer"}
    if r and out["pearson_median"] < MIN_PEARSON:
        raise CamGraphError(f"the Grad-CAM graph at layer {plan.layer!r} gives other maps than Keras: median Pearson "
                            f"{out['pearson_median']:.4f} over {len(r)} verification images (needs {MIN_PEARSON})")
    return out


__all__ = ["CAM", "CAM_GRAPH", "CLASS", "IMAGE", "MIN_PEARSON", "check_graph", "METHOD", "OVERRIDES", "CamGraphError", "gradcam_function", "write_gradcam_graph"]
