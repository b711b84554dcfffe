"""Grad-CAM, Grad-CAM++ and Score-CAM heatmaps, their flags, overlays and faithfulness.

The model is a flat contract model (docs/design.md): the target layer's output and
the model's output come out of one ``keras.Model(model.inputs, [layer.output, ...])``,
so there is no nested model to disconnect and every layer with a 4-D spatial output
(``(None, h, w, k)``) can be explained. The class score differentiated is the logit of
the ``probs`` Dense layer (its input times its kernel plus bias), as in the Grad-CAM
paper and pytorch-grad-cam; a model without a Dense ``probs`` layer falls back to the
log of the probability.

What a map is, how it is drawn, flagged (``empty``, ``border``) and tested is defined once,
TensorFlow-free, in :mod:`transfer.maps` (ReLU, bilinear upsampling to the input, divided
by the maximum; a map without positive evidence is all zeros and flagged ``empty``).

The target layer: ``--layer``, else the trial's ``gradcam_layer``, unless that layer's map
has fewer than :data:`MIN_MAP_SIDE` cells on its shorter side at this input size
(MobileNetV2's ``out_relu`` is 2 x 2 at 64 px: four quadrants cannot say where a shape is);
then the last layer that has them (padding layers excluded), with a note.

Faithfulness (:func:`transfer.faithfulness.faithfulness`, numbers explained there): deletion and
insertion areas (Petsiuk et al. 2018) and ROAD with imputed removal (Rong et al. 2022),
each for the map and for a control with a map's smoothness but none of this image's
information (the median over maps of images of another class, same method). Per method, over
the measurable images (where the removal baseline alone takes away at least half of the
class probability above chance): the mean of each number for the map and the control, the share of images where
the map beats its control, a sign test, and the verdict; :func:`rank_methods` orders the methods by it, and the report
leads with the one that beats its control.

Example::

    from transfer.analysis.gradcam import explain_run
    res = explain_run("runs/digits", samples=16, methods=["gradcam", "gradcam++"])
    print(res.table)
    res.ranking          # e.g. ['gradcam++', 'gradcam'] (beats its control first)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import maps as cammaps
from .. import tables
from .._lazy import import_keras, import_tensorflow
from ..data.stream import decode_batches, decode_item, iter_inputs
from ..faithfulness import Faithfulness, faithfulness, per_image_rows, summarize_faithfulness
from ..errors import ConfigError, DataError, ModelError, RunFolderError
from ..fsutil import atomic_path, read_json, write_json_atomic
from ..maps import overlay  # noqa: F401  (the one overlay; re-exported for callers of this module)
from ..maps_config import DEFAULT_CONTROLS, DEFAULT_STEPS, ROAD_AUTO_PIXELS, ROAD_CHOICES, FaithOptions  # noqa: F401
from ..options import check_choices, replace
from ..plots import figure, save_figure
from ..progress import ProgressLike, as_progress
from ..runfolder import RunFolder
from .gradcam_config import ALIASES, METHODS, CamOptions, GradcamConfig, with_options

#: a default target layer whose map has fewer cells than this on its shorter side is replaced
MIN_MAP_SIDE = 6

#: Most cells a grid.png shows (every overlay is still written on its own).
MAX_GRID = 48


# --------------------------------------------------------------------------- layers


def spatial_layers(model) -> list[str]:
    """Names of the layers whose output is 4-D ``(None, h, w, k)`` (Grad-CAM candidates), graph order.

    Example::

        spatial_layers(model)[-2:]    # ['conv2', 'conv2_drop'] for arc2
    """
    keras = import_keras()
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # layer used more than once / no output
            continue
        if len(shape) == 4:
            out.append(layer.name)
    return out


def _map_side(model, name: str) -> int:
    shape = model.get_layer(name).output.shape
    return min(int(shape[1] or 0), int(shape[2] or 0))


def _fine_enough(model, preferred: str) -> str:
    """``preferred``, or the last spatial layer after none of the padding layers whose map has
    at least :data:`MIN_MAP_SIDE` cells a side when ``preferred``'s has fewer."""
    keras = import_keras()
    if _map_side(model, preferred) >= MIN_MAP_SIDE:
        return preferred
    cands = [n for n in spatial_layers(model)
             if not isinstance(model.get_layer(n), (keras.layers.ZeroPadding2D, keras.layers.Cropping2D))
             and _map_side(model, n) >= MIN_MAP_SIDE]
    return cands[-1] if cands else preferred


def resolve_layer(model, name: str | None = None, *, default: str | None = None, fine: bool = False):
    """The target layer: ``name``, else ``default`` (the registry's), else the last spatial layer.

    With ``fine`` and no ``name``, a default whose map has fewer than :data:`MIN_MAP_SIDE`
    cells on its shorter side is replaced by the last (non-padding) layer that has them.

    Raises:
        ModelError: the model has no layer of that name, or its output is not 4-D
            spatial; the message names the candidate layers.

    Example::

        resolve_layer(model, "conv2").name    # 'conv2'
    """
    cands = spatial_layers(model)
    if not cands:
        raise ModelError(f"model {model.name!r} has no layer with a spatial (4-D) output to explain")
    shown = ", ".join(cands[-12:]) + (f" (and {len(cands) - 12} earlier)" if len(cands) > 12 else "")
    want = name or default
    if not want or (name is None and want not in {layer.name for layer in model.layers}):
        # no default, or a stale one: the last spatial layer
        return model.get_layer(_fine_enough(model, cands[-1]) if fine else cands[-1])
    names = {layer.name for layer in model.layers}
    if want not in names:
        raise ModelError(
            f"the model has no layer named {want!r}",
            hint=f"pick a layer that has a spatial output, e.g. one of: {shown}", option="layer",
        )
    if want not in cands:
        shape = tuple(model.get_layer(want).output.shape)
        raise ModelError(
            f"layer {want!r} has output shape {shape}, not a spatial map (None, h, w, channels); "
            f"Grad-CAM needs a convolutional layer",
            hint=f"pick one of: {shown}", option="layer",
        )
    if fine and name is None:
        want = _fine_enough(model, want)
    return model.get_layer(want)


# --------------------------------------------------------------------------- geometry


def _axis_step(op, axis: int, size_in: int) -> tuple[float, float] | None:
    """``(s, o)`` of one layer along one axis: output cell ``r`` is centred on input index ``s * r + o``;
    ``None`` when the layer changes the size in a way this does not know."""
    keras = import_keras()
    L = keras.layers
    if isinstance(op, L.ZeroPadding2D):
        return 1.0, -float(op.padding[axis][0])
    if isinstance(op, L.Cropping2D):
        return 1.0, float(op.cropping[axis][0])
    if isinstance(op, (L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D, L.MaxPooling2D, L.AveragePooling2D)) \
            and not isinstance(op, L.Conv2DTranspose):
        k = op.pool_size[axis] if hasattr(op, "pool_size") else op.kernel_size[axis]
        d = op.dilation_rate[axis] if hasattr(op, "dilation_rate") else 1
        s = op.strides[axis]
        k_eff = (k - 1) * d + 1
        pad_before = 0
        if op.padding == "same":  # TensorFlow's: the extra row / column goes after
            out = -(-size_in // s)
            pad_before = max((out - 1) * s + k_eff - size_in, 0) // 2
        return float(s), (k_eff - 1) / 2 - pad_before
    return None


def layer_geometry(model, layer_name: str):
    """Where the cells of a layer's map sit on the input (:data:`transfer.maps.Geometry`), from the graph.

    Walks from the layer back to the input through its first inputs, composing each
    convolution's and pooling's stride and offset (``valid`` convolutions shrink the map, and
    TensorFlow's ``same`` padding with stride 2 puts the extra row after: MobileNetV2's cells
    at stride 8 are centred 3.5 px lower and further right than an even tiling would put
    them). Layers that keep the spatial size (normalization, activations, adds, 1x1 and
    stride-1 odd ``same`` convolutions) change nothing.

    Returns:
        ``((a_y, b_y), (a_x, b_x))``: cell ``r`` is centred at input coordinate ``a * r + b``
        (pixel ``p`` spans ``[p, p + 1)``); ``None`` when a layer on the way is not understood
        (the map then tiles the input evenly).

    Example::

        layer_geometry(arc2_at_32px, "conv2")     # ((2.0, 2.5), (2.0, 2.5))
    """
    keras = import_keras()
    op = model.get_layer(layer_name)
    axes = [[1.0, 0.0], [1.0, 0.0]]  # input index of cell r = a * r + b, per axis
    seen = 0
    while not isinstance(op, keras.layers.InputLayer):
        seen += 1
        if seen > 10_000:
            return None
        inp = op.input[0] if isinstance(op.input, (list, tuple)) else op.input
        out_shape, in_shape = tuple(op.output.shape), tuple(inp.shape)
        if len(in_shape) != 4 or len(out_shape) != 4:
            return None
        for axis in (0, 1):
            step = _axis_step(op, axis, int(in_shape[1 + axis]))
            if step is None:
                if out_shape[1 + axis] != in_shape[1 + axis]:
                    return None
                continue
            s, o = step
            a, b = axes[axis]
            axes[axis] = [s * a, s * b + o]
        op = inp._keras_history.operation
    return tuple((float(a), float(b) + 0.5) for a, b in axes)


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


# --------------------------------------------------------------------------- pictures


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _save_grid(cells: list[np.ndarray], captions: list[str], path: Path, title: str,
               flags: Sequence[str] = ()) -> None:
    total = len(cells)
    flags = list(flags) or [""] * total
    if total > MAX_GRID:
        cells, captions, flags = cells[:MAX_GRID], captions[:MAX_GRID], flags[:MAX_GRID]
        title += f" (first {MAX_GRID} of {total} images)"
    n = len(cells)
    cols = min(4, max(1, n))
    rows = -(-n // cols)
    with figure(rows, cols, figsize=(2.8 * cols, 3.0 * rows + 0.4), squeeze=False, layout="constrained",
                purpose="Grad-CAM grids") as (fig, axes):
        for ax in axes.ravel():
            ax.axis("off")
        for ax, cell, cap, flag in zip(axes.ravel(), cells, captions, flags):
            ax.imshow(cell)
            ax.set_title(cap, fontsize=9, color="#c00000" if flag else "black")
        fig.suptitle(title, fontsize=10)
        save_figure(fig, path)


# --------------------------------------------------------------------------- run folder


@dataclass
class GradcamResult:
    """What :func:`explain_run` wrote."""

    out_dir: Path
    trial: str
    layer: str
    methods: list[str]
    images: list[str]
    faithfulness: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    layer_note: str | None = None

    @property
    def table(self) -> str:
        """The faithfulness table as text (also printed by the CLI)."""
        return faithfulness_table(self.faithfulness)

    @property
    def ranking(self) -> list[str]:
        """The methods computed, best first (:func:`rank_methods`)."""
        return rank_methods(self.faithfulness)

    @property
    def verdict(self) -> list[str]:
        """The sentences that say which method to trust (:func:`verdict_lines`)."""
        return verdict_lines(self.faithfulness)


#: the faithfulness numbers shown, with their names in tables
_SHOWN = (("deletion_auc", "deletion AUC"), ("insertion_auc", "insertion AUC"), ("road_morf", "ROAD MoRF"),
          ("road_lerf", "ROAD LeRF"))


def _current(faith: dict) -> dict:
    """The entries of a merged faithfulness.json written by this version (with ``metrics``)."""
    return {m: r for m, r in faith.items() if isinstance(r, dict) and isinstance(r.get("metrics"), dict)}


def rank_methods(faith: dict) -> list[str]:
    """Methods best first: those that beat their control, then by ``min_share_deletion_road`` (the smaller of
    the deletion and ROAD-MoRF shares of images where the map beats its control).

    Example::

        rank_methods(read_json("RUN/gradcam/arc2-t100/faithfulness.json"))    # ['scorecam', 'gradcam++', 'gradcam']
    """
    cur = _current(faith)
    return sorted(cur, key=lambda m: (not cur[m].get("beats_control"), -(cur[m].get("min_share_deletion_road") or 0.0),
                                      METHODS.index(m) if m in METHODS else len(METHODS), m))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


#: what a cell of the faithfulness table says (printed with it)
TABLE_LEGEND = ("each cell: the map's number / its control's, the median over maps of images of another class "
                "(share of measurable images where the map beats it); deletion AUC and ROAD MoRF: lower is better, "
                "insertion AUC and ROAD LeRF: higher")


def faithfulness_rows(faith: dict) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)``, best method first: per number ``map / control (share of images where the map beats it)``
    (:data:`TABLE_LEGEND`)."""
    cur = _current(faith)
    methods = rank_methods(faith)
    if not methods:
        return [], []
    header = ["method", "images", "empty / border maps"] + [name for _, name in _SHOWN] + ["beats its control"]
    rows = []
    for m in methods:
        r = cur[m]
        fl = r.get("flags", {})
        n, k = r.get("images", "-"), r.get("measurable", r.get("images", "-"))
        row = [m, str(n) if k == n else f"{k} of {n} measurable", f"{fl.get('empty', 0)} / {fl.get('border', 0)}"]
        for k, _ in _SHOWN:
            v = r["metrics"].get(k)
            row.append("-" if not v else f"{v['map']:.3f} / {v['control']:.3f} ({_pct(v['map_beats_control'])})")
        row.append("yes" if r.get("beats_control") else "no")
        rows.append(row)
    return header, rows


def faithfulness_table(faith: dict, *, markdown: bool = False) -> str:
    """The faithfulness results as a text (or Markdown) table, best method first.

    Example::

        print(faithfulness_table(read_json("RUN/gradcam/arc2-t000/faithfulness.json")))
    """
    header, rows = faithfulness_rows(faith)
    if not header:
        return "(no faithfulness results of this version; run transfer gradcam again)"
    align = "l" + "r" * (len(header) - 1)
    return tables.markdown(header, rows, align=align) if markdown else tables.text(header, rows).rstrip("\n")


def _shares(r: dict) -> str:
    m = r["metrics"]
    parts = [f"{name} in {_pct(m[k]['map_beats_control'])}" for k, name in (("deletion_auc", "deletion"),
                                                                             ("road_morf", "ROAD")) if k in m]
    n, k = r.get("images"), r.get("measurable", r.get("images"))
    tail = f" of the {k} measurable images" if k != n else f" of the {n} images"
    return " and on ".join(parts) + tail


def verdict_lines(faith: dict) -> list[str]:
    """Sentences for people: which method's maps to trust on this model, which are no better than
    their control, and how many maps are flagged.

    Example::

        verdict_lines(faith)[0]
        # 'Leads with scorecam: its maps beat another image's map on deletion in 88 % and on ROAD in 90 % ...'
    """
    cur = _current(faith)
    ranked = rank_methods(faith)
    if not ranked:
        return []
    out = []
    good = [m for m in ranked if cur[m].get("beats_control")]
    if good:
        r = cur[good[0]]
        ps = ", ".join(f"{v['sign_test_p']:.2g}" for k, v in r["metrics"].items() if k in ("deletion_auc", "road_morf"))
        out.append(f"Leads with {good[0]}: its maps beat another image's map on {_shares(r)} (sign tests p = {ps}).")
    else:
        out.append("No method's maps beat another image's map on this model: none of these maps shows what the "
                   "model uses (try another --layer, or more --samples if there are few images).")
    r0 = cur[ranked[0]]
    skipped = r0.get("images", 0) - r0.get("measurable", r0.get("images", 0))
    if skipped:
        out.append(f"{skipped} of {r0.get('images')} images are not measurable: the removal baseline alone keeps at "
                   f"least half of their class probability above chance, so no removal can show what the model "
                   "needs there "
                   "(listed in faithfulness.json, 'measurable' in maps.csv); the shares count the others.")
    for m in ranked:
        r = cur[m]
        if m not in good:
            out.append(f"{m}: no better than its control (the map beats another image's map on {_shares(r)}); "
                       "its maps are not an explanation of this model.")
        fl = r.get("flags", {})
        if fl.get("empty") or fl.get("border"):
            out.append(f"{m}: {fl.get('empty', 0)} of {r.get('images')} maps empty (no positive evidence), "
                       f"{fl.get('border', 0)} with most of their mass on the image border; marked in the grid.")
    return out


def _image_files(item: str | os.PathLike) -> list[Path]:
    """An image file, or the image files of a folder (recursively, sorted)."""
    p = Path(item)
    if p.is_dir():
        files = [Path(q) for q, err in iter_inputs([p], recursive=True) if err is None]
        if not files:
            raise ConfigError(f"image folder {p} holds no image files", option="images")
        return files
    if p.is_file():
        return [p]
    raise ConfigError(f"image not found: {p}", hint="give image files or folders", option="images")


def _collect_images(run, images: Sequence[str | os.PathLike] | None, samples: int, seed: int,
                    fold: int | None = None):
    """[(path, true label or None)]: the given images (labelled by their folder's name when it is
    a class), or ``samples`` random test (else val) images."""
    if images:
        names = run.class_names
        return [(q, names.index(q.parent.name) if q.parent.name in names else None)
                for item in images for q in _image_files(item)]
    paths, labels = run.split_paths("test")
    if not paths:
        paths, labels = run.split_paths("val", fold=fold)  # a k-fold trial's own held-out images
    if not paths:
        raise RunFolderError(f"{run.path} has no test or val images to explain", hint="give image files to explain")
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(paths), size=min(samples, len(paths)), replace=False))
    return [(paths[i], labels[i]) for i in idx]


def _decode(items: list, size: tuple[int, int], p, *, recipe: dict | None) -> tuple[np.ndarray, list]:
    """Pixels of the items at the model's size with the run's pixel ``recipe``; a bad file is skipped
    with a note, as training and infer do."""
    pixels, kept = [], []
    start = 0
    for pb in decode_batches([q for q, _ in items], size, batch=64, recipe=recipe):
        for i, it in enumerate(pb.items):
            if it.error is not None:
                p.say(f"skipped {it.path}: {it.error}")
        pixels.append(pb.x)
        kept += [items[start + i] for i in pb.ok_index]
        start += len(pb.items)
    if not kept:
        raise DataError("none of the images to explain could be read (see the lines above)",
                        hint="explain other images", option="images")
    return np.concatenate(pixels), kept


def _parse_class(cls, names: list[str]) -> int | None:
    if cls is None or cls == "":
        return None
    s = str(cls)
    if s in names:
        return names.index(s)
    try:
        i = int(s)
    except ValueError:
        i = None
    if i is not None and 0 <= i < len(names):
        return i
    raise ConfigError(f"unknown class {cls!r}; accepted: a class name ({', '.join(names[:20])}"
                      f"{', ...' if len(names) > 20 else ''}) or an index 0..{len(names) - 1}", option="class_")


def parse_methods(value: str | Sequence[str] | None) -> list[str]:
    """CAM methods (a list, or one comma-separated string; ``all`` = every method), order kept.

    Example::

        parse_methods(["all"])     # ['gradcam', 'gradcam++', 'scorecam']
    """
    if value is None:
        return ["gradcam"]
    return check_choices(value, METHODS, "CAM method", option="method", aliases=ALIASES, every="all")


@dataclass
class _Target:
    """What one explanation run explains: the trial, its model and layer, the images and their pixels."""

    run: object
    trial: object
    model: object
    layer: str
    items: list
    x: np.ndarray
    explained: int | None
    out_dir: Path
    layer_note: str | None = None


def _native_pixels(path, fallback: np.ndarray) -> np.ndarray:
    """The image at its own size (for a legible overlay); the model-size pixels if it cannot be read now."""
    item = decode_item(str(path), None, recipe=None)  # at its own size: every recipe decodes the same pixels
    return item.pixels if item.pixels is not None else fallback.astype(np.uint8)


def _grid_title(meth: str, tg: _Target, faith: dict) -> str:
    title = f"{meth} - {tg.trial.name} - layer {tg.layer}"
    if faith.get("beats_control"):
        return title + f"\nbeats another image's map on {_shares(faith)}"
    return title + "\nNO BETTER THAN ANOTHER IMAGE'S MAP: not an explanation of this model"


def _write_maps_csv(path: Path, tg: _Target, res: Faithfulness, probs, cls) -> None:
    """One row per image: the file, its classes, the map's flag and every number for the map and its control."""
    names = tg.run.class_names
    header, rows = per_image_rows(res)
    lead = ["image", "true", "predicted", "explained"]
    out = []
    for (path_, lab), row in zip(tg.items, rows):
        i = row[0]
        ctrl = ";".join(str(tg.items[j][0]) if j >= 0 else "shifted map" for j in res.control_source[i])
        out.append([str(path_), names[lab] if lab is not None else "", names[int(probs[i].argmax())],
                    names[int(cls[i])]] + row[:3] + [ctrl] + row[4:])
    tables.write_csv(path, lead + header[:3] + ["control_maps_of"] + header[4:], out)


def _explain_method(tg: _Target, meth: str, res: "GradcamResult", *, save_maps: bool, faith_opts: FaithOptions,
                    scorecam_channels, p) -> dict:
    """Maps, flags, faithfulness, overlays, grid and maps.csv of one method, in ``<out>/<method>/``."""
    names = tg.run.class_names
    p.say(f"{meth}: {len(tg.items)} image(s), trial {tg.trial.name}, layer {tg.layer}")
    maps, probs, cls = compute_maps(tg.model, tg.x, CamOptions(method=meth, layer=tg.layer,
                                                               scorecam_channels=scorecam_channels),
                                    classes=tg.explained, progress=p)
    p.say(f"{meth}: faithfulness (deletion, insertion, ROAD; each against another image's map)")
    faith, curves = map_faithfulness(tg.model, tg.x, maps, cls, faith_opts)
    flags = faith["flags"]["per_image"]
    pred = probs.argmax(axis=1)
    mdir = tg.out_dir / meth
    cells, caps = [], []
    for k, ((path, lab), m) in enumerate(zip(tg.items, maps)):
        stem = f"{k:03d}_{Path(path).stem}"
        ov = cammaps.mark_flag(overlay(_native_pixels(path, tg.x[k]), m), flags[k])
        _save_png(ov, mdir / f"{stem}.png")
        res.files.append(mdir / f"{stem}.png")
        if save_maps:
            with atomic_path(mdir / f"{stem}.npy", suffix=".npy") as tmp:
                np.save(tmp, m.astype(np.float32))
            res.files.append(mdir / f"{stem}.npy")
        cap = f"true {names[lab] if lab is not None else '?'} / pred {names[pred[k]]} ({probs[k, pred[k]]:.2f})"
        if tg.explained is not None:
            cap += f"\nexplains {names[cls[k]]} ({probs[k, cls[k]]:.2f})"
        if flags[k]:
            cap += "\n" + cammaps.FLAG_TEXT[flags[k]]
        cells.append(ov)
        caps.append(cap)
    _save_grid(cells, caps, mdir / "grid.png", _grid_title(meth, tg, faith), flags)
    res.files.append(mdir / "grid.png")
    _write_maps_csv(mdir / "maps.csv", tg, curves, probs, cls)
    res.files.append(mdir / "maps.csv")
    geometry = layer_geometry(tg.model, tg.layer)
    faith.update({"method": meth, "trial": tg.trial.name, "layer": tg.layer,
                  "layer_geometry": None if geometry is None else {"y": list(geometry[0]), "x": list(geometry[1])},
                  "classes": "predicted" if tg.explained is None else names[tg.explained]})
    if tg.layer_note:
        faith["layer_note"] = tg.layer_note
    write_json_atomic(mdir / "faithfulness.json", faith)
    res.files.append(mdir / "faithfulness.json")
    return faith


def explain_run(
    run_dir: str | os.PathLike,
    config: GradcamConfig | None = None,
    *,
    progress: ProgressLike = None,
    **options,
) -> GradcamResult:
    """Explain images of a run's trial; write overlays, grids, flags and faithfulness numbers.

    Output: ``RUN/gradcam/<trial>/<method>/`` with one ``<k>_<stem>.png`` overlay per
    image (flagged maps framed; ``.npy`` raw map at input resolution next to it with
    ``save_maps``), ``grid.png`` captioned true / pred / probability / flag and titled with the
    method's verdict, ``maps.csv`` (one row per image: flag and every faithfulness number for
    the map and its control) and ``faithfulness.json``; and ``RUN/gradcam/<trial>/faithfulness.json``
    merging every method computed so far (:func:`rank_methods` orders them).

    Args:
        run_dir: the run folder.
        config: the options (:class:`~transfer.analysis.gradcam_config.GradcamConfig`;
            ``options`` are laid over it by name, the faithfulness ones flat): ``trial``
            (``best`` or a name); ``images``, files or folders (default: ``samples`` random
            test images; the sign tests need about 10 or more to tell a method from its
            control); ``methods`` (:data:`METHODS` or ``all``); ``layer`` (default the trial's
            ``gradcam_layer``, or a finer layer when that one's map is coarser than
            :data:`MIN_MAP_SIDE` cells; ``layer_note`` says so); ``class_`` explained (name or
            index; default the predicted class); ``save_maps`` (also the raw maps as ``.npy``);
            ``faith`` (:class:`~transfer.maps_config.FaithOptions`: curve steps, removal
            baseline, control(s), ROAD, seed); ``scorecam_channels`` (Score-CAM: score only
            this many channels; default all).
        progress: a :class:`~transfer.progress.Progress`, a line callable or ``None``; a bar
            per method over the images.

    Returns:
        A :class:`GradcamResult`.

    Raises:
        RunFolderError: missing / incomplete run, unknown or unfinished trial.
        ModelError: bad layer (the candidates are named).
        ConfigError: bad method, class, samples, image paths, steps, baseline, control or road.

    Example::

        explain_run("runs/digits", methods=["gradcam", "scorecam"], samples=16).verdict[0]
    """
    cfg = with_options(config, options)
    p = as_progress(progress)
    meths, faith_opts, seed = list(cfg.methods), cfg.faith, cfg.faith.seed
    run = RunFolder(run_dir)
    t = run.trial(cfg.trial)
    explained = _parse_class(cfg.class_, run.class_names)
    items = _collect_images(run, cfg.images or None, cfg.samples, seed, fold=t.fold)
    model = t.load_model()
    default = t.meta.get("gradcam_layer")
    layer = cfg.cam.layer
    tgt = resolve_layer(model, layer, default=default, fine=True)
    note = None
    if layer is None and default and tgt.name != default and default in {lay.name for lay in model.layers}:
        side = _map_side(model, default)
        note = (f"layer {default} gives a {side} x {side} map at this input size, too coarse to say where "
                f"(fewer than {MIN_MAP_SIDE} cells a side): explaining {tgt.name} "
                f"({_map_side(model, tgt.name)} cells a side) instead; --layer chooses another")
        p.say(note)
    x, items = _decode(items, t.image_size, p, recipe=run.recipe)
    tg = _Target(run, t, model, tgt.name, items, x, explained, run.gradcam_dir(t.name), note)
    merged_path = tg.out_dir / "faithfulness.json"
    merged = _current(read_json(merged_path)) if merged_path.is_file() else {}
    res = GradcamResult(out_dir=tg.out_dir, trial=t.name, layer=tgt.name, methods=meths,
                        images=[str(q) for q, _ in items], layer_note=note)
    for meth in meths:
        faith = _explain_method(tg, meth, res, save_maps=cfg.save_maps, faith_opts=faith_opts,
                                scorecam_channels=cfg.cam.scorecam_channels, p=p)
        merged[meth] = res.faithfulness[meth] = faith
    write_json_atomic(merged_path, merged)
    res.files.append(merged_path)
    return res
