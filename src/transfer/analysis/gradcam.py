"""Grad-CAM, Grad-CAM++ and Score-CAM heatmaps, overlays and a faithfulness number.

The model is a flat contract model (docs/design.md): the target layer's output and
the model's output come out of one ``keras.Model(model.inputs, [layer.output, ...])``,
so there is no nested model to disconnect and every layer with a 4-D spatial output
(``(None, h, w, k)``) can be explained. The class score differentiated is the logit of
the ``probs`` Dense layer (its input times its kernel plus bias), as in the Grad-CAM
paper and pytorch-grad-cam; a model without a Dense ``probs`` layer falls back to the
log of the probability.

Maps are ReLU'd, resized to the input resolution (bilinear) and divided by their
maximum; a map without positive evidence is all zeros, never NaN.

Faithfulness (pytorch-grad-cam's "confidence drop" / deletion idea): for each image,
the explained class's probability before and after setting the most highlighted 10 /
20 / 50 % of the pixels to a baseline (the image's mean colour), against setting the
same number of random pixels. A faithful map makes the first drop larger.

Example::

    from transfer.analysis.gradcam import explain_run
    res = explain_run("runs/digits", samples=8, methods=["gradcam", "gradcam++"])
    print(res.table)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .._lazy import import_keras, import_tensorflow
from ..errors import ConfigError, DataError, ModelError, RunFolderError
from ..fsutil import atomic_path, read_json, write_json_atomic
from ..progress import ProgressLike, as_progress
from .options import check_choices, check_int

#: CAM methods.
METHODS = ("gradcam", "gradcam++", "scorecam")
#: other spellings of the methods
_ALIASES = {"gradcampp": "gradcam++", "grad-cam": "gradcam", "grad-cam++": "gradcam++", "score-cam": "scorecam"}

#: Shares of the pixels masked by the faithfulness metric.
DEFAULT_FRACTIONS = (0.1, 0.2, 0.5)

_BASELINES = ("mean", "zero")

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


def resolve_layer(model, name: str | None = None, *, default: str | None = None):
    """The target layer: ``name``, else ``default`` (the registry's), else the last spatial layer.

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
    if not want:
        return model.get_layer(cands[-1])
    names = {layer.name for layer in model.layers}
    if want not in names:
        if name is None:  # a stale default: fall back to the last spatial layer
            return model.get_layer(cands[-1])
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
    return model.get_layer(want)


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
        out = []
        for i in range(0, len(x), batch):
            out.append(np.asarray(self.model(x[i:i + batch], training=False), dtype=np.float64))
        return np.concatenate(out) if out else np.zeros((0, 0))


def _finish(cam: np.ndarray, h: int, w: int) -> np.ndarray:
    """ReLU, resize (N, h', w') -> (N, H, W) bilinear, divide by the max; zeros stay zeros."""
    tf = import_tensorflow()
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    cam = np.maximum(cam, 0.0)
    if cam.shape[1:] != (h, w):
        cam = tf.image.resize(cam[..., None], (h, w), method="bilinear").numpy()[..., 0]
    cam = np.maximum(cam, 0.0)
    peak = cam.reshape(len(cam), -1).max(axis=1) if cam.size else np.zeros(0)
    out = np.zeros_like(cam, dtype=np.float32)
    for i, m in enumerate(peak):
        if m > 1e-12 and np.isfinite(m):
            out[i] = cam[i] / m
    return np.clip(out, 0.0, 1.0)


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
    up = tf.image.resize(acts[None], (ex.h, ex.w), method="bilinear").numpy()[0]  # (H, W, K)
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
    *,
    method: str = "gradcam",
    layer: str | None = None,
    classes: int | Sequence[int] | None = None,
    default_layer: str | None = None,
    batch_size: int = 16,
    scorecam_channels: int | None = None,
    progress: ProgressLike = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heatmaps of ``images`` for the explained classes.

    Args:
        model: a flat Keras classifier (model contract), frozen or not.
        images: float32/uint8 ``(N, H, W, 3)`` RGB pixels in 0..255 at the model's input size.
        method: one of :data:`METHODS`.
        layer: target layer name (any layer with a 4-D spatial output).
        classes: class explained, one int for all or one per image; ``None`` = predicted.
        default_layer: used when ``layer`` is None (the registry's / trial.json's layer).
        batch_size: images per gradient batch.
        scorecam_channels: Score-CAM only: score at most this many channels (those with
            the highest mean activation); ``None`` = all (one forward pass each).
        progress: a :class:`~transfer.progress.Progress`, a line callable or ``None``; a bar
            over the images.

    Returns:
        ``(maps, probs, classes)``: maps float32 ``(N, H, W)`` in [0, 1] (all zeros
        when there is no positive evidence), probs ``(N, C)``, explained classes ``(N,)``.

    Raises:
        ConfigError: unknown method, a class index out of range, images of the wrong shape.
        ModelError: the layer is missing or not spatial (the candidates are named).

    Example::

        maps, probs, cls = compute_maps(model, x, method="gradcam++")
        maps.shape == x.shape[:3]     # True
    """
    if method not in METHODS:
        raise ConfigError(f"unknown CAM method {method!r}; accepted: {', '.join(METHODS)}", option="method")
    if scorecam_channels is not None:
        scorecam_channels = check_int(scorecam_channels, "scorecam channels", option="scorecam_channels")
    tgt = resolve_layer(model, layer, default=default_layer)
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
    return _finish(np.stack(cams), ex.h, ex.w), probs, cls


# --------------------------------------------------------------------------- faithfulness


def _mask(x: np.ndarray, order: np.ndarray, share: float, baseline: str) -> np.ndarray:
    h, w = x.shape[:2]
    n = int(round(share * h * w))
    out = x.copy()
    if n <= 0:
        return out
    fill = x.reshape(-1, 3).mean(axis=0) if baseline == "mean" else np.zeros(3, x.dtype)
    flat = out.reshape(-1, 3)
    flat[order[:n]] = fill
    return out


def _probs(model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """The model's probabilities on ``x`` in batches (float64)."""
    out = [np.asarray(model(x[i:i + batch], training=False), dtype=np.float64) for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 1))


def _masked_images(x, m, share: float, baseline: str, repeats: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Each image with its most highlighted ``share`` of pixels masked, and ``repeats`` random maskings of it."""
    n, h, w = m.shape
    cam_x, rnd_x = [], []
    for i in range(n):
        jitter = rng.random(h * w) * 1e-6  # random tie breaking (e.g. an all-zero map)
        order = np.argsort(-(m[i].reshape(-1) + jitter), kind="stable")
        cam_x.append(_mask(x[i], order, share, baseline))
        for _ in range(repeats):
            rnd_x.append(_mask(x[i], rng.permutation(h * w), share, baseline))
    return (np.stack(cam_x) if cam_x else x[:0]), (np.stack(rnd_x) if rnd_x else x[:0])


def _drops(base: np.ndarray, pc: np.ndarray, pr: np.ndarray) -> dict:
    """Mean drops of the explained class's probability: CAM masking vs random masking."""
    n = len(base)
    d_cam, d_rnd = base - pc, base - pr
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_c = np.where(base > 0, d_cam / base, 0.0)
        rel_r = np.where(base > 0, d_rnd / base, 0.0)

    def mean(v):
        return float(v.mean()) if n else None

    return {"cam": mean(d_cam), "random": mean(d_rnd), "gain": mean(d_cam - d_rnd), "cam_relative": mean(rel_c),
            "random_relative": mean(rel_r), "cam_wins": mean((d_cam > d_rnd).astype(np.float64))}


def confidence_drop(
    model,
    images: np.ndarray,
    maps: np.ndarray,
    classes: Sequence[int],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    baseline: str = "mean",
    random_repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Mean drop of the explained class's probability when masking the most highlighted pixels.

    Args:
        model: the classifier.
        images: ``(N, H, W, 3)`` pixels 0..255 at the model input size.
        maps: ``(N, H, W)`` heatmaps.
        classes: explained class per image.
        fractions: shares of the pixels masked (0 < f < 1).
        baseline: ``"mean"`` (each image's mean colour) or ``"zero"`` (black).
        random_repeats: random masks averaged per image and share.
        seed: seed of the random masks and of tie breaking.

    Returns:
        ``{"images": N, "baseline": ..., "base_confidence": mean p, "fractions": {"0.1":
        {"cam": drop, "random": drop, "gain": cam - random, "cam_relative": drop / p,
        "random_relative": ..., "cam_wins": share of images where cam drops more}}}``;
        drops are ``p(original) - p(masked)`` averaged over images.

    Raises:
        ConfigError: bad fractions or baseline, or shapes that do not match.

    Example::

        confidence_drop(model, x, maps, cls)["fractions"]["0.2"]["gain"] > 0    # True for a faithful map
    """
    if baseline not in _BASELINES:
        raise ConfigError(f"unknown masking baseline {baseline!r}; accepted: {', '.join(_BASELINES)}",
                          option="baseline")
    fr = [float(f) for f in fractions]
    if not fr or any(not 0.0 < f < 1.0 for f in fr):
        raise ConfigError(f"masking fractions must be between 0 and 1 (exclusive), got {list(fractions)!r}",
                          option="fractions")
    x = np.asarray(images, dtype=np.float32)
    m = np.asarray(maps, dtype=np.float32)
    cls = np.asarray(classes, dtype=np.int64)
    if x.shape[:3] != m.shape or len(cls) != len(x):
        raise ConfigError(f"images {x.shape}, maps {m.shape} and classes ({len(cls)}) do not match")
    rng = np.random.default_rng(seed)
    n = len(x)
    rows = np.arange(n)
    base = _probs(model, x)[rows, cls] if n else np.zeros(0)
    result = {"images": int(n), "baseline": baseline, "random_repeats": int(random_repeats),
              "base_confidence": float(base.mean()) if n else None, "fractions": {}}
    for f in fr:
        cam_x, rnd_x = _masked_images(x, m, f, baseline, random_repeats, rng)
        pc = _probs(model, cam_x)[rows, cls] if n else np.zeros(0)
        pr = (_probs(model, rnd_x)[np.arange(len(rnd_x)), np.repeat(cls, random_repeats)]
              .reshape(n, random_repeats).mean(axis=1)) if n else np.zeros(0)
        result["fractions"][f"{f:g}"] = _drops(base, pc, pr)
    return result


# --------------------------------------------------------------------------- pictures


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45, min_side: int = 128,
            max_side: int = 512) -> np.ndarray:
    """A jet-coloured heatmap blended over an RGB uint8 image (any size): uint8 RGB.

    Small images are first enlarged (nearest neighbour, integer factor) to at least
    ``min_side`` pixels so the overlay is legible, large ones reduced (bilinear, aspect
    kept) to at most ``max_side``; the map is resized (bilinear) to fit.

    Example::

        overlay(np.zeros((16, 16, 3), np.uint8), np.ones((16, 16))).shape     # (128, 128, 3)
    """
    from PIL import Image

    from ..plots import pyplot

    img = np.asarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    k = max(1, int(np.ceil(min_side / max(1, min(h, w)))))
    if k > 1:
        img = np.asarray(Image.fromarray(img).resize((w * k, h * k), Image.Resampling.NEAREST))
    elif max(h, w) > max_side:
        f = max_side / max(h, w)
        img = np.asarray(Image.fromarray(img).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                     Image.Resampling.BILINEAR))
    hh, ww = img.shape[:2]
    hm = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    hm = np.asarray(Image.fromarray(hm, mode="F").resize((ww, hh), Image.Resampling.BILINEAR))
    hm = np.clip(hm, 0.0, 1.0)
    jet = pyplot("Grad-CAM overlays").get_cmap("jet")(hm)[..., :3] * 255.0
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * jet
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _save_grid(cells: list[np.ndarray], captions: list[str], path: Path, title: str) -> None:
    from ..plots import figure, save_figure

    total = len(cells)
    if total > MAX_GRID:
        cells, captions = cells[:MAX_GRID], captions[:MAX_GRID]
        title += f" (first {MAX_GRID} of {total} images)"
    n = len(cells)
    cols = min(4, max(1, n))
    rows = -(-n // cols)
    with figure(rows, cols, figsize=(2.8 * cols, 3.0 * rows + 0.4), squeeze=False, layout="constrained",
                purpose="Grad-CAM grids") as (fig, axes):
        for ax in axes.ravel():
            ax.axis("off")
        for ax, cell, cap in zip(axes.ravel(), cells, captions):
            ax.imshow(cell)
            ax.set_title(cap, fontsize=9)
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

    @property
    def table(self) -> str:
        """The faithfulness table as text (also printed by the CLI)."""
        return faithfulness_table(self.faithfulness)


def faithfulness_rows(faith: dict) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)``: rows = method, columns = confidence drop (CAM / random) per masked share."""
    methods = [m for m in METHODS if m in faith] + [m for m in faith if m not in METHODS]
    if not methods:
        return [], []
    fr = list(next(iter(faith.values()))["fractions"])
    header = ["method", "images", "base p"] + [f"drop@{float(f) * 100:g}% cam / random" for f in fr]
    rows = []
    for m in methods:
        r = faith[m]
        row = [m, str(r["images"]), f"{r['base_confidence']:.3f}" if r["base_confidence"] is not None else "-"]
        for f in fr:
            v = r["fractions"].get(f, {})
            row.append("-" if v.get("cam") is None else f"{v['cam']:.3f} / {v['random']:.3f}")
        rows.append(row)
    return header, rows


def faithfulness_table(faith: dict, *, markdown: bool = False) -> str:
    """The faithfulness results as a text (or Markdown) table.

    Example::

        print(faithfulness_table(read_json("RUN/gradcam/arc2-t000/faithfulness.json")))
    """
    from .. import tables

    header, rows = faithfulness_rows(faith)
    if not header:
        return "(no faithfulness results)"
    align = "l" + "r" * (len(header) - 1)
    return tables.markdown(header, rows, align=align) if markdown else tables.text(header, rows).rstrip("\n")


def _image_files(item: str | os.PathLike) -> list[Path]:
    """An image file, or the image files of a folder (recursively, sorted)."""
    from ..data.stream import iter_inputs

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
    samples = check_int(samples, "samples", option="samples")
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
    from ..data.stream import decode_batches

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
    return check_choices(value, METHODS, "CAM method", option="method", aliases=_ALIASES, every="all")


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


def _native_pixels(path, fallback: np.ndarray) -> np.ndarray:
    """The image at its own size (for a legible overlay); the model-size pixels if it cannot be read now."""
    from ..data.stream import decode_item

    item = decode_item(str(path), None, recipe=None)  # at its own size: every recipe decodes the same pixels
    return item.pixels if item.pixels is not None else fallback.astype(np.uint8)


def _explain_method(tg: _Target, meth: str, res: "GradcamResult", *, save_maps: bool, fractions, baseline: str,
                    seed: int, scorecam_channels, p) -> dict:
    """Maps, overlays, grid and faithfulness of one method, in ``<out>/<method>/``."""
    names = tg.run.class_names
    p.say(f"{meth}: {len(tg.items)} image(s), trial {tg.trial.name}, layer {tg.layer}")
    maps, probs, cls = compute_maps(tg.model, tg.x, method=meth, layer=tg.layer, classes=tg.explained,
                                    scorecam_channels=scorecam_channels, progress=p)
    pred = probs.argmax(axis=1)
    mdir = tg.out_dir / meth
    cells, caps = [], []
    for k, ((path, lab), m) in enumerate(zip(tg.items, maps)):
        stem = f"{k:03d}_{Path(path).stem}"
        ov = overlay(_native_pixels(path, tg.x[k]), m)
        _save_png(ov, mdir / f"{stem}.png")
        res.files.append(mdir / f"{stem}.png")
        if save_maps:
            with atomic_path(mdir / f"{stem}.npy", suffix=".npy") as tmp:
                np.save(tmp, m.astype(np.float32))
            res.files.append(mdir / f"{stem}.npy")
        cap = f"true {names[lab] if lab is not None else '?'} / pred {names[pred[k]]} ({probs[k, pred[k]]:.2f})"
        if tg.explained is not None:
            cap += f"\nexplains {names[cls[k]]} ({probs[k, cls[k]]:.2f})"
        cells.append(ov)
        caps.append(cap)
    _save_grid(cells, caps, mdir / "grid.png", f"{meth} - {tg.trial.name} - layer {tg.layer}")
    res.files.append(mdir / "grid.png")
    faith = confidence_drop(tg.model, tg.x, maps, cls, fractions=fractions, baseline=baseline, seed=seed)
    faith.update({"method": meth, "trial": tg.trial.name, "layer": tg.layer,
                  "classes": "predicted" if tg.explained is None else names[tg.explained]})
    write_json_atomic(mdir / "faithfulness.json", faith)
    return faith


def explain_run(
    run_dir: str | os.PathLike,
    *,
    trial: str = "best",
    images: Sequence[str | os.PathLike] | None = None,
    samples: int = 8,
    methods: Sequence[str] | str = ("gradcam",),
    layer: str | None = None,
    class_: str | int | None = None,
    save_maps: bool = False,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    baseline: str = "mean",
    seed: int = 0,
    scorecam_channels: int | None = None,
    progress: ProgressLike = None,
) -> GradcamResult:
    """Explain images of a run's trial; write overlays, grids and faithfulness numbers.

    Output: ``RUN/gradcam/<trial>/<method>/`` with one ``<k>_<stem>.png`` overlay per
    image (``.npy`` raw map at input resolution next to it with ``save_maps``),
    ``grid.png`` captioned true / pred / probability and ``faithfulness.json``; and
    ``RUN/gradcam/<trial>/faithfulness.json`` merging every method computed so far.

    Args:
        run_dir: the run folder.
        trial: ``best`` or a trial name.
        images: image files or folders; default: ``samples`` random test images.
        samples: how many test images when ``images`` is not given.
        methods: names from :data:`METHODS` (or ``["all"]``).
        layer: target layer; default the trial's ``gradcam_layer``.
        class_: class explained (name or index); default the predicted class.
        save_maps: also write the raw maps as ``.npy``.
        fractions: masked shares of the faithfulness metric.
        baseline: masking value, ``mean`` or ``zero``.
        seed: sample choice and random masks.
        scorecam_channels: Score-CAM: score only this many channels (default all).
        progress: a :class:`~transfer.progress.Progress`, a line callable or ``None``; a bar
            per method over the images.

    Returns:
        A :class:`GradcamResult`.

    Raises:
        RunFolderError: missing / incomplete run, unknown or unfinished trial.
        ModelError: bad layer (the candidates are named).
        ConfigError: bad method, class, samples, image paths.

    Example::

        explain_run("runs/digits", methods=["gradcam", "scorecam"], samples=4).table
    """
    from ..runfolder import RunFolder

    p = as_progress(progress)
    meths = parse_methods(methods)
    run = RunFolder(run_dir)
    t = run.trial(trial)
    explained = _parse_class(class_, run.class_names)
    items = _collect_images(run, images, samples, seed, fold=t.fold)
    model = t.load_model()
    tgt = resolve_layer(model, layer, default=t.meta.get("gradcam_layer"))
    x, items = _decode(items, t.image_size, p, recipe=run.recipe)
    tg = _Target(run, t, model, tgt.name, items, x, explained, run.gradcam_dir(t.name))
    merged_path = tg.out_dir / "faithfulness.json"
    merged = read_json(merged_path) if merged_path.is_file() else {}
    res = GradcamResult(out_dir=tg.out_dir, trial=t.name, layer=tgt.name, methods=meths,
                        images=[str(q) for q, _ in items])
    for meth in meths:
        faith = _explain_method(tg, meth, res, save_maps=save_maps, fractions=fractions, baseline=baseline,
                                seed=seed, scorecam_channels=scorecam_channels, p=p)
        merged[meth] = res.faithfulness[meth] = faith
    write_json_atomic(merged_path, merged)
    res.files.append(merged_path)
    return res
