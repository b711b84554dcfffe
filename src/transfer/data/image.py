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
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError

#: Extensions (lower case) that are indexed as images; matching is case-insensitive.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: Images with more pixels than this are refused as "absurd dimensions" (decompression bombs).
DEFAULT_MAX_PIXELS = 64_000_000

#: The exact preprocessing recipe; written into run folders and bundle manifests. The
#: runtime refuses a bundle whose recipe it does not implement.
PREPROCESSING = {
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


def decode_image(
    path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one file to an 8-bit RGB array of shape (H, W, 3).

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, not an image, a
            directory, or has absurd dimensions; ``reason`` says which.
    """
    p = Path(path)
    try:
        if p.is_dir():
            raise ImageDecodeError(p, "is a directory, not an image file")
        size = p.stat().st_size
    except ImageDecodeError:
        raise
    except OSError as exc:
        raise ImageDecodeError(p, f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise ImageDecodeError(p, "empty file (0 bytes)")
    return _decode_source(p, p, max_pixels)


def decode_image_bytes(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image held in memory (e.g. an object read from S3) exactly like
    :func:`decode_image` decodes a file; ``name`` is what errors report.

    Raises:
        ImageDecodeError: empty, truncated, not an image, or absurd dimensions.

    Example::

        decode_image_bytes(Path("a.png").read_bytes(), "a.png").shape
        # (8, 8, 3)
    """
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    return _decode_source(io.BytesIO(data), name, max_pixels)


def _decode_source(src, p, max_pixels: int) -> np.ndarray:
    """Pillow decode of ``src`` (a path or a binary file object) to 8-bit RGB; ``p`` names it in errors."""
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below names the dimensions; Pillow's hard
            # DecompressionBombError (2x its warning limit) still applies first
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ImageDecodeError(p, f"invalid dimensions {w}x{h}")
                if w * h > max_pixels:
                    raise ImageDecodeError(
                        p, f"absurd dimensions {w}x{h} ({w * h:,} pixels > limit {max_pixels:,})"
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb8(img)
                arr = np.asarray(rgb, dtype=np.uint8)
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
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(p, f"unexpected decoded shape {arr.shape}")
    return arr


def resize_image(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an 8-bit RGB array to ``size`` = (height, width) with Pillow bilinear.

    Stretches (no crop, no padding), as recorded in :data:`PREPROCESSING`.
    """
    h, w = int(size[0]), int(size[1])
    if arr.shape[0] == h and arr.shape[1] == w:
        return arr
    img = Image.fromarray(arr, mode="RGB")
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)


def load_image(
    path: str | os.PathLike,
    size: tuple[int, int] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode ``path`` and resize it to ``size`` = (H, W): uint8 RGB array (H, W, 3).

    This is the one function that turns a file into model pixels, for training and
    serving alike. The model's graph takes these pixels as float32 in [0, 255] and does
    its own normalization.

    Example::

        x = load_image("data/digits/3/0001.png", (32, 32))
        x.shape, x.dtype
        # ((32, 32, 3), dtype('uint8'))
    """
    arr = decode_image(path, max_pixels=max_pixels)
    return resize_image(arr, size) if size is not None else arr
