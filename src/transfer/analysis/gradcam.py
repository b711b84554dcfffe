"""Grad-CAM, Grad-CAM++ and Score-CAM maps of a Keras model, and their faithfulness on it.

The model is a flat contract model (docs/design.md): the target layer's output and
the model's output come out of one ``keras.Model(model.inputs, [layer.output, ...])``,
so there is no nested model to disconnect and every layer with a 4-D spatial output
(``(None, h, w, k)``) can be explained (the layer and its cells' geometry:
:mod:`transfer.analysis.cam_layers`). The class score differentiated is the logit of
the ``probs`` Dense layer (its input times its kernel plus bias), as in the Grad-CAM
paper and pytorch-grad-cam; a model without a Dense ``probs`` layer falls back to the
log of the probability.

What a map is, how it is drawn, flagged (``empty``, ``border``) and tested is defined once,
TensorFlow-free, in :mod:`transfer.maps` (ReLU, bilinear upsampling to the input, divided
by the maximum; a map without positive evidence is all zeros and flagged ``empty``) and
:mod:`transfer.faithfulness` (deletion, insertion and ROAD against other images' maps);
:func:`map_faithfulness` runs the latter with this Keras model. ``transfer gradcam`` on a
run folder is :func:`transfer.analysis.gradcam_run.explain_run`; which method to trust is
:mod:`transfer.analysis.cam_verdict`.

Example::

    from transfer.analysis.gradcam import compute_maps, map_faithfulness
    maps, probs, cls = compute_maps(model, x, method="gradcam++")
    summary, _ = map_faithfulness(model, x, maps, cls)
    summary["beats_control"]          # True when the maps show what the model uses
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import maps as cammaps
from .._lazy import import_keras, import_tensorflow
from ..errors import ConfigError
from ..faithfulness import Faithfulness, faithfulness, summarize_faithfulness
from ..maps_config import ROAD_AUTO_PIXELS, FaithOptions
from ..options import check_choices, replace
from ..progress import ProgressLike, as_progress
from .cam_layers import layer_geometry, resolve_layer
from .gradcam_config import ALIASES, METHODS, CamOptions

# --------------------------------------------------------------------------- maps


class _Explainer:
    """One model + target layer: logits / probs and layer activations in one call."""

    def __init__(self, model, layer):
        keras = import_keras()
        self.tf = import_tensorflow()
        self.model = model
        self.layer = layer
        self.h, self.w = int(model.inputs[0].shape[1]), int(model.inputs[0].shape[2])
        probs = None
        try:
            probs = model.get_layer("probs")
        except ValueError:
            probs = None
        self.dense = probs if probs is not None and isinstance(probs, keras.layers.Dense) else None
        outs = [layer.output, model.outputs[0]]
        if self.dense is not None:
            outs.append(self.dense.input)
        inp = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        self.graph = keras.Model(inp, outs, name="gradcam_graph")
        self.geometry = layer_geometry(model, layer.name)

    def scores(self, x, classes):
        """(activations, probs, class score) of a batch; to be called under a tape."""
        tf = self.tf
        outs = self.graph(x, training=False)
        acts, probs = outs[0], outs[1]
        if self.dense is not None:
            logits = tf.matmul(outs[2], self.dense.kernel) + self.dense.bias
        else:
            logits = tf.math.log(probs + 1e-12)
        score = tf.gather(logits, classes, axis=1, batch_dims=1)
        return acts, probs, score

    def predict(self, x: np.ndarray, batch: int = 64) -> np.ndarray:
        return keras_predict(self.model, batch=batch)(x)


def keras_predict(model, *, batch: int = 128):
    """``x float32 (N, H, W, 3) -> probs float64 (N, C)`` of a Keras model, in batches, traced once."""
    tf = import_tensorflow()
    h, w, c = (int(d) for d in model.inputs[0].shape[1:])
    step = tf.function(lambda t: model(t, training=False), input_signature=[tf.TensorSpec((None, h, w, c), tf.float32)],
                       reduce_retracing=True)

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        out = [np.asarray(step(x[i:i + batch]), dtype=np.float64) for i in range(0, len(x), batch)]
        return np.concatenate(out) if out else np.zeros((0, int(model.outputs[0].shape[-1])))

    return predict


def _gradcam_batch(ex: _Explainer, x, classes, plus: bool):
    tf = ex.tf
    xt = tf.convert_to_tensor(x, dtype=tf.float32)
    ct = tf.convert_to_tensor(classes, dtype=tf.int32)
    with tf.GradientTape() as tape:
        acts, probs, score = ex.scores(xt, ct)
    grads = tape.gradient(score, acts)
    a = acts.numpy().astype(np.float64)
    g = np.zeros_like(a) if grads is None else grads.numpy().astype(np.float64)
    if not plus:
        weights = g.mean(axis=(1, 2))  # (N, K)
    else:
        # Grad-CAM++ (Chattopadhay et al. 2018, as in pytorch-grad-cam): closed-form alphas
        g2, g3 = g ** 2, g ** 3
        sum_a = a.sum(axis=(1, 2), keepdims=True)
        denom = 2 * g2 + sum_a * g3
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(denom != 0, g2 / np.where(denom != 0, denom, 1.0), 0.0)
        weights = (alpha * np.maximum(g, 0)).sum(axis=(1, 2))
    cam = np.einsum("nhwk,nk->nhw", a, weights)
    return cam, probs.numpy()


def _scorecam_one(ex: _Explainer, x1: np.ndarray, cls: int, batch: int = 64, max_channels: int | None = None):
    """Score-CAM (Wang et al. 2020) of one image: channel weights from masked-input scores.

    With ``max_channels``, only the channels with the highest mean activation are scored
    (the others get weight 0): one forward pass per scored channel is the cost.
    """
    tf = ex.tf
    acts = ex.graph(x1[None], training=False)[0].numpy()[0].astype(np.float32)  # (h, w, K)
    if max_channels is not None and acts.shape[-1] > max_channels:
        keep = np.sort(np.argsort(-acts.mean(axis=(0, 1)), kind="stable")[:max_channels])
        acts = acts[..., keep]
    k = acts.shape[-1]
    up = cammaps.upsample(acts[None], (ex.h, ex.w), geometry=ex.geometry)[0]  # (H, W, K), the maps' own resampling
    lo = up.reshape(-1, k).min(axis=0)
    hi = up.reshape(-1, k).max(axis=0)
    span = hi - lo
    ok = span > 1e-12
    masks = np.zeros_like(up)
    masks[..., ok] = (up[..., ok] - lo[ok]) / span[ok]
    scores = np.full(k, -np.inf)
    idx = np.flatnonzero(ok)
    for i in range(0, len(idx), batch):
        sel = idx[i:i + batch]
        xm = x1[None] * np.moveaxis(masks[..., sel], -1, 0)[..., None]
        _, _, s = ex.scores(tf.convert_to_tensor(xm, tf.float32),
                            tf.convert_to_tensor(np.full(len(sel), cls), tf.int32))
        scores[sel] = s.numpy()
    if not np.isfinite(scores).any():
        return np.zeros(acts.shape[:2], np.float32)
    sm = np.where(np.isfinite(scores), np.exp(scores - scores[np.isfinite(scores)].max()), 0.0)
    weights = sm / sm.sum()
    return np.einsum("hwk,k->hw", acts, weights)


def _explained_classes(classes, probs: np.ndarray) -> np.ndarray:
    """One class per image: the predicted ones (``None``), one for all, or one each; range-checked."""
    n, n_cls = probs.shape
    if classes is None:
        return probs.argmax(axis=1)
    try:
        cls = np.broadcast_to(np.asarray(classes, dtype=np.int64), (n,)).copy()
    except ValueError:
        raise ConfigError(f"classes must be one class index or one per image ({n}), "
                          f"got {np.shape(classes)}", option="class_") from None
    bad = [int(c) for c in cls if not 0 <= int(c) < n_cls]
    if bad:
        raise ConfigError(f"class index {bad[0]} is out of range; the model has {n_cls} classes (0..{n_cls - 1})",
                          option="class_")
    return cls


def compute_maps(
    model,
    images: np.ndarray,
    options: CamOptions | None = None,
    *,
    classes: int | Sequence[int] | None = None,
    progress: ProgressLike = None,
    **overlay,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heatmaps of ``images`` for the explained classes.

    Args:
        model: a flat Keras classifier (model contract), frozen or not.
        images: float32/uint8 ``(N, H, W, 3)`` RGB pixels in 0..255 at the model's input size.
        options: how (:class:`~transfer.analysis.gradcam_config.CamOptions`; ``overlay`` sets
            fields by name): the ``method`` (one of :data:`METHODS`), the target ``layer`` (any
            layer with a 4-D spatial output; ``default_layer``, the registry's / trial.json's,
            when it is None), ``batch_size`` images per gradient batch, and for Score-CAM
            ``scorecam_channels``: score at most this many channels (those with the highest
            mean activation; ``None`` = all, one forward pass each).
        classes: class explained, one int for all or one per image; ``None`` = predicted.
        progress: a :class:`~transfer.progress.Progress`, a line callable or ``None``; a bar
            over the images.

    Returns:
        ``(maps, probs, classes)``: maps float32 ``(N, H, W)`` in [0, 1]
        (:func:`transfer.maps.to_input_maps`: all zeros when there is no positive evidence),
        probs ``(N, C)``, explained classes ``(N,)``.

    Raises:
        ConfigError: unknown method, a class index out of range, images of the wrong shape.
        ModelError: the layer is missing or not spatial (the candidates are named).

    Example::

        maps, probs, cls = compute_maps(model, x, method="gradcam++")
        maps.shape == x.shape[:3]     # True
    """
    o = replace(options or CamOptions(), **overlay)
    method, batch_size, scorecam_channels = o.method, o.batch_size, o.scorecam_channels
    tgt = resolve_layer(model, o.layer, default=o.default_layer)
    ex = _Explainer(model, tgt)
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1:] != (ex.h, ex.w, 3) or len(x) == 0:
        raise ConfigError(f"images must have shape (N, {ex.h}, {ex.w}, 3) with N >= 1 for this model, got {x.shape}")
    probs = ex.predict(x)
    cls = _explained_classes(classes, probs)
    cams = []
    with as_progress(progress).bar(len(x), method, unit="images") as bar:
        for i in range(0, len(x), batch_size):
            xb, cb = x[i:i + batch_size], cls[i:i + batch_size]
            if method == "scorecam":
                cams.extend(_scorecam_one(ex, xb[j], int(cb[j]), max_channels=scorecam_channels)
                            for j in range(len(xb)))
            else:
                cam, _ = _gradcam_batch(ex, xb, cb, plus=(method == "gradcam++"))
                cams.extend(cam)
            bar.update(len(xb))
    if not cams:
        return np.zeros((0, ex.h, ex.w), np.float32), probs, cls
    return cammaps.to_input_maps(np.stack(cams), (ex.h, ex.w), geometry=ex.geometry), probs, cls


# --------------------------------------------------------------------------- faithfulness


def map_faithfulness(model, images: np.ndarray, maps: np.ndarray, classes: Sequence[int],
                     options: FaithOptions = FaithOptions()) -> tuple[dict, Faithfulness]:
    """:func:`transfer.faithfulness.faithfulness` of ``maps`` on a Keras model, summarized.

    Args:
        options: steps, baseline, control(s), ROAD (``auto``: on for inputs of at most
            :data:`ROAD_AUTO_PIXELS` pixels) and seed.

    Returns:
        ``(summary, curves)``: :func:`transfer.faithfulness.summarize_faithfulness` (plus ``"road"``:
        ``"on"`` / ``"off (...)"``) and the per-image :class:`transfer.faithfulness.Faithfulness`.

    Example::

        summary, _ = map_faithfulness(model, x, maps, cls, FaithOptions(steps=8))
        summary["metrics"]["deletion_auc"]["map_beats_control"]     # share of images
    """
    o = options
    x = np.asarray(images, dtype=np.float32)
    pixels = int(x.shape[1] * x.shape[2]) if x.ndim == 4 else 0
    do_road = o.road_runs(pixels)
    res = faithfulness(keras_predict(model), x, maps, classes, o)
    summary = summarize_faithfulness(res)
    summary["road"] = "on" if do_road else ("off" if o.road == "off" else
                                            f"off (auto: inputs over {ROAD_AUTO_PIXELS} pixels; --road on forces it)")
    return summary, res


def parse_methods(value: str | Sequence[str] | None) -> list[str]:
    """CAM methods (a list, or one comma-separated string; ``all`` = every method), order kept.

    Example::

        parse_methods(["all"])     # ['gradcam', 'gradcam++', 'scorecam']
    """
    if value is None:
        return ["gradcam"]
    return check_choices(value, METHODS, "CAM method", option="method", aliases=ALIASES, every="all")


__all__ = ["compute_maps", "keras_predict", "map_faithfulness", "parse_methods"]
