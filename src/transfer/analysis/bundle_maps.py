"""The deployed maps beside Keras Grad-CAM: the report's "Maps from the bundle" pictures and numbers.

For the images ``transfer gradcam`` explained for the bundle's trial (``gradcam/<trial>/gradcam/maps.csv``),
the bundle's own maps of the same class are computed as the runtime computes them
(:class:`transfer.runtime.cam.BundleCam` on each ONNX model's ``feature_map``: fp32, and int8 /
fp16 when the bundle has them) and drawn with the same overlay; per image the Pearson
correlation with the Keras map (when ``--save-maps`` kept it) and with the fp32 map.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import maps as cammaps
from ..bundle import load_bundle
from ..data.stream import decode_item
from ..errors import TransferError
from ..fsutil import atomic_path
from ..runtime.cam import BundleCam, cam_problem
from ..runtime.runners import make_runner

#: most images a comparison shows
MAX_IMAGES = 8


@dataclass(frozen=True)
class BundleMaps:
    """What the report shows: the picture, a table (``header``, ``rows``) and a note."""

    picture: Path | None
    header: list[str]
    rows: list[list]
    note: str


def _fit(img: np.ndarray, side: int = 160) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    f = side / h
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * f)), side), Image.Resampling.BILINEAR))


def compare(bundle_dir: Path, gradcam_dir: Path, out_png: Path) -> BundleMaps | None:
    """The bundle's maps beside the Keras Grad-CAM overlays of ``gradcam_dir`` (a method folder with
    ``maps.csv``); ``None`` when there is nothing to compare. The picture is written to ``out_png``
    (rows: images; columns: Keras Grad-CAM, then each bundle model)."""
    if not (gradcam_dir / "maps.csv").is_file():
        return None
    try:
        bundle = load_bundle(bundle_dir, trust=False)
    except TransferError as exc:
        return BundleMaps(None, [], [], f"the bundle cannot be loaded: {exc.message}")
    problem = cam_problem(bundle)
    if problem is not None:
        return BundleMaps(None, [], [], problem[0])
    with open(gradcam_dir / "maps.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:MAX_IMAGES]
    graph = "graph" in bundle.manifest["cam"]  # a Grad-CAM graph explains every model's class alike
    keys = ["onnx-fp32"] if graph else sorted(bundle.manifest["cam"]["models"], key=lambda k: (k != "onnx-fp32", k))
    names = bundle.class_names
    items, pixels = [], []
    for k, r in enumerate(rows):
        it = decode_item(r["image"], bundle.input_size, recipe=bundle.recipe)
        if it.pixels is not None and r.get("explained") in names:
            items.append((k, r))
            pixels.append(it.pixels)
    if not items:
        return BundleMaps(None, [], [], "none of the explained images can be read now")
    x = np.stack(pixels)
    cls = np.array([names.index(r["explained"]) for _, r in items])
    maps = {}
    for key in keys:
        cam = BundleCam.open(bundle, key)
        if graph:
            maps[key] = cam.maps(None, cls, x)
            continue
        with make_runner(bundle, "onnxruntime" if key == "onnx-fp32" else "onnxruntime-" + key.split("-")[1],
                         "cpu") as runner:
            out = runner.request("feature_map").infer(x)
        maps[key] = cam.maps(out.feature_map, cls)
    table_rows, picture = [], []
    for j, (k, r) in enumerate(items):
        stem = f"{k:03d}_{Path(r['image']).stem}"
        keras_png, keras_npy = gradcam_dir / f"{stem}.png", gradcam_dir / f"{stem}.npy"
        native = decode_item(r["image"], None, recipe=None).pixels
        native = native if native is not None else x[j]
        row_pics = [_fit(np.asarray(_read_png(keras_png)))] if keras_png.is_file() else []
        row_pics += [_fit(cammaps.overlay(native, maps[key][j])) for key in keys]
        picture.append(np.concatenate(row_pics, axis=1))
        keras_r = cammaps.map_pearson(np.load(keras_npy), maps["onnx-fp32"][j]) if keras_npy.is_file() else None
        table_rows.append([Path(r["image"]).name, r["explained"],
                           "-" if keras_r is None else f"{keras_r:.4f}",
                           *[("-" if (v := cammaps.map_pearson(maps["onnx-fp32"][j], maps[key][j])) is None else f"{v:.4f}")
                             for key in keys[1:]]])
    width = max(p.shape[1] for p in picture)
    canvas = np.full((sum(p.shape[0] + 6 for p in picture), width, 3), 255, np.uint8)
    y = 0
    for p in picture:
        canvas[y:y + p.shape[0], :p.shape[1]] = p
        y += p.shape[0] + 6
    from PIL import Image

    with atomic_path(out_png, suffix=".png") as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    header = ["image", "explained", "r fp32 vs Keras Grad-CAM", *[f"r {k} vs fp32" for k in keys[1:]]]
    how = "its Grad-CAM graph" if graph else "CAM"
    note = (f"columns: Keras Grad-CAM (transfer gradcam), then the bundle's {', '.join(keys)} maps "
            f"({how} at {bundle.manifest['cam']['layer']}, computed by the runtime without TensorFlow)")
    if all(r[2] == "-" for r in table_rows):
        note += "; r needs the Keras maps' values: `transfer gradcam RUN --method gradcam --save-maps`"
    return BundleMaps(out_png, header, table_rows, note)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


__all__ = ["BundleMaps", "compare"]
