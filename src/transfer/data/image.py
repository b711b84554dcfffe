"""Decoding and resizing images: the single source of pixels for training and serving.

The trainer, the exporter's verification and the runtime all call :func:`load_image`,
so a deployed model sees exactly the pixels it was trained on (no train/serve skew).
The recipe is recorded in every run and bundle as :data:`PREPROCESSING` and checked by
the runtime.

Decoding uses Pillow: it applies EXIF orientation, handles palette / alpha /
grayscale / 16-bit modes and guards against decompression bombs. Every image becomes
8-bit RGB; alpha is composited onto black (see ``_to_rgb8``).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError

#: Extensions (lower case) that are indexed as images; matching is case-insensitive.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: Images with more pixels than this are refused as "absurd dimensions" (decompression bombs).
DEFAULT_MAX_PIXELS = 64_000_000

#: Memory one decode may hold (per decoding worker): an RGB image at the pixel limit fits
#: (Pillow holds RGB as 4 bytes a pixel); an image whose mode needs more to become RGB at
#: that size (a 1-bit or grayscale PNG of 8000 x 8000) is refused before it is decoded. With
#: W decoding workers, decoding holds at most W times this.
DEFAULT_MAX_DECODE_BYTES = DEFAULT_MAX_PIXELS * 4

_RECIPE_V1 = {
    "version": 1,
    "decoder": "pillow",
    "exif_transpose": True,
    "color": "RGB",
    "alpha": "composite-black",
    "bit_depth": 8,
    "resize": "pillow-bilinear",
    "aspect": "stretch",
    "dtype": "float32",
    "range": [0, 255],
    "layout": "NHWC",
    "normalization": "in-graph",
}

#: How far a large source is shrunk before the bilinear resample (version 2): a JPEG is decoded
#: at 1/2, 1/4 or 1/8 scale in the DCT (Pillow ``Image.draft``) while it stays at least
#: ``DRAFT_MARGIN`` times the model input, and any source at least ``REDUCING_GAP`` times larger
#: than the input is first box-reduced by an integer factor (Pillow ``reducing_gap``). A 12-megapixel
#: photo then costs a fraction of a full decode, and the model sees the same kind of
#: antialiased pixels (measured: mean |difference| from version 1 below 1 grey level).
DRAFT_MARGIN = 2
REDUCING_GAP = 2.0

#: Every recipe this runtime implements, by version. Runs and bundles record theirs; a bundle
#: keeps the recipe it was exported with, so old bundles decode exactly as before.
RECIPES = {
    1: _RECIPE_V1,
    2: {**_RECIPE_V1, "version": 2, "jpeg_draft": f"dct-scaled to >= {DRAFT_MARGIN}x the input",
        "reducing_gap": REDUCING_GAP},
}

#: The recipe new runs and bundles use; written into run folders and bundle manifests. The
#: runtime refuses a bundle whose recipe it does not implement (not one of :data:`RECIPES`).
PREPROCESSING = RECIPES[2]


def recipe_version(recipe: dict | None) -> int:
    """The version of a recorded recipe (``None``: the current one).

    Raises:
        ValueError: a recipe this runtime does not implement (names the fields that differ).
    """
    if recipe is None:
        return int(PREPROCESSING["version"])
    v = recipe.get("version") if isinstance(recipe, dict) else None
    known = RECIPES.get(v) if isinstance(v, int) and not isinstance(v, bool) else None
    if known is None or dict(recipe) != known:
        ref = known or PREPROCESSING
        diff = sorted(k for k in set(ref) | set(recipe or {}) if (recipe or {}).get(k) != ref.get(k))
        raise ValueError(f"pixel recipe not implemented here (differs in: {', '.join(diff) or 'version'})")
    return int(v)

ImageFile.LOAD_TRUNCATED_IMAGES = False


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has an image extension (any case)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb8(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (16-bit scaled, palette expanded, alpha flattened)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = np.nan_to_num((arr - lo) * scale)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    if mode.startswith("I;16") or mode.startswith("BGR"):
        return img.convert("RGB")
    return img.convert("RGB")


def decode_bytes_needed(width: int, height: int, mode: str) -> int:
    """Bytes decoding a ``width`` x ``height`` image of Pillow ``mode`` to 8-bit RGB holds at
    once: the decoded image plus what the conversion to RGB allocates (Pillow keeps RGB as 4
    bytes a pixel). A 1-bit PNG of a few KB can need hundreds of MB; this is what the
    per-worker decode budget is checked against before any pixel is decoded."""
    n = int(width) * int(height)
    raw = _RAW_BYTES.get(mode, 4)
    if mode == "RGB":
        extra = 0
    elif mode in _ALPHA_MODES or (mode == "P"):
        extra = 16  # RGBA copy, black background, composite, RGB (a palette may carry transparency)
    elif mode.startswith("I") or mode == "F":
        extra = 8 + 1 + 4  # float64 rescale, 8-bit copy, RGB
    else:
        extra = 4  # the RGB copy
    return n * (raw + extra)


_RAW_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "LA": 4, "La": 4, "PA": 4}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _file_source(path: str | os.PathLike) -> Path:
    """``path`` if it is a regular, non-empty file, else ImageDecodeError saying what it is."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise ImageDecodeError(p, f"cannot read file: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(p, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a plain file")
        raise ImageDecodeError(p, f"not a regular file ({kind})")
    if st.st_size == 0:
        raise ImageDecodeError(p, "empty file (0 bytes)")
    return p


def decode_image(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_DECODE_BYTES
) -> np.ndarray:
    """Decode one file to an 8-bit RGB array of shape (H, W, 3).

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, not an image, a
            directory, not a regular file (a FIFO, a device), has absurd dimensions, or would
            need more than ``max_bytes`` of memory to decode; ``reason`` says which.
    """
    p = _file_source(path)
    return np.asarray(_decode_source(p, p, max_pixels, max_bytes), dtype=np.uint8)


def decode_image_bytes(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                       max_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> np.ndarray:
    """Decode an image held in memory (e.g. an object read from S3) exactly like
    :func:`decode_image` decodes a file; ``name`` is what errors report.

    Raises:
        ImageDecodeError: empty, truncated, not an image, absurd dimensions, or over the
            decode budget.

    Example::

        decode_image_bytes(Path("a.png").read_bytes(), "a.png").shape
        # (8, 8, 3)
    """
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    return np.asarray(_decode_source(io.BytesIO(data), name, max_pixels, max_bytes), dtype=np.uint8)


def _draft(img: Image.Image, target: tuple[int, int] | None) -> None:
    """Recipe 2: let a JPEG decode at 1/2, 1/4 or 1/8 scale while it stays at least
    ``DRAFT_MARGIN`` times ``target`` = (H, W) (in the file's stored orientation)."""
    if target is None or img.format not in ("JPEG", "MPO"):  # MPO: cameras' multi-picture JPEGs
        return
    h, w = (int(v) * DRAFT_MARGIN for v in target)
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: the transpose step ignores it too
        orientation = 1
    if orientation in (5, 6, 7, 8):  # stored rotated by 90 degrees: the model's height is the file's width
        h, w = w, h
    img.draft(None, (w, h))


def _decode_source(src, p, max_pixels: int, max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
                   draft_to: tuple[int, int] | None = None) -> Image.Image:
    """Pillow decode of ``src`` (a path or a binary file object) to an 8-bit RGB image; ``p``
    names it in errors. The dimensions and the memory decoding needs are checked from the
    header, before any pixel is decoded; ``draft_to`` (recipe 2): the model input size a JPEG
    may be DCT-scaled toward (:func:`_draft`)."""
    img = rgb = None
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below names the dimensions; Pillow's hard
            # DecompressionBombError (2x its warning limit) still applies first
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(src)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageDecodeError(p, f"invalid dimensions {w}x{h}")
            if w * h > max_pixels:
                raise ImageDecodeError(
                    p, f"absurd dimensions {w}x{h} ({w * h:,} pixels > limit {max_pixels:,})"
                )
            _draft(img, draft_to)
            need = decode_bytes_needed(*img.size, img.mode)
            if need > max_bytes:
                raise ImageDecodeError(
                    p, f"too large to decode: {w}x{h} {img.mode} needs about {need / 2**20:,.0f} MiB, over the "
                       f"per-worker decode budget of {max_bytes / 2**20:,.0f} MiB")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no second full-size copy
            rgb = _to_rgb8(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(p, "not an image (unknown or unsupported format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(p, f"absurd dimensions: {exc}") from exc
    except (PermissionError, FileNotFoundError, IsADirectoryError) as exc:  # the file, not its contents
        raise ImageDecodeError(p, f"cannot read file: {exc.strerror or exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            reason = f"truncated or corrupt image data ({msg})"
        else:
            reason = f"corrupt image ({msg})"
        raise ImageDecodeError(p, reason) from exc
    except MemoryError as exc:
        raise ImageDecodeError(p, "too large to decode in memory") from exc
    finally:
        if img is not None and rgb is not img:
            img.close()  # the decoded source, now converted (or failed)
        elif img is not None and getattr(img, "fp", None) is not None:
            img.fp.close()  # keep the pixels, release the file
            img.fp = None
    if rgb.mode != "RGB":
        raise ImageDecodeError(p, f"unexpected decoded mode {rgb.mode}")
    return rgb


def _resize_rgb(img: Image.Image, size: tuple[int, int], version: int = 1) -> Image.Image:
    h, w = int(size[0]), int(size[1])
    if img.size == (w, h):
        return img
    gap = REDUCING_GAP if version >= 2 else None
    return img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=gap)


def resize_image(arr: np.ndarray, size: tuple[int, int], *, recipe: dict | None) -> np.ndarray:
    """Resize an 8-bit RGB array to ``size`` = (height, width) with Pillow bilinear (after a
    box reduction of large sources in recipe 2); ``recipe``: the run's or bundle's (``None``: the current one).

    Stretches (no crop, no padding), as recorded in :data:`PREPROCESSING`.
    """
    h, w = int(size[0]), int(size[1])
    if arr.shape[0] == h and arr.shape[1] == w:
        return arr
    return np.asarray(_resize_rgb(Image.fromarray(arr, mode="RGB"), size, recipe_version(recipe)), dtype=np.uint8)


def load_image(
    path: str | os.PathLike,
    size: tuple[int, int] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    recipe: dict | None = None,
) -> np.ndarray:
    """Decode ``path`` and resize it to ``size`` = (H, W): uint8 RGB array (H, W, 3).

    This is the one function that turns a file into model pixels, for training and
    serving alike. The model's graph takes these pixels as float32 in [0, 255] and does
    its own normalization. ``recipe``: the recorded recipe of the run or bundle the pixels
    are for (``None``: :data:`PREPROCESSING`); version 1 decodes at full size and resizes
    bilinearly, version 2 first shrinks large sources (JPEG DCT scaling, box reduction).

    Raises:
        ImageDecodeError: the file cannot be decoded (the reason says why).
        ValueError: a recipe this runtime does not implement.

    Example::

        x = load_image("data/digits/3/0001.png", (32, 32))
        x.shape, x.dtype            # ((32, 32, 3), dtype('uint8'))
    """
    version = recipe_version(recipe)
    p = _file_source(path)
    return _pixels(_decode_source(p, p, max_pixels, max_bytes, _draft_target(size, version)), size, version)


def _draft_target(size, version: int):
    return tuple(size) if size is not None and version >= 2 else None


def _pixels(img: Image.Image, size, version: int) -> np.ndarray:
    return np.asarray(_resize_rgb(img, size, version) if size is not None else img, dtype=np.uint8)


def load_image_bytes(data: bytes, name: str, size: tuple[int, int] | None = None, *,
                     max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
                     recipe: dict | None = None) -> np.ndarray:
    """:func:`load_image` for an image held in memory (an object read from S3, an upload)."""
    version = recipe_version(recipe)
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    img = _decode_source(io.BytesIO(data), name, max_pixels, max_bytes, _draft_target(size, version))
    return _pixels(img, size, version)
