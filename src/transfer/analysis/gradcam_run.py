"""``transfer gradcam`` on a run folder: explain images of a trial, write overlays, grids and faithfulness.

:func:`explain_run` picks the trial, its target layer (:mod:`transfer.analysis.cam_layers`) and
the images (files or folders, or random test images), decodes them with the run's pixel recipe,
computes each method's maps and faithfulness (:mod:`transfer.analysis.gradcam`), and writes per
method ``RUN/gradcam/<trial>/<method>/``: overlays (flagged maps framed), a captioned
``grid.png`` titled with the method's verdict, ``maps.csv`` and ``faithfulness.json``; and the
trial's merged ``faithfulness.json``, which :mod:`transfer.analysis.cam_verdict` ranks (the
report leads with the method that beats its control).

Example::

    from transfer.analysis.gradcam_run import explain_run
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
from ..data.stream import decode_batches, decode_item, iter_inputs
from ..errors import ConfigError, DataError, RunFolderError
from ..faithfulness import Faithfulness, per_image_rows
from ..fsutil import atomic_path, read_json, write_json_atomic
from ..maps_config import FaithOptions
from ..plots import figure, save_figure
from ..progress import ProgressLike, as_progress
from ..runfolder import RunFolder
from .cam_layers import MIN_MAP_SIDE, layer_geometry, map_side, resolve_layer
from .cam_verdict import (
    current_entries,
    faithfulness_table,
    rank_methods,
    shares_text,
    verdict_lines,
)
from .gradcam import compute_maps, map_faithfulness
from .gradcam_config import CamOptions, GradcamConfig, with_options

#: Most cells a grid.png shows (every overlay is still written on its own).
MAX_GRID = 48


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
        return title + f"\nbeats another image's map on {shares_text(faith)}"
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


def _explain_method(tg: _Target, meth: str, res: GradcamResult, *, save_maps: bool, faith_opts: FaithOptions,
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
        ov = cammaps.mark_flag(cammaps.overlay(_native_pixels(path, tg.x[k]), m), flags[k])
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
        side = map_side(model, default)
        note = (f"layer {default} gives a {side} x {side} map at this input size, too coarse to say where "
                f"(fewer than {MIN_MAP_SIDE} cells a side): explaining {tgt.name} "
                f"({map_side(model, tgt.name)} cells a side) instead; --layer chooses another")
        p.say(note)
    x, items = _decode(items, t.image_size, p, recipe=run.recipe)
    tg = _Target(run, t, model, tgt.name, items, x, explained, run.gradcam_dir(t.name), note)
    merged_path = tg.out_dir / "faithfulness.json"
    merged = current_entries(read_json(merged_path)) if merged_path.is_file() else {}
    res = GradcamResult(out_dir=tg.out_dir, trial=t.name, layer=tgt.name, methods=meths,
                        images=[str(q) for q, _ in items], layer_note=note)
    for meth in meths:
        faith = _explain_method(tg, meth, res, save_maps=cfg.save_maps, faith_opts=faith_opts,
                                scorecam_channels=cfg.cam.scorecam_channels, p=p)
        merged[meth] = res.faithfulness[meth] = faith
    write_json_atomic(merged_path, merged)
    res.files.append(merged_path)
    return res


__all__ = ["MAX_GRID", "GradcamResult", "explain_run"]
