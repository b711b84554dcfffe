"""One definition of a class-activation map: how it is made, flagged and drawn (numpy only).

Grad-CAM, Grad-CAM++ and Score-CAM on a Keras model (:mod:`transfer.analysis.gradcam`) and
class activation maps computed from an exported bundle use these functions, so a map means
the same thing everywhere. Whether a map shows what the model uses is tested by
:mod:`transfer.faithfulness`. The module needs numpy and Pillow (the overlay), never TensorFlow.

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


Example::

    from transfer.maps import map_flags, overlay, to_input_maps
    maps = to_input_maps(raw_cams, (32, 32))
    map_flags(maps)[:3]                 # e.g. ['', 'border', '']
    overlay(image, maps[0]).shape       # (128, 128, 3)
"""

from __future__ import annotations

import numpy as np

#: a CAM whose positive peak is at most this share of its largest magnitude is empty
EMPTY_EPS = 1e-6
#: the outer ring is this share of the shorter side wide (at least one pixel)
BORDER_RING = 1 / 16
#: a map with at least this share of its mass in the outer ring (and twice the ring's share of the
#: pixels, which matters only for tiny images) is flagged ``border``
BORDER_SHARE = 0.5
#: flags a map can carry ('' = none)
FLAGS = ("empty", "border")


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
    (``transfer.analysis.cam_layers.layer_geometry`` computes where they are).

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


def map_pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two maps' values (how alike the Keras and the bundle's maps are);
    ``None`` when either is flat (an empty map has no pattern to correlate).

    Example::

        map_pearson(np.eye(4), 2 * np.eye(4))     # 1.0
    """
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


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


def jet(values: np.ndarray) -> np.ndarray:
    """The ``jet`` colours (RGB float in [0, 1], shape ``values.shape + (3,)``) of values in [0, 1]."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(v, [p for p, _ in seg], [c for _, c in seg]) for seg in _JET], axis=-1)


#: the jet colours of the 256 levels of an 8-bit map, as a Pillow palette (R, G, B, R, ...)
_JET_PALETTE = np.rint(jet(np.linspace(0.0, 1.0, 256)) * 255.0).astype(np.uint8).ravel().tolist()


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
    # 256 jet colours as a palette image that Pillow expands, and Pillow's blend (each one C pass,
    # rounded) rather than float arithmetic here: a fifth of the time of each `transfer infer
    # --cam` overlay (docs/benchmarks.md, section 12)
    colours = Image.fromarray((np.clip(hm, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))  # mode L: 256 levels
    colours.putpalette(_JET_PALETTE)  # L + a palette = P: each level's jet colour
    return np.array(Image.blend(Image.fromarray(img), colours.convert("RGB"), alpha))


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


__all__ = [
    "BORDER_RING", "BORDER_SHARE", "EMPTY_EPS", "FLAGS", "FLAG_TEXT", "Geometry", "border_ring", "border_share",
    "even_geometry", "jet", "map_flags", "map_pearson", "mark_flag", "overlay", "pointing_hits", "to_input_maps", "upsample",
]
