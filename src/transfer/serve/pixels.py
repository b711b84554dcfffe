"""Uploaded bytes -> model pixels: the runtime's own decode and resize, nothing else.

``transfer infer`` reads a URI with :func:`transfer.data.image.decode_image_bytes` and
:func:`transfer.data.image.resize_image` (:func:`transfer.data.stream.decode_item`), and a
file with ``load_image``, which is the same Pillow decode and resize: so a served image gets
exactly the pixels ``transfer infer`` gives the same file. This is the one call site of the
server; a change of the pixel recipe changes it here.
"""

from __future__ import annotations

import numpy as np

from ..data.image import decode_image_bytes, resize_image
from ..errors import ImageDecodeError


def decode_upload(data: bytes, name: str, size: tuple[int, int], *, max_pixels: int) -> np.ndarray:
    """Decode an uploaded image and resize it to ``size`` = (H, W): uint8 RGB (H, W, 3).

    Raises:
        ImageDecodeError: empty, truncated, not an image, or more than ``max_pixels`` pixels
            (``reason`` says which; :func:`status_of` maps it to an HTTP status).

    Example::

        x = decode_upload(Path("cat.jpg").read_bytes(), "cat.jpg", (224, 224), max_pixels=50_000_000)
    """
    return resize_image(decode_image_bytes(data, name, max_pixels=max_pixels), size)


def status_of(exc: ImageDecodeError) -> tuple[int, str]:
    """The HTTP status of a decode failure and a hint for the client.

    413 for too many pixels (a decompression bomb or a huge photo), 415 for bytes that are
    no image format the decoder knows, 400 for an image that is empty, truncated or corrupt.
    """
    reason = exc.reason.lower()
    if reason.startswith("absurd dimensions") or "too large" in reason:
        return 413, "send a smaller image (downscale it before uploading)"
    if reason.startswith("not an image") or reason.startswith("unexpected decoded shape"):
        return 415, "send a JPEG, PNG, BMP, WebP or TIFF image"
    return 400, "the image data is damaged or incomplete; send the whole file"


__all__ = ["decode_upload", "status_of"]
