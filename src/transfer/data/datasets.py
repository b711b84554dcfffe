"""Datasets as image folders: scikit-learn's digits, MNIST-format idx files, and synthetic shapes.

The shapes folder is the one dataset whose answer is known pixel by pixel: each image holds
one shape at a random place, and where it is is written beside the images, so a model's
quality (trained from random weights on class-sorted folders) and where its class activation
maps point can both be checked against the truth.

Both writers build the folder under a temporary name next to ``out`` and rename it at
the end, so an interrupted conversion leaves nothing half-done.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from ..options import check_int
from .folder import GIVEN_SPLITS
from .image import is_image_path

FASHION_MNIST_CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))

IDX_LABELS_MAGIC = 2049
IDX_IMAGES_MAGIC = 2051


def _foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` is not part of an image-folder dataset as these writers make it.

    Allowed: class sub-folders holding only image files, and hidden files at either level.
    """
    foreign: list[str] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        hidden = entry.name.startswith(".")
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            if not (hidden and entry.is_file(follow_symlinks=False)):
                foreign.append(entry.name)
            continue
        if hidden:
            foreign.append(entry.name + "/")
            continue
        for sub in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if not sub.is_file(follow_symlinks=False) or not (sub.name.startswith(".") or is_image_path(sub.name)):
                foreign.append(f"{entry.name}/{sub.name}" + ("/" if sub.is_dir(follow_symlinks=False) else ""))
    return foreign


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """Refuse an ``out`` that cannot be (re)placed; returns the absolute path to write.

    ``overwrite`` replaces only a folder that holds nothing but an image-folder dataset
    (replacing deletes the old folder); the current folder or one holding it is never replaced.
    """
    target = Path(os.path.realpath(out))
    if not out.exists():
        return target
    if not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder", hint="choose another OUT")
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == cwd or target in cwd.parents:
        raise DataError(f"output folder {out} is the current folder or holds it; writing it would replace it",
                        hint="give a new sub-folder, e.g. OUT=data/digits")
    if not any(out.iterdir()):
        return target
    foreign = _foreign_entries(target)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise DataError(f"output folder {out} holds more than an image-folder dataset "
                        f"({', '.join(foreign[:3])}{more})",
                        hint="choose an empty or new OUT (--force only replaces a folder that holds nothing "
                             "but class sub-folders of images)")
    if not overwrite:
        raise DataError(f"output folder {out} exists and is not empty",
                        hint="choose another OUT or pass --force to replace it")
    return target


def _write_folder(out: Path, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                  overwrite: bool, extra: dict[str, str] | None = None) -> dict:
    """images uint8 (N, H, W) or (N, H, W, 3); labels int (N,) -> out/<class>/<nnnnn>.png, atomically.

    ``extra``: hidden top-level files to write beside the classes, ``{".name": text}``; a text may
    name an image by ``{path:<index>}`` (replaced by its relative path).
    """
    shown = str(out)
    out = _prepare_out(Path(out), overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset is a normal folder
        width = max(4, len(str(len(images) - 1)))
        counts = {c: 0 for c in class_names}
        paths = []
        for i, (img, lab) in enumerate(zip(images, labels)):
            c = class_names[int(lab)]
            if counts[c] == 0:
                (tmp / c).mkdir()  # classes without images get no (empty) folder
            Image.fromarray(img, mode="L" if img.ndim == 2 else "RGB").save(tmp / c / f"{i:0{width}d}.png",
                                                                            optimize=False)
            paths.append(f"{c}/{i:0{width}d}.png")
            counts[c] += 1
        for name, text in (extra or {}).items():
            (tmp / name).write_text(re.sub(r"\{path:(\d+)\}", lambda m: paths[int(m.group(1))], text))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {c: n for c, n in counts.items() if n}
    return {"out": shown, "classes": len(counts), "images": int(len(images)), "counts": counts}


def write_digits(out: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write scikit-learn's 1,797 handwritten digits as ``out/<digit>/<nnnn>.png``.

    Each image is an 8x8 grayscale PNG, values 0..16 scaled to 0..255.

    Returns:
        ``{"out", "classes": 10, "images": 1797, "counts": {...}}``.

    Raises:
        DataError: ``out`` exists and is not empty (unless ``overwrite``).

    Example::

        write_digits("data/digits")["images"]
        # 1797
    """
    _prepare_out(Path(out), overwrite)
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _write_folder(Path(out), images, d.target.astype(np.int64), MNIST_CLASSES, overwrite)


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {what} file {path}: {exc}",
                        hint="a .gz file may be truncated; download it again") from exc


def read_idx(path: str | os.PathLike, *, kind: str) -> np.ndarray:
    """Parse an MNIST idx file: ``kind="images"`` -> uint8 (N, H, W), ``"labels"`` -> uint8 (N,).

    Raises:
        DataError: wrong magic number (names what was found), truncated file, bad dims.

    Example::

        read_idx("train-labels-idx1-ubyte.gz", kind="labels").shape
        # (60000,)
    """
    p = Path(path)
    want = IDX_IMAGES_MAGIC if kind == "images" else IDX_LABELS_MAGIC
    data = _read_bytes(p, kind)
    if len(data) < 4:
        raise DataError(f"{kind} file {p} is too short to be an idx file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != want:
        known = {IDX_IMAGES_MAGIC: "an idx images file", IDX_LABELS_MAGIC: "an idx labels file"}
        found = known.get(magic, "not an idx file")
        raise DataError(
            f"{kind} file {p} has magic number {magic} ({found}); expected {want} for {kind}",
            hint="give the images file first, then the labels file" if magic in known else
            "give an MNIST-format idx file (plain or .gz)",
        )
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{kind} file {p} is truncated (header incomplete)")
    dims = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    have = len(data) - header
    if have < expected:
        raise DataError(f"{kind} file {p} is truncated: header says {'x'.join(map(str, dims))} "
                        f"({expected} bytes) but only {have} bytes follow")
    if kind == "images" and (dims[1] < 1 or dims[2] < 1):
        raise DataError(f"images file {p} has invalid image size {dims[1]}x{dims[2]}")
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def write_idx(
    images: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    limit: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert an MNIST-format idx pair (plain or .gz) into ``out/<class>/<nnnnn>.png``.

    Args:
        images, labels: the idx3 images file and the idx1 labels file.
        out: output folder (refused if it exists and is not empty, unless ``overwrite``).
        class_names: folder name per label value (default ``"0".."9"`` style: the label).
        limit: convert only the first ``limit`` images.

    Returns:
        ``{"out", "classes", "images", "counts"}``.

    Raises:
        DataError: unreadable / wrong / truncated files, count mismatch, a label with no name.
        ConfigError: bad ``limit``; duplicate, hidden (``.x``) or split-named (``train``...) class names.

    Example::

        write_idx("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "data/fmnist",
                  class_names=FASHION_MNIST_CLASSES)
    """
    if limit is not None:
        limit = check_int(limit, "limit", option="limit")
    _prepare_out(Path(out), overwrite)
    x = read_idx(images, kind="images")
    y = read_idx(labels, kind="labels")
    if len(x) != len(y):
        raise DataError(f"images file {images} holds {len(x)} images but labels file {labels} "
                        f"holds {len(y)} labels", hint="give the matching images/labels pair")
    if limit is not None:
        x, y = x[: int(limit)], y[: int(limit)]
    if len(x) == 0:
        raise DataError(f"images file {images} holds no images")
    if class_names is None:
        class_names = [str(i) for i in range(int(y.max()) + 1)]
    class_names = [str(c) for c in class_names]
    if len(set(class_names)) != len(class_names):
        raise ConfigError(f"class names must be unique (got {', '.join(class_names)})")
    bad_names = [c for c in class_names if not c or "/" in c or "\\" in c or c in (".", "..")]
    if bad_names:
        raise ConfigError(f"class names must be usable as folder names (got {bad_names!r})")
    hidden = [c for c in class_names if c.startswith(".")]
    if hidden:
        raise ConfigError(f"class names must not start with '.' (got {hidden!r}): such folders are hidden "
                          "and not indexed", hint="rename them, e.g. without the leading dot")
    splits = [c for c in class_names if c.lower() in GIVEN_SPLITS]
    if splits:
        raise ConfigError(f"class names {splits!r} would be read as a given split folder "
                          f"({'/, '.join(GIVEN_SPLITS)}/, any case), not as classes",
                          hint="rename them, e.g. add a prefix")
    if int(y.max()) >= len(class_names):
        raise DataError(
            f"labels file {labels} has label {int(y.max())} but only {len(class_names)} class "
            f"names were given ({', '.join(class_names)})",
            hint="give one class name per label value",
        )
    return _write_folder(Path(out), x, y.astype(np.int64), class_names, overwrite)


#: the classes of :func:`write_shapes`, in label order
SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
#: the hidden file of a shapes folder that says where each shape is: ``path,y0,x0,y1,x1`` (pixels)
SHAPE_BOXES = ".boxes.csv"


def shape_images(n: int, size: int = 64, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` RGB images of one random-coloured shape each, at a random place and scale, on noise.

    The class is the shape alone (:data:`SHAPE_CLASSES`): colour, position, size (a quarter
    to a half of the side) and the textured background carry no label, so a classifier has
    to find the shape.

    Returns:
        ``(images uint8 (n, size, size, 3), labels (n,), boxes (n, 4) as y0, x0, y1, x1)``.
    """
    from PIL import ImageDraw

    if size < 16:
        raise ConfigError(f"shape images need a size of at least 16 pixels, got {size}")
    rng = np.random.default_rng([int(seed), 0x5A])
    labels = np.arange(n) % len(SHAPE_CLASSES)
    rng.shuffle(labels)
    images = np.empty((n, size, size, 3), np.uint8)
    boxes = np.zeros((n, 4), np.int64)
    for i, lab in enumerate(labels):
        base = rng.integers(40, 200, size=3)
        bg = np.clip(base + rng.normal(0, 25, size=(size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(bg)
        side = int(rng.integers(size // 4, size // 2 + 1))
        y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        y1, x1 = y0 + side - 1, x0 + side - 1
        colour = tuple(int(v) for v in (base + rng.choice([-1, 1], 3) * rng.integers(70, 120, 3)) % 256)
        draw = ImageDraw.Draw(img)
        if lab == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif lab == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif lab == 2:
            draw.polygon([(x0 + side / 2, y0), (x0, y1), (x1, y1)], fill=colour)
        else:
            w = max(2, side // 4)
            mid_x, mid_y = x0 + side // 2, y0 + side // 2
            draw.rectangle((mid_x - w // 2, y0, mid_x + (w - 1) // 2, y1), fill=colour)
            draw.rectangle((x0, mid_y - w // 2, x1, mid_y + (w - 1) // 2), fill=colour)
        images[i] = np.asarray(img)
        boxes[i] = (y0, x0, y1 + 1, x1 + 1)
    return images, labels.astype(np.int64), boxes


def write_shapes(out: str | os.PathLike, *, images: int = 6000, size: int = 64, seed: int = 0,
                 overwrite: bool = False) -> dict:
    """Write :func:`shape_images` as ``out/<shape>/<nnnn>.png`` and where each shape is as ``out/.boxes.csv``.

    Returns:
        ``{"out", "classes": 4, "images", "counts", "boxes": path of the boxes file}``.

    Raises:
        ConfigError: fewer than 8 images or a size below 16.
        DataError: ``out`` exists and is not empty (unless ``overwrite``).

    Example::

        write_shapes("data/shapes", images=2000, size=64)["counts"]
        # {'circle': 500, 'square': 500, 'triangle': 500, 'cross': 500}
    """
    if isinstance(images, bool) or int(images) < 8:
        raise ConfigError(f"a shapes folder needs at least 8 images, got {images!r}", option="images")
    _prepare_out(Path(out), overwrite)
    x, y, boxes = shape_images(int(images), int(size), seed=seed)
    rows = "".join(f"{{path:{i}}},{b[0]},{b[1]},{b[2]},{b[3]}\n" for i, b in enumerate(boxes))
    info = _write_folder(Path(out), x, y, SHAPE_CLASSES, overwrite, extra={SHAPE_BOXES: "path,y0,x0,y1,x1\n" + rows})
    return {**info, "boxes": str(Path(info["out"]) / SHAPE_BOXES)}


def read_shape_boxes(folder: str | os.PathLike) -> dict[str, tuple[int, int, int, int]]:
    """``{relative path: (y0, x0, y1, x1)}`` of a folder :func:`write_shapes` made.

    Raises:
        DataError: the folder has no (readable) boxes file.
    """
    import csv

    path = Path(folder) / SHAPE_BOXES
    try:
        with open(path, newline="") as f:
            return {r["path"]: (int(r["y0"]), int(r["x0"]), int(r["y1"]), int(r["x1"])) for r in csv.DictReader(f)}
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"cannot read the shape boxes of {folder} ({path.name}): {exc}",
                        hint="make the folder with `transfer data shapes`") from exc
