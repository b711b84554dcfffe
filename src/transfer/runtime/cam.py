"""Class activation maps from a bundle, without TensorFlow: ``feature_map @ kernel[:, class]``.

A bundle exported with maps (manifest ``cam``, written by :mod:`transfer.export.cam_export`)
has a ``feature_map`` output in its ONNX models and the ``probs`` layer's kernel in
``cam.npz``. :class:`BundleCam` turns a batch's feature maps into raw CAMs (one numpy
contraction) and into maps with :func:`transfer.maps.to_input_maps` at the cell geometry the
exporter recorded: the same definition (ReLU, bilinear upsampling with each cell at its
centre, divided by the maximum) ``transfer gradcam`` uses, so the two are comparable by
construction (for this head, Grad-CAM at that layer is the same map).

:class:`CamWriter` is what ``transfer infer --cam OUT/`` writes: per image ``<k>_<stem>.npy``
(the map, float32 (H, W) in [0, 1]), ``<k>_<stem>.jpg`` (the jet overlay on the model-size
pixels, a flagged map framed) and ``maps.csv`` (file, explained class, its probability, flag).
The overlay is a picture for eyes, so by default it is a JPEG (quality 90, 4:4:4); ``png``
(lossless) costs more CPU (1.41x that of ``transfer infer`` against 1.19x with JPEG,
docs/benchmarks.md section 12), ``none`` writes the maps only; the exact map is always the ``.npy``.

Maps belong to the network head: a classical head (``--head rf``) has no map, so the maps
explain the network's predicted class (or ``--cam-class``) and the writer says so once.

Example::

    cam = BundleCam.open(bundle, "onnx-fp32")
    runner.request(FEATURE_MAP)
    out = runner.infer(x)
    maps = cam.maps(out.feature_map, out.probs.argmax(1))      # (N, H, W) in [0, 1]
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import maps as cammaps
from .. import tables
from ..bundle import Bundle
from ..errors import BundleError, ConfigError
from ..fsutil import atomic_open
from .sessions import make_session

#: the ONNX output of the last spatial feature map (the exporter's name)
FEATURE_MAP = "feature_map"
REEXPORT_HINT = "re-export the run with this version (`transfer export RUN --force`) to add maps to the bundle"


def cam_problem(bundle: Bundle, model_key: str | None = None) -> tuple[str, str] | None:
    """Why the bundle (its model ``model_key``) cannot give maps, as ``(message, hint)``; ``None`` if it can."""
    rec = bundle.manifest.get("cam")
    if not isinstance(rec, dict):
        return (f"bundle {bundle.path} has no class activation maps: it was exported before maps were added "
                "(its manifest has no 'cam' record)", REEXPORT_HINT)
    if not rec.get("available"):
        return (f"bundle {bundle.path} cannot explain its predictions: {rec.get('reason', 'no reason recorded')}",
                "`transfer gradcam RUN --trial NAME` explains the run's Keras model")
    if model_key is not None and "graph" not in rec and model_key not in (rec.get("models") or []):
        return (f"model {model_key} of bundle {bundle.path} has no {FEATURE_MAP} output (models with maps: "
                f"{', '.join(rec.get('models') or []) or 'none'})",
                "run one of those (--backend onnxruntime, onnxruntime-int8, onnxruntime-fp16)")
    return None


def parse_class(value, names: list[str]) -> int | None:
    """``--cam-class``: a class name or index -> index; ``None`` = each image's predicted class.

    Raises:
        ConfigError: naming the classes accepted.
    """
    if value is None or value == "":
        return None
    s = str(value)
    if s in names:
        return names.index(s)
    if s.lstrip("-").isdigit() and 0 <= int(s) < len(names):
        return int(s)
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    raise ConfigError(f"invalid cam_class: {value!r}; accepted: a class name ({shown}) or an index 0..{len(names) - 1}",
                      option="cam_class")


@dataclass(frozen=True)
class BundleCam:
    """A bundle's maps: the class weights (K, C), the feature map's shape and where its cells sit;
    or, for a bundle with a Grad-CAM graph (``cam.onnx``, :mod:`transfer.export.cam_graph`), no
    weights but an ONNX Runtime session of the graph (``graph_session``) that makes the raw maps
    from the pixels."""

    kernel: np.ndarray | None
    shape: tuple[int, int, int]
    input_size: tuple[int, int]
    geometry: tuple | None
    layer: str
    graph_session: object = None

    @classmethod
    def open(cls, bundle: Bundle, model_key: str | None = None) -> "BundleCam":
        """The maps of a loaded bundle (``cam.npz`` / ``cam.onnx`` were hash-checked by
        :func:`transfer.bundle.load_bundle`).

        Raises:
            BundleError: a bundle exported before maps, a head with no map (the reason recorded
                at export), or a model without the ``feature_map`` output.
        """
        problem = cam_problem(bundle, model_key)
        if problem is not None:
            raise BundleError(problem[0], hint=problem[1], option="cam")
        rec = bundle.manifest["cam"]
        geo = rec.get("geometry")
        geometry = None if geo is None else (tuple(geo["y"]), tuple(geo["x"]))
        shape = tuple(int(v) for v in rec["shape"])
        if "graph" in rec:
            if rec["graph"] not in bundle.paths:  # load_bundle refuses this; a Bundle made in code may not
                raise BundleError(f"bundle {bundle.path}: the maps' graph {rec['graph']!r} is not listed",
                                  hint=REEXPORT_HINT, option="cam")
            session, _ = make_session(bundle.paths[rec["graph"]], "cpu", spinning=False)
            return cls(None, shape, tuple(bundle.input_size), geometry, rec["layer"], session)
        if rec.get("weights") not in bundle.paths:  # load_bundle refuses this; a Bundle made in code may not
            raise BundleError(f"bundle {bundle.path}: the maps' weights file {rec.get('weights')!r} is not listed",
                              hint=REEXPORT_HINT, option="cam")
        with np.load(bundle.paths[rec["weights"]], allow_pickle=False) as z:
            kernel = np.asarray(z["kernel"], np.float32)
        return cls(kernel, shape, tuple(bundle.input_size), geometry, rec["layer"])

    @property
    def needs_feature_map(self) -> bool:
        """Whether the maps are made from the model's ``feature_map`` output (else from the pixels)."""
        return self.graph_session is None

    def raw(self, feature_map: np.ndarray | None, classes: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
        """Raw CAMs (N, h, w) float32: each image's feature map times its class's weights, or the
        Grad-CAM graph run on ``pixels`` (the model-size pixels the model ran on)."""
        if self.graph_session is not None:
            if pixels is None:
                raise ValueError("a Grad-CAM graph's maps need the images' pixels")
            return np.asarray(self.graph_session.run(["cam"], {"image": np.asarray(pixels, np.float32),
                                                       "class": np.asarray(classes, np.int64)})[0], np.float32)
        fm = np.asarray(feature_map, np.float32)
        n, h, w, k = fm.shape
        weights = self.kernel.T[np.asarray(classes, np.int64)]  # (N, K)
        return np.einsum("npk,nk->np", fm.reshape(n, h * w, k), weights).reshape(n, h, w)

    def maps(self, feature_map: np.ndarray | None, classes: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
        """Maps (N, H, W) float32 in [0, 1] at the input size (:func:`transfer.maps.to_input_maps`)."""
        return cammaps.to_input_maps(self.raw(feature_map, classes, pixels), self.input_size, geometry=self.geometry)

    def small(self, feature_map: np.ndarray | None, classes: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
        """Maps at the feature map's own resolution (N, h, w) in [0, 1]: ReLU, divided by the maximum
        (what the server returns as an array; :meth:`maps` upsamples the same cells)."""
        raw = np.maximum(np.nan_to_num(self.raw(feature_map, classes, pixels)), 0.0)
        top = raw.reshape(len(raw), -1).max(axis=1) if raw.size else np.zeros(len(raw))
        return np.where(top[:, None, None] > 0, raw / np.where(top > 0, top, 1.0)[:, None, None], 0.0).astype(
            np.float32)


def _chunk(tag: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(picture: np.ndarray) -> bytes:
    """A uint8 RGB picture as PNG bytes: 8-bit RGB, no row filter, zlib level 1 (the server's
    ``?cam=1`` answer, inside the request's time).

    Written here rather than by Pillow: Pillow's PNG encoder (adaptive row filters) took 2.6x
    the time of this on a 224 x 224 overlay (docs/benchmarks.md, section 12); every PNG reader
    reads it (the tests open it with Pillow).
    """
    import struct
    import zlib

    img = np.ascontiguousarray(picture, np.uint8)
    h, w, _ = img.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1)  # filter byte 0 per row
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + _chunk(b"IEND", b""))


def _overlay(pixels: np.ndarray, m: np.ndarray, flag: str | None = None) -> tuple[np.ndarray, str]:
    flag = cammaps.map_flags(m[None])[0] if flag is None else flag
    return cammaps.mark_flag(cammaps.overlay(np.asarray(pixels), m), flag), flag


def overlay_png(pixels: np.ndarray, m: np.ndarray) -> tuple[bytes, str]:
    """The jet overlay of one map on its model-size pixels as PNG bytes (flagged maps framed) and its flag."""
    picture, flag = _overlay(pixels, m)
    return png_bytes(picture), flag


def jpeg_bytes(picture: np.ndarray, quality: int = 90) -> bytes:
    """A uint8 RGB picture as JPEG bytes (Pillow / libjpeg), colour at full resolution (4:4:4)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture, np.uint8)).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


@dataclass
class CamWriter:
    """Writes the maps of ``transfer infer --cam OUT/``: ``.npy`` + overlay (``overlay``: jpg, png, none) per image,
    ``maps.csv`` at the end. A batch's maps, flags, overlays and files are one task on ``workers``
    threads beside inference: computed in the inference loop, the maps alone made ``--cam`` 1.28x
    the time of ``transfer infer`` (the model waited for them); as a task, 1.00x (docs/benchmarks.md,
    section 12)."""

    out: Path
    cam: BundleCam
    names: list[str]
    cls: int | None = None
    head: str = "network"
    workers: int = 2
    overlay: str = "jpg"
    count: int = 0
    rows: list = field(default_factory=list)
    _pool: ThreadPoolExecutor | None = None
    _pending: list = field(default_factory=list)

    def note(self) -> str:
        """One line on what the maps explain."""
        what = f"class {self.names[self.cls]}" if self.cls is not None else "each image's predicted class"
        how = "" if self.cam.needs_feature_map else "Grad-CAM graph, "
        line = f"maps ({how}{self.cam.layer}, {self.cam.shape[0]}x{self.cam.shape[1]} cells) of {what} -> {self.out}"
        if self.head != "network":
            line += (f"; head {self.head} has no map: the maps are the network head's"
                     + (" (its predicted class)" if self.cls is None else ""))
        return line

    def summary(self) -> str:
        """One line on the maps written, counting the flagged ones (after the writer closed)."""
        n = len(self.rows)
        empty = sum(1 for r in self.rows if r[5] == "empty")
        border = sum(1 for r in self.rows if r[5] == "border")
        line = f"maps: {n} written to {self.out}"
        if empty:
            line += (f"; {empty} empty ({100 * empty / max(n, 1):.0f} %: no positive evidence for the explained class "
                     f"at {self.cam.layer}; `transfer gradcam RUN --method all` compares methods that may show it)")
        if border:
            line += f"; {border} with most of their mass on the image border"
        return line

    def __enter__(self) -> "CamWriter":
        self.out.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="cam-writer")
        return self

    def write(self, paths: list[str], pixels: np.ndarray, feature_map: np.ndarray, net_probs: np.ndarray) -> None:
        """The maps of one batch's decoded images (``paths`` in the order of ``pixels``' rows).

        Only the rows are made here; the maps, their flags and the files are one task per batch
        on the writer threads, so none of it waits in the inference loop (the arrays are the
        batch's own, not reused by the reader)."""
        if not len(paths):
            return
        classes = net_probs.argmax(axis=1) if self.cls is None else np.full(len(paths), self.cls)
        first = len(self.rows)
        stems = []
        for i, path in enumerate(paths):
            stem = f"{self.count:05d}_{Path(path).stem}"
            self.count += 1
            stems.append(stem)
            c = int(classes[i])
            picture = stem + "." + self.overlay if self.overlay != "none" else ""
            self.rows.append([path, self.names[c], f"{float(net_probs[i, c]):.6g}", stem + ".npy", picture, ""])
        self._pending.append(self._pool.submit(self._write_batch, first, stems, pixels, feature_map, classes))
        self._drain(keep=2 * max(1, self.workers))

    def _write_batch(self, first: int, stems: list[str], pixels: np.ndarray, feature_map: np.ndarray,
                     classes: np.ndarray) -> None:
        m = self.cam.maps(feature_map, classes, pixels)
        flags = cammaps.map_flags(m)  # one pass for the batch
        picture = pixels.astype(np.uint8) if self.overlay != "none" else None
        for i, stem in enumerate(stems):
            self.rows[first + i][5] = flags[i]
            with atomic_open(self.out / f"{stem}.npy") as f:
                np.save(f, m[i])
            if picture is None:
                continue
            shown, _ = _overlay(picture[i], m[i], flags[i])
            with atomic_open(self.out / f"{stem}.{self.overlay}") as f:
                f.write(jpeg_bytes(shown) if self.overlay == "jpg" else png_bytes(shown))

    def _drain(self, keep: int = 0) -> None:
        """Wait for the oldest writes until at most ``keep`` are pending (a failed write raises here)."""
        while len(self._pending) > keep:
            self._pending.pop(0).result()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._drain()
        finally:
            self._pool.shutdown(wait=True)
        tables.write_csv(self.out / "maps.csv", ["path", "explained", "network_probability", "map", "overlay", "flag"],
                         self.rows)


def map_findings(bundle: Bundle) -> list[str]:
    """Lines for ``transfer verify`` and reports: whether the bundle has maps (or why not) and, per
    reduced-precision model, how far its maps agree with fp32's on the verification images (a
    disagreement is stated, not hidden)."""
    import json

    rec = bundle.manifest.get("cam")
    if not isinstance(rec, dict):
        return ["maps: none (exported before class activation maps were added; re-export to add them)"]
    if not rec.get("available"):
        return [f"maps: none: {rec.get('reason')}"]
    h, w, _ = rec["shape"]
    if "graph" in rec:
        ident = rec.get("identity") or {}
        same = (f"; equal to Keras's Grad-CAM on {ident['images']} verification images (median Pearson "
                f"{ident['pearson_median']:.6f})" if ident.get("images") else "")
        return [f"maps: Grad-CAM graph ({rec['graph']}) at layer {rec['layer']} ({h}x{w} cells), for every model"
                f"{same}"]
    out = [f"maps: CAM at layer {rec['layer']} ({h}x{w} cells) from {', '.join(rec.get('models') or [])}"]
    try:
        checks = json.loads(bundle.file("verification.json").read_text())
    except (OSError, ValueError, BundleError):
        return out
    for key, v in sorted(checks.items()):
        c = v.get("cam") if isinstance(v, dict) else None
        if not c:
            continue
        verdict = "agree with fp32" if c["agrees"] else (
            f"DISAGREE with fp32 (limits: Spearman >= {c['min_spearman']}, same peak >= "
            f"{100 * c['min_same_peak']:.0f} %): reduced precision moved where the model looks")
        out.append(f"maps of {key} vs fp32 on {c['images']} verification images: Spearman median "
                   f"{c['spearman_median']:.3f}, same peak cell {100 * c['same_peak']:.1f} %: {verdict}")
    return out


def check_cam_out(out: str | os.PathLike, bundle_path) -> Path:
    """``--cam OUT/``: a folder (existing or new), not inside the bundle being read.

    Raises:
        ConfigError: naming the folder.
    """
    p = Path(os.fspath(out))
    if p.exists() and not p.is_dir():
        raise ConfigError(f"invalid cam: {os.fspath(out)!r} is a file; accepted: a folder for the maps",
                          option="cam", hint="give a folder (it is created if missing)")
    real, bundle = Path(os.path.realpath(p)), Path(os.path.realpath(bundle_path))
    if real == bundle or bundle in real.parents:
        raise ConfigError(f"invalid cam: {p} is inside the bundle {bundle_path} being read; accepted: a folder outside it",
                          option="cam")
    return p


__all__ = ["FEATURE_MAP", "BundleCam", "CamWriter", "cam_problem", "check_cam_out", "jpeg_bytes", "map_findings",
           "overlay_png", "parse_class", "png_bytes"]
