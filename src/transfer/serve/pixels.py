"""Uploaded bytes -> model pixels: the runtime's own decode and resize, nothing else.

``transfer infer`` reads a URI with :func:`transfer.data.image.load_image_bytes` and a file
with ``load_image``, the same Pillow decode and resize with the bundle's recorded recipe: so
a served image gets exactly the pixels ``transfer infer`` gives the same file. This is the one
call site of the server.
"""

from __future__ import annotations

import numpy as np

from ..data.image import load_image_bytes
from ..errors import ImageDecodeError


def decode_upload(data: bytes, name: str, size: tuple[int, int], *, max_pixels: int,
                  recipe: dict | None = None) -> np.ndarray:
    """Decode an uploaded image and resize it to ``size`` = (H, W): uint8 RGB (H, W, 3).

    Raises:
        ImageDecodeError: empty, truncated, not an image, or more than ``max_pixels`` pixels
            (``reason`` says which; :func:`status_of` maps it to an HTTP status).

    ``recipe``: the bundle's recorded pixel recipe (``Bundle.recipe``).

    Example::

        x = decode_upload(Path("cat.jpg").read_bytes(), "cat.jpg", (224, 224), max_pixels=50_000_000)
    """
    return load_image_bytes(data, name, size, max_pixels=max_pixels, recipe=recipe)


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
