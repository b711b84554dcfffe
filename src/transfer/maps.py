"""One definition of a class-activation map: how it is made, drawn, flagged and tested (numpy only).

Grad-CAM, Grad-CAM++ and Score-CAM on a Keras model (:mod:`transfer.analysis.gradcam`) and
class activation maps computed from an exported bundle use these functions, so a map means
the same thing everywhere. The module needs numpy, Pillow (the overlay) and scipy (the ROAD
imputation, imported when used; scikit-learn already installs it), never TensorFlow.

A map
-----
A raw CAM is a ``(h, w)`` grid of class evidence at some layer's resolution.
:func:`to_input_maps` makes it a *map*: NaN / inf -> 0, ReLU (only positive evidence),
bilinear upsampling to the model's input size with each cell at the centre of its receptive
field (:func:`upsample`; the layer's :data:`Geometry`, or cells tiling the input evenly --
the numbers of ``tf.image.resize(..., "bilinear")`` -- when it is not known), divided by its
maximum: float32 ``(H, W)`` in [0, 1]. A CAM whose positive peak is at most
:data:`EMPTY_EPS` of its largest magnitude has no positive evidence and becomes all zeros.

Flags (:func:`map_flags`): ``empty`` -- all zeros, the method found no positive evidence and
the picture shows nothing; ``border`` -- at least :data:`BORDER_SHARE` of the map's mass (and
twice the ring's share of the pixels) lies in the outer ring of the image (:func:`border_ring`,
1/16 of the side wide, at least one pixel; a flat map has about a quarter there). A flagged map is not an explanation: grids and
overlays mark it (:func:`mark_flag`) and reports say so.

Faithfulness
------------
:func:`faithfulness` asks whether the model's output depends on the pixels a map ranks
first, against a *control*: for each image, other images' maps from the same method
(:func:`control_maps`), which have a real map's smoothness, size and overall position but
none of this image's evidence. By default the controls are maps of images the model puts in
*another class*: on centred data (digits) an image of the same class has nearly the same map,
so a same-class control carries the very evidence being tested and the comparison is a coin
flip even for a map that knows where the object is. The control's number is the median over
:data:`DEFAULT_CONTROLS` controls: the test asks "better than a typical uninformative map",
not "better than one random draw" (an uninformative map still wins on half the images). With ``shifted``
controls the map rolled by half the image is used instead; it rewards any map that simply
lights the centre (a fixed centre blob beats its rolled copy on centred data), so it is not
the default. The numbers, per image, for the map and for its control (``p`` is the
explained class's probability):

* ``deletion_auc`` (Petsiuk et al. 2018, RISE): remove the pixels in order of map value,
  most relevant first, in ``steps`` equal steps from 0 to 100 % of the pixels, each removed
  pixel set to the baseline (:func:`substrate`: by default the image's median colour, its
  background where one colour dominates); area under ``p`` over the
  removed fraction 0..1 (trapezoid). **Lower is better**: the map's first pixels are what
  the model needs.
* ``insertion_auc`` (same paper): start from the baseline image and put the original
  pixels back, most relevant first; area under ``p``. **Higher is better.**
* ``road_morf`` (Rong et al. 2022, ROAD): remove the most relevant 1/steps .. (steps-1)/steps
  of the pixels, but fill them by noisy linear imputation (:func:`impute_linear`: each
  removed pixel is the weighted mean of its 8 neighbours, the whole hole solved as one
  sparse linear system, plus Gaussian noise of :data:`ROAD_NOISE` grey levels), so the
  fill's shape does not tell the model where pixels were removed; mean ``p`` over those
  fractions. **Lower is better.**
* ``road_lerf``: the same, least relevant first. **Higher is better.**

"Beats its control" per image means a strictly better number than the control's; an empty
map never beats it. Only *measurable* images count (:meth:`Faithfulness.measurable`): those where
removing every pixel (the baseline image) takes away at least half of the explained class's
probability above chance (1 / classes).
Where the baseline alone keeps the class -- a uniform image is a "square" to a shapes model,
a black one a "7" to a digits model -- no order of removal can show a drop, and map and
control win by chance; those images are counted and named, not scored. Per metric the summary
gives the mean over measurable images for the map and the control, the share of them where
the map beats its control, and a one-sided sign test (the chance of that many wins or more if
map and control were exchangeable). A method's
``min_share_deletion_road`` is the smaller of its deletion and ROAD-MoRF shares; it *beats its
control* when both sign tests give p < :data:`SIGN_TEST_ALPHA`.

Cost: ``2 * (steps - 1)`` model calls per image for deletion + insertion and as many for
ROAD, each for the map and its control, batched; one sparse solve per ROAD step.

Example::

    from transfer.maps import to_input_maps, map_flags, faithfulness, summarize_faithfulness
    maps = to_input_maps(raw_cams, (32, 32))
    res = faithfulness(predict, images, maps, classes, steps=10)
    summarize_faithfulness(res)["metrics"]["deletion_auc"]["map_beats_control"]   # e.g. 0.94
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Callable, Sequence

import numpy as np

from .errors import ConfigError
from .maps_config import BASELINES, CONTROLS, DEFAULT_CONTROLS, FaithOptions
from .options import replace

#: a CAM whose positive peak is at most this share of its largest magnitude is empty
EMPTY_EPS = 1e-6
#: the outer ring is this share of the shorter side wide (at least one pixel)
BORDER_RING = 1 / 16
#: a map with at least this share of its mass in the outer ring (and twice the ring's share of the
#: pixels, which matters only for tiny images) is flagged ``border``
BORDER_SHARE = 0.5
#: flags a map can carry ('' = none)
FLAGS = ("empty", "border")
#: standard deviation (grey levels on 0..255) of the noise ROAD adds to imputed pixels (1 % of the range)
ROAD_NOISE = 2.55
#: the baselines in words
BASELINE_TEXT = {"median": "the image's median colour", "mean": "the image's mean colour", "zero": "black",
                 "blur": "the image blurred"}
#: an image is measurable when the baseline image keeps less than this share of the class probability above chance
MEASURABLE_DROP = 0.5
#: a method beats its control when the one-sided sign tests of deletion and ROAD-MoRF are below this
SIGN_TEST_ALPHA = 0.05
#: the metrics, and whether lower is better
METRICS = {"deletion_auc": "lower", "insertion_auc": "higher", "road_morf": "lower", "road_lerf": "higher"}

Predict = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- making maps


#: Where a layer's cells sit on the input: per axis ``(a, b)``, cell ``r`` is centred at input
#: coordinate ``a * r + b`` (pixel ``p`` spans ``[p, p + 1)``); ``None`` = the cells tile the input
#: evenly (``a = size / cells``, ``b = a / 2``: half-pixel centres).
Geometry = tuple  # ((a_y, b_y), (a_x, b_x)) | None


def even_geometry(cells: tuple[int, int], size: tuple[int, int]) -> tuple:
    """The geometry of cells that tile the input evenly (what :func:`upsample` assumes without one)."""
    return tuple((s / c, s / c / 2) for c, s in zip(cells, size))


def _interp_matrix(n_out: int, n_in: int, axis: tuple[float, float] | None = None) -> np.ndarray:
    """``(n_out, n_in)`` bilinear weights from cells to pixels, edges clamped; ``axis`` = ``(a, b)``
    of the cells' centres (default: half-pixel centres)."""
    a, b = axis if axis is not None else (n_out / n_in, n_out / n_in / 2)
    src = (np.arange(n_out, dtype=np.float64) + 0.5 - b) / a
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1.0 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def upsample(a: np.ndarray, size: tuple[int, int], *, geometry: Geometry = None) -> np.ndarray:
    """Bilinear resampling of ``(N, h, w)`` or ``(N, h, w, K)`` cells onto the ``size`` = (H, W) input pixels.

    Each cell's value sits at its centre on the input (``geometry``, :data:`Geometry`); pixels
    between centres are interpolated, pixels beyond the outer centres take the edge value.
    Without a geometry the cells tile the input evenly: the same numbers as
    ``tf.image.resize(a, size, "bilinear")`` (no antialiasing). A network with ``valid``
    convolutions or TensorFlow's asymmetric ``same`` padding shifts its cells
    (``transfer.analysis.gradcam.layer_geometry`` computes where they are).

    Example::

        upsample(np.ones((1, 2, 2)), (4, 4)).shape     # (1, 4, 4)
    """
    a = np.asarray(a)
    h, w = a.shape[1], a.shape[2]
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W) and geometry is None:
        return a.astype(np.float32, copy=True)
    gy, gx = geometry if geometry is not None else (None, None)
    my, mx = _interp_matrix(H, h, gy), _interp_matrix(W, w, gx)
    if a.ndim == 3:  # two matrix products (BLAS): ~10x faster than one einsum over every index
        return np.matmul(np.matmul(my, a.astype(np.float64)), mx.T).astype(np.float32)
    return np.einsum("Yh,nhwk,Xw->nYXk", my, a.astype(np.float64), mx, optimize=True).astype(np.float32)


def to_input_maps(cams: np.ndarray, size: tuple[int, int], *, geometry: Geometry = None) -> np.ndarray:
    """Raw CAMs ``(N, h, w)`` -> maps ``(N, H, W)`` float32 in [0, 1] (see the module docstring).

    NaN / inf become 0; ReLU; bilinear upsampling to ``size`` (:func:`upsample`, with the
    layer's ``geometry`` when known); divided by the maximum; a CAM without positive
    evidence (positive peak <= :data:`EMPTY_EPS` x largest magnitude) is all zeros, never NaN.

    Example::

        to_input_maps(np.array([[[0.0, 2.0], [-1.0, 1.0]]]), (4, 4)).max()    # 1.0
    """
    cam = np.nan_to_num(np.asarray(cams, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if cam.ndim != 3:
        raise ValueError(f"CAMs must be (N, h, w), got shape {cam.shape}")
    n = len(cam)
    flat = cam.reshape(n, -1)
    mag = np.abs(flat).max(axis=1) if cam.size else np.zeros(n)
    peak = flat.max(axis=1) if cam.size else np.zeros(n)
    live = (peak > EMPTY_EPS * mag) & (peak > 0)
    pos = np.where(live[:, None, None], np.maximum(cam, 0.0), 0.0)
    up = np.maximum(upsample(pos, size, geometry=geometry), 0.0)
    top = up.reshape(n, -1).max(axis=1) if up.size else np.zeros(n)
    out = np.zeros(up.shape, np.float32)
    ok = live & (top > 0)
    out[ok] = up[ok] / top[ok, None, None]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- flags


def border_ring(size: tuple[int, int]) -> np.ndarray:
    """Boolean ``(H, W)``: the outer ring, :data:`BORDER_RING` of the shorter side wide (>= 1 px)."""
    H, W = int(size[0]), int(size[1])
    k = max(1, int(round(min(H, W) * BORDER_RING)))
    ring = np.ones((H, W), bool)
    ring[k:H - k, k:W - k] = False
    return ring


def border_share(maps: np.ndarray) -> np.ndarray:
    """Share of each map's mass in the outer ring (0 for an empty map)."""
    m = np.asarray(maps, dtype=np.float64)
    ring = border_ring(m.shape[1:3])
    total = m.reshape(len(m), -1).sum(axis=1)
    inside = m[:, ring].sum(axis=1)
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0)


def map_flags(maps: np.ndarray) -> list[str]:
    """One flag per map: ``"empty"``, ``"border"`` or ``""`` (see the module docstring).

    Example::

        map_flags(np.zeros((1, 16, 16)))    # ['empty']
    """
    m = np.asarray(maps, dtype=np.float32)
    if m.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {m.shape}")
    empty = m.reshape(len(m), -1).max(axis=1) <= 0 if m.size else np.zeros(len(m), bool)
    area = float(border_ring(m.shape[1:3]).mean()) if m.size else 1.0
    border = border_share(m) >= max(BORDER_SHARE, 2 * area)
    return ["empty" if e else "border" if b else "" for e, b in zip(empty, border)]


FLAG_TEXT = {"empty": "EMPTY MAP: no positive evidence", "border": "BORDER MAP: its mass is on the image edge"}


def pointing_hits(maps: np.ndarray, boxes: np.ndarray, *, margin: int = 0) -> np.ndarray:
    """Pointing game (Zhang et al. 2016): is each map's peak inside its box ``(y0, x0, y1, x1)`` (+ ``margin`` px)?

    The peak is the centre of the map's maximal plateau (a map upsampled from a coarse
    grid has flat tops); an empty map never hits.
    """
    m = np.asarray(maps, dtype=np.float32)
    out = np.zeros(len(m), bool)
    for i, (mi, (y0, x0, y1, x1)) in enumerate(zip(m, np.asarray(boxes))):
        top = mi.max()
        if top <= 0:
            continue
        yy, xx = np.nonzero(mi >= top - 1e-6)
        py, px = yy.mean(), xx.mean()
        out[i] = (y0 - margin <= py < y1 + margin) and (x0 - margin <= px < x1 + margin)
    return out


# --------------------------------------------------------------------------- pictures

#: matplotlib's ``jet`` colormap as piecewise-linear segments (position, value) per channel
_JET = (((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)))


_JET_STEPS = 1024


def _jet_table() -> np.ndarray:
    v = np.linspace(0.0, 1.0, _JET_STEPS)
    return np.stack([np.interp(v, [p for p, _ in seg], [c for _, c in seg]) for seg in _JET], axis=-1).astype(
        np.float32)


#: :func:`jet` sampled at 1024 levels: the overlay looks colours up (|difference| < 1/1000 of a channel)
_JET_TABLE = _jet_table()
_JET_BYTES = np.rint(_JET_TABLE * 255.0).astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """The ``jet`` colours (RGB float in [0, 1], shape ``values.shape + (3,)``) of values in [0, 1]."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(v, [p for p, _ in seg], [c for _, c in seg]) for seg in _JET], axis=-1)


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
    if hm.shape != (hh, ww):
        hm = np.asarray(Image.fromarray(hm, mode="F").resize((ww, hh), Image.Resampling.BILINEAR))
    colours = _JET_BYTES[(np.clip(hm, 0.0, 1.0) * (_JET_STEPS - 1) + 0.5).astype(np.intp)]
    # Pillow's blend (one C pass, rounded) rather than float arithmetic here: a third of the time
    # of each `transfer infer --cam` overlay (docs/benchmarks.md, section 12)
    return np.array(Image.blend(Image.fromarray(img), Image.fromarray(colours), alpha))


def mark_flag(picture: np.ndarray, flag: str) -> np.ndarray:
    """The picture with a frame that marks a flagged map (grey dashes: empty, red: border); unchanged if no flag."""
    if not flag:
        return picture
    out = np.array(picture, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    t = max(2, min(h, w) // 40)
    colour = np.array((128, 128, 128) if flag == "empty" else (230, 0, 0), np.uint8)
    dash = (np.arange(max(h, w)) // (4 * t)) % 2 == 0 if flag == "empty" else np.ones(max(h, w), bool)
    out[:t, dash[:w]] = colour
    out[h - t:, dash[:w]] = colour
    out[dash[:h], :t] = colour
    out[dash[:h], w - t:] = colour
    return out


# --------------------------------------------------------------------------- controls


def control_maps(maps: np.ndarray, *, control: str = "other", count: int = 1, groups=None,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` control maps of each image and where they came from.

    ``other``: other images' maps: the non-empty maps in a random cycle, each image's controls
    are the next ``count`` maps of the cycle (distinct and never its own while there are more
    than ``count`` non-empty maps; an empty map's image gets random non-empty maps); with
    fewer than two non-empty maps it falls back to ``shifted``. ``shifted``: the map rolled
    by ``j / (count + 1)`` of its height and width, ``j = 1..count`` (half of both for one).

    Returns:
        ``(controls (N, count, H, W), source (N, count))``: ``source[i, j]`` is the index of
        the image whose map is image ``i``'s ``j``-th control, -1 for a shifted map.
    """
    if control not in CONTROLS:
        raise ConfigError(f"unknown control {control!r}; accepted: {', '.join(CONTROLS)}", option="control")
    m = np.asarray(maps, dtype=np.float32)
    n, H, W = m.shape
    count = int(count)
    live = np.flatnonzero(m.reshape(n, -1).max(axis=1) > 0) if n else np.zeros(0, np.int64)
    if control == "shifted" or len(live) < 2:
        rolled = [np.roll(m, (round(H * j / (count + 1)), round(W * j / (count + 1))), axis=(1, 2))
                  for j in range(1, count + 1)]
        return np.stack(rolled, axis=1), np.full((n, count), -1, np.int64)
    rng = np.random.default_rng([int(seed), 0xC0])
    src = np.full((n, count), -1, np.int64)
    if groups is not None:
        g = np.asarray(groups)
        for i in range(n):
            pool = live[(live != i) & (g[live] != g[i])]
            if len(pool) == 0:
                pool = live[live != i]
            src[i] = rng.choice(pool, size=count, replace=len(pool) < count)
        return m[src], src
    cycle = rng.permutation(live)
    for pos, i in enumerate(cycle):
        src[i] = cycle[(pos + 1 + np.arange(count)) % len(cycle)]
    for i in np.setdiff1d(np.arange(n), live):
        src[i] = rng.choice(live, size=count, replace=len(live) < count)
    return m[src], src


# --------------------------------------------------------------------------- removal


def _ranks(m: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Rank of each pixel (0 = highest map value), ties broken by ``ties`` (random keys, one per pixel)."""
    flat = m.reshape(-1).astype(np.float64)
    order = np.lexsort((ties, -flat))
    rank = np.empty(flat.size, np.int64)
    rank[order] = np.arange(flat.size)
    return rank


#: the 8 neighbours of a pixel and their weights in the ROAD imputation (Rong et al. 2022)
_NEIGHBOURS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6),
               (0, 1, 1 / 6), (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


def impute_linear(image: np.ndarray, removed: np.ndarray, *, noise: float = ROAD_NOISE,
                  rng: np.random.Generator | None = None, noise_field: np.ndarray | None = None) -> np.ndarray:
    """Noisy linear imputation (ROAD): removed pixels become the weighted mean of their 8 neighbours.

    One sparse linear system per image holds every removed pixel (edge and diagonal
    neighbours weigh 1/6 and 1/12, neighbours outside the image are left out), so a hole
    is filled smoothly from its rim; Gaussian noise of ``noise`` grey levels is added to
    the filled pixels (``noise_field``, ``(H, W, C)`` standard normals, gives the draws so
    two removals can share them). Values are clipped to 0..255.

    Args:
        image: ``(H, W, C)`` pixels.
        removed: ``(H, W)`` bool, True = impute; not every pixel.

    Example::

        impute_linear(x, map_ >= np.quantile(map_, 0.8))    # the top 20 % filled in
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    x = np.asarray(image, dtype=np.float64)
    H, W, C = x.shape
    flat = np.asarray(removed, bool).reshape(-1)
    idx = np.flatnonzero(flat)
    out = x.copy()
    if idx.size == 0:
        return out.astype(np.float32)
    if idx.size == flat.size:
        raise ValueError("cannot impute every pixel of an image: nothing is left to impute from")
    n = idx.size
    vid = np.full(flat.size, -1, np.int64)
    vid[idx] = np.arange(n)
    yy, xx = np.divmod(idx, W)
    xf = x.reshape(-1, C)
    diag = np.zeros(n)
    b = np.zeros((n, C))
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    for dy, dx, wt in _NEIGHBOURS:
        ny, nx = yy + dy, xx + dx
        ok = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        eq = np.flatnonzero(ok)
        nb = ny[ok] * W + nx[ok]
        diag[eq] += wt
        unknown = flat[nb]
        rows.append(eq[unknown])
        cols.append(vid[nb[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
        np.add.at(b, eq[~unknown], wt * xf[nb[~unknown]])
    a = csc_matrix((np.concatenate([diag] + vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    # symmetric positive definite: no pivoting, a symmetric fill-reducing order (~2x faster than spsolve)
    lu = splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    v = np.asarray(lu.solve(b)).reshape(n, C)
    if noise:
        z = (noise_field.reshape(-1, C)[idx] if noise_field is not None
             else (rng or np.random.default_rng()).standard_normal((n, C)))
        v = v + noise * z
    out.reshape(-1, C)[idx] = v
    return np.clip(out, 0.0, 255.0).astype(np.float32)


# --------------------------------------------------------------------------- faithfulness


def noise_level(images: np.ndarray) -> np.ndarray:
    """Each image's pixel noise (grey levels): a robust estimate from differences of horizontal neighbours.

    The median absolute difference of neighbouring pixels / (0.6745 * sqrt(2)) is the
    standard deviation of white noise on a locally flat image; edges barely move a median.
    """
    x = np.asarray(images, dtype=np.float64)
    d = np.abs(np.diff(x, axis=2)).reshape(len(x), -1)
    return np.median(d, axis=1) / (0.6745 * np.sqrt(2.0)) if d.size else np.zeros(len(x))


def substrate(images: np.ndarray, baseline: str) -> np.ndarray:
    """What removed pixels become in deletion / insertion (``(N, H, W, C)`` float32).

    ``median``: each image's median colour (per channel) -- its background where one colour
    dominates (black behind a digit, the background colour behind a shape), so a removed
    pixel looks like "nothing there"; ``mean``: its mean colour; ``zero``: black; ``blur``: the
    image blurred (Gaussian, sigma = 1/8 of the longer side; RISE's insertion start).
    """
    x = np.asarray(images, dtype=np.float32)
    n, H, W, C = x.shape
    if baseline == "zero":
        return np.zeros_like(x)
    if baseline == "blur":
        from scipy.ndimage import gaussian_filter

        s = max(H, W) / 8
        return np.stack([gaussian_filter(xi, sigma=(s, s, 0), mode="nearest") for xi in x]).astype(np.float32)
    flat = x.reshape(n, -1, C)
    colour = np.median(flat, axis=1) if baseline == "median" else flat.mean(axis=1)
    return np.broadcast_to(colour[:, None, None, :], x.shape).astype(np.float32)


@dataclass(frozen=True)
class Faithfulness:
    """Per-image curves of :func:`faithfulness`; ``[:, 0]`` = the map, ``[:, 1:]`` = its controls.

    Attributes:
        fractions: ``(steps + 1,)`` removed / inserted shares 0..1 of the deletion and insertion curves.
        road_fractions: ``(steps - 1,)`` removed shares of ROAD.
        deletion, insertion: ``(N, 1 + controls, steps + 1)`` probability of the explained class.
        road_morf, road_lerf: ``(N, 1 + controls, steps - 1)`` (NaN without ROAD).
        base: ``(N,)`` probability on the unchanged image.
        blank: ``(N,)`` probability on the baseline image (every pixel removed).
        chance: 1 / the model's number of classes.
        flags: one flag per map (:func:`map_flags`).
        control_source: ``(N, controls)`` the images whose maps are the controls (-1: shifted map).
        baseline, control: what removed pixels became and what the controls are.
    """

    fractions: np.ndarray
    road_fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    road_morf: np.ndarray
    road_lerf: np.ndarray
    base: np.ndarray
    blank: np.ndarray
    flags: list
    control_source: np.ndarray
    baseline: str
    control: str
    other_class: bool = True
    chance: float = 0.0

    def measurable(self) -> np.ndarray:
        """``(N,) bool``: the baseline image (every pixel removed) keeps less than :data:`MEASURABLE_DROP`
        of the class probability above chance, so removal can show what the model needs."""
        return (self.blank - self.chance) < MEASURABLE_DROP * (self.base - self.chance)

    def scores(self) -> dict[str, np.ndarray]:
        """``{metric: (N, 2)}``: the map's number and its control's (the median over the controls):
        areas of deletion / insertion, mean probability of ROAD."""
        fr = self.fractions
        raw = {"deletion_auc": np.trapezoid(self.deletion, fr, axis=-1),
               "insertion_auc": np.trapezoid(self.insertion, fr, axis=-1),
               "road_morf": self.road_morf.mean(axis=-1),
               "road_lerf": self.road_lerf.mean(axis=-1)}
        return {k: np.stack([v[:, 0], np.median(v[:, 1:], axis=1)], axis=1) for k, v in raw.items()}

    def beats(self) -> dict[str, np.ndarray]:
        """``{metric: (N,) bool}``: the map strictly better than its control (never for an empty map;
        every image, measurable or not -- :meth:`measurable` says which count)."""
        empty = np.array([f == "empty" for f in self.flags], bool)
        out = {}
        for k, s in self.scores().items():
            win = s[:, 0] < s[:, 1] if METRICS[k] == "lower" else s[:, 0] > s[:, 1]
            out[k] = win & ~empty
        return out


def _check_inputs(images, maps, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(images, dtype=np.float32)
    m = np.asarray(maps, dtype=np.float32)
    cls = np.asarray(classes, dtype=np.int64).reshape(-1)
    if x.ndim != 4 or m.ndim != 3 or x.shape[:3] != m.shape or len(cls) != len(x):
        raise ConfigError(f"images {x.shape}, maps {m.shape} and classes ({len(cls)}) do not match: "
                          "one (H, W) map and one class per (H, W, C) image")
    return x, m, cls


def _predict_class(predict: Predict, x: np.ndarray, cls: np.ndarray, *, classes: bool = False):
    """The probability of each image's class (and, with ``classes``, the model's number of classes)."""
    p = np.asarray(predict(x), dtype=np.float64)
    if p.ndim != 2 or len(p) != len(x):
        raise ValueError(f"predict returned shape {p.shape} for {len(x)} images; expected (N, classes)")
    out = p[np.arange(len(x)), cls]
    return (out, p.shape[1]) if classes else out


def faithfulness(
    predict: Predict,
    images: np.ndarray,
    maps: np.ndarray,
    classes: Sequence[int],
    options: FaithOptions | None = None,
    *,
    chunk: int = 256,
    **overlay,
) -> Faithfulness:
    """Deletion, insertion and ROAD curves of each map and of its control (see the module docstring).

    Args:
        predict: ``float32 (n, H, W, C) pixels 0..255 -> (n, classes)`` probabilities (batches
            itself as it likes; it gets at most about ``chunk`` images per call).
        images: ``(N, H, W, C)`` pixels at the model's input size.
        maps: ``(N, H, W)`` maps (:func:`to_input_maps`).
        classes: the explained class of each image.
        options: how it is measured (:class:`~transfer.maps_config.FaithOptions`; ``overlay``
            sets fields by name): ``steps``, the points of the deletion / insertion curves minus
            one (fractions 0, 1/steps, .., 1; ROAD removes 1/steps .. (steps-1)/steps); the
            ``baseline`` removed pixels become (:func:`substrate`; ROAD imputes them instead);
            the ``control`` (``other`` or ``shifted``, :func:`control_maps`) and ``controls`` per
            image, whose median is the control's number (an uninformative map still beats it on
            half of the images, and an informative one more often than one noisy control lets
            it), from another class with ``control_other_class``; ``road_noise``, grey levels
            of the ROAD noise, or ``auto``: each image's own noise level (:func:`noise_level`),
            at least :data:`ROAD_NOISE`; ``road``: compute ROAD (one sparse solve per step and
            map; ``auto``: inputs of at most :data:`~transfer.maps_config.ROAD_AUTO_PIXELS`
            pixels), else its curves are NaN; ``seed`` for tie breaking, controls and ROAD noise
            (the map and its control share the noise).
        chunk: perturbed images per ``predict`` call, about.

    Returns:
        A :class:`Faithfulness`.

    Raises:
        ConfigError: bad steps, baseline or control; shapes that do not match.
    """
    o = replace(options or FaithOptions(), **overlay)
    steps, baseline, control, controls, seed = o.steps, o.baseline, o.control, o.controls, o.seed
    x, m, cls = _check_inputs(images, maps, classes)
    n, H, W, C = x.shape
    hw = H * W
    road = o.road_runs(hw)
    fr = np.linspace(0.0, 1.0, steps + 1)
    counts = np.rint(fr * hw).astype(np.int64)
    inner = counts[1:-1]
    ctrl, source = control_maps(m, control=control, count=int(controls), seed=seed,
                                groups=cls if o.control_other_class else None)
    c1 = 1 + int(controls)
    flags = map_flags(m)
    subs_img = substrate(x, baseline)
    subs = subs_img.reshape(n, hw, C)
    sigma = np.maximum(noise_level(x), ROAD_NOISE) if o.road_noise == "auto" else np.full(n, float(o.road_noise))
    base, n_classes = _predict_class(predict, x, cls, classes=True) if n else (np.zeros(0), 0)
    blank = _predict_class(predict, subs_img, cls) if n else np.zeros(0)
    k = len(inner)
    deletion = np.empty((n, c1, steps + 1))
    insertion = np.empty((n, c1, steps + 1))
    deletion[:, :, 0] = insertion[:, :, -1] = base[:, None]
    deletion[:, :, -1] = insertion[:, :, 0] = blank[:, None]
    morf = np.full((n, c1, k), np.nan)
    lerf = np.full((n, c1, k), np.nan)
    per_image = c1 * 2 * k * (2 if road else 1)
    group = max(1, chunk // max(1, per_image))
    for g0 in range(0, n, group):
        batch, where = [], []
        for i in range(g0, min(n, g0 + group)):
            rng = np.random.default_rng([int(seed), int(i)])
            xf = x[i].reshape(-1, C)
            noise = rng.standard_normal((2, k, H, W, C)) if road else None
            ties = rng.random(hw)  # one tie breaking for the map and its control: equal maps, equal numbers
            for j, mm in enumerate([m[i], *ctrl[i]]):
                rank = _ranks(mm, ties)
                first = rank[None, :] < inner[:, None]  # (k, hw): the top fraction of pixels
                batch.append(np.where(first[..., None], subs[i], xf).reshape(k, H, W, C))
                where.append((deletion, i, j))
                batch.append(np.where(first[..., None], xf, subs[i]).reshape(k, H, W, C))
                where.append((insertion, i, j))
                if road:
                    batch.append(np.stack([impute_linear(x[i], (rank < c).reshape(H, W), noise=sigma[i], noise_field=noise[0, s])
                                           for s, c in enumerate(inner)]))
                    where.append((morf, i, j))
                    batch.append(np.stack([impute_linear(x[i], (rank >= hw - c).reshape(H, W), noise=sigma[i], noise_field=noise[1, s])
                                           for s, c in enumerate(inner)]))
                    where.append((lerf, i, j))
        xb = np.concatenate(batch).astype(np.float32)
        cb = np.concatenate([np.full(k, cls[i]) for _, i, _ in where])
        p = _predict_class(predict, xb, cb).reshape(len(where), k)
        for (arr, i, j), row in zip(where, p):
            if arr is morf or arr is lerf:
                arr[i, j] = row
            else:
                arr[i, j, 1:-1] = row
    return Faithfulness(fractions=fr, road_fractions=fr[1:-1], deletion=deletion, insertion=insertion,
                        road_morf=morf, road_lerf=lerf, base=base, blank=blank, flags=flags, control_source=source,
                        baseline=baseline, control=control, other_class=bool(o.control_other_class),
                        chance=1.0 / n_classes if n_classes else 0.0)


def sign_test(wins: int, n: int) -> float:
    """One-sided sign test: P(at least ``wins`` of ``n`` fair coin flips), 1.0 for n = 0."""
    if n <= 0:
        return 1.0
    return float(sum(comb(n, j) for j in range(int(wins), n + 1)) / 2 ** n)


def summarize_faithfulness(res: Faithfulness) -> dict:
    """The JSON summary of :func:`faithfulness`: per metric the mean over the measurable images for
    the map and the control, the share of them where the map beats its control and the sign test;
    the flags; the mean curves (all images); the verdict.

    Returns:
        ``{"images", "measurable", "not_measurable": [indices], "steps", "baseline", "control",
        "controls", "control_class", "base_probability", "flags": {"empty": k, "border": k,
        "per_image": [...]}, "metrics": {name: {"better", "map", "control", "map_beats_control",
        "sign_test_p"}}, "min_share_deletion_road", "beats_control", "curves": {...}}``.
    """
    n = len(res.base)
    scores, beats = res.scores(), res.beats()
    ok = res.measurable() if n else np.zeros(0, bool)
    k = int(ok.sum())
    metrics = {}
    for name, better in METRICS.items():
        s = scores[name][ok]
        if k == 0 or np.isnan(s).all():
            continue
        wins = int(beats[name][ok].sum())
        metrics[name] = {"better": better, "map": float(s[:, 0].mean()), "control": float(s[:, 1].mean()),
                         "map_beats_control": wins / k, "sign_test_p": sign_test(wins, k)}
    keys = [k for k in ("deletion_auc", "road_morf") if k in metrics]
    share = min(metrics[k]["map_beats_control"] for k in keys) if keys else None
    verdict = bool(keys) and all(metrics[k]["sign_test_p"] < SIGN_TEST_ALPHA for k in keys)

    def mean_curve(a):
        return {"map": [float(v) for v in a[:, 0].mean(axis=0)],
                "control": [float(v) for v in a[:, 1:].mean(axis=(0, 1))]}

    curves = {"fractions": [float(f) for f in res.fractions], "deletion": mean_curve(res.deletion),
              "insertion": mean_curve(res.insertion)}
    if "road_morf" in metrics:
        curves.update({"road_fractions": [float(f) for f in res.road_fractions],
                       "road_morf": mean_curve(res.road_morf), "road_lerf": mean_curve(res.road_lerf)})
    return {
        "images": int(n), "measurable": k, "not_measurable": [int(i) for i in np.flatnonzero(~ok)],
        "steps": len(res.fractions) - 1, "baseline": res.baseline, "control": res.control,
        "controls": int(res.deletion.shape[1] - 1), "control_class": "other" if res.other_class else "any",
        "base_probability": float(res.base.mean()) if n else None,
        "flags": {"empty": sum(f == "empty" for f in res.flags), "border": sum(f == "border" for f in res.flags),
                  "per_image": list(res.flags)},
        "metrics": metrics, "min_share_deletion_road": share, "beats_control": verdict, "curves": curves,
    }


def per_image_rows(res: Faithfulness) -> tuple[list[str], list[list]]:
    """``(header, rows)``: one row per image (flag, control source, each metric for map / control / beats)."""
    scores, beats = res.scores(), res.beats()
    names = [k for k in METRICS if not np.isnan(scores[k]).all()]
    header = ["index", "flag", "probability", "controls_of_images"] + [
        f"{k}_{w}" for k in names for w in ("map", "control", "map_beats_control")] + ["baseline_probability",
                                                                                          "measurable"]
    ok = res.measurable()
    rows = []
    for i in range(len(res.base)):
        row = [i, res.flags[i], round(float(res.base[i]), 6), ";".join(str(int(v)) for v in res.control_source[i])]
        for k in names:
            row += [round(float(scores[k][i, 0]), 6), round(float(scores[k][i, 1]), 6), int(beats[k][i])]
        rows.append(row + [round(float(res.blank[i]), 6), int(ok[i])])
    return header, rows


__all__ = [
    "Geometry", "even_geometry", "BASELINES", "CONTROLS", "DEFAULT_CONTROLS", "MEASURABLE_DROP", "EMPTY_EPS", "FLAGS", "FLAG_TEXT", "METRICS", "Faithfulness", "border_ring",
    "border_share", "control_maps", "faithfulness", "impute_linear", "jet", "map_flags", "mark_flag", "overlay",
    "per_image_rows", "pointing_hits", "sign_test", "summarize_faithfulness", "to_input_maps", "upsample",
]
