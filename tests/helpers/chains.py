"""Chains of duplicate images built from real pictures: an original A, a copy B (A cropped by
4.5 % a side and enlarged) and a copy of the copy C (B cropped by 4.5 % a side). Each of A~B and
B~C verifies as a near duplicate; A~C, cropped twice over, does not -- so a grouping around
A (a star) leaves C out, and only the connected component keeps all three together."""

from __future__ import annotations

import numpy as np
from PIL import Image

#: crop of each side, per step of the chain (the verification tries crops up to 4 %)
CHAIN_CROP = 0.045


def _crop(im: Image.Image, frac: float) -> Image.Image:
    c = int(round(frac * im.width))
    return im.crop((c, c, im.width - c, im.height - c))


def chain(original: np.ndarray) -> list[Image.Image]:
    """``[A, B, C]`` from an RGB uint8 picture ``A``."""
    a = Image.fromarray(np.ascontiguousarray(original, dtype=np.uint8)).convert("RGB")
    b = _crop(a, CHAIN_CROP).resize((a.width * 11 // 8, a.height * 11 // 8), Image.Resampling.BILINEAR)
    return [a, b, _crop(b, CHAIN_CROP)]


def photo_patches(n: int, side: int = 96) -> list[np.ndarray]:
    """``n`` patches of scikit-learn's two sample photographs (china, flower), ``side`` pixels square."""
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        for y in range(40, photo.shape[0] - side, 110):
            for x in range(40, photo.shape[1] - side, 130):
                out.append(np.ascontiguousarray(photo[y:y + side, x:x + side]))
    return out[:n]


def big_digits(n: int, side: int = 64) -> list[np.ndarray]:
    """``n`` of scikit-learn's real handwritten digits, enlarged (bicubic) to ``side`` pixels, RGB."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return [np.asarray(Image.fromarray((d.images[k] * 255 / 16).astype(np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC).convert("RGB")) for k in range(n)]


def star_groups(n: int, pairs) -> list[list[int]]:
    """How duplicate groups were made before they were connected components: pairs best score
    first, an item joining a group only through a pair with the group's first item. Kept here to
    show that a chain's end falls out of such a group."""
    rep: dict[int, int] = {}
    for p in sorted(pairs, key=lambda p: -(p[2] if len(p) > 2 else 1.0)):
        i, j = int(p[0]), int(p[1])
        ri, rj = rep.get(i), rep.get(j)
        if ri is None and rj is None:
            rep[i] = rep[j] = min(i, j)
        elif rj is None and ri == i:
            rep[j] = i
        elif ri is None and rj == j:
            rep[i] = j
    out: dict[int, list[int]] = {}
    for i, r in rep.items():
        out.setdefault(r, []).append(i)
    return sorted((sorted(g) for g in out.values() if len(g) > 1), key=lambda g: g[0])
