"""The building blocks of the audit's near-duplicate search (`transfer.data.nearest`,
`transfer.data.near_search`, `transfer.data.near_verify`): the
inverted-file neighbour search, the perceptual-hash multi-index and the verification of
candidate pairs, each against a brute-force or a planted answer."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from transfer.data import near_search, near_verify, nearest
from transfer.data.fingerprint import fingerprint_array


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_nearest_inverted_file_finds_planted_neighbours(monkeypatch):
    """Beyond EXACT_PAIRS the search probes a few clusters only; rows with a close twin (what
    near duplicates are) still find it, and the exact path agrees with a brute-force sort."""
    rng = np.random.default_rng(0)
    base = _unit(rng.standard_normal((6000, 32)))
    twins = _unit(base[:500] + 0.05 * rng.standard_normal((500, 32)).astype(np.float32))
    x = np.concatenate([base, twins])
    brute = x @ x.T
    np.fill_diagonal(brute, -np.inf)
    want = np.argsort(-brute, axis=1)[:, :3]
    idx, sim = nearest.nearest(x, x, 3, same=True)  # 42M pairs: exact
    assert (idx == want).all()
    assert np.allclose(sim, np.take_along_axis(brute, want, axis=1), atol=1e-5)
    monkeypatch.setattr(nearest, "EXACT_PAIRS", 1000)
    idx, sim = nearest.nearest(x, x, 3, same=True)
    found = np.mean(np.concatenate([idx[:500, 0] == np.arange(6000, 6500), idx[6000:, 0] == np.arange(500)]))
    assert found >= 0.99, found
    assert (idx != np.arange(len(x))[:, None]).all()
    assert (np.diff(sim, axis=1) <= 0).all()


def test_phash_multi_index_equals_brute_force():
    """Every pair within `bits` bits is found (pigeonhole on bits+1 bands), no other pair."""
    rng = np.random.default_rng(1)
    h = rng.integers(0, 2 ** 63, 3000, dtype=np.uint64)
    close = h[:300] ^ np.array([sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 8), replace=False))
                                for _ in range(300)], dtype=np.uint64)
    h = np.concatenate([h, close])
    got = {tuple(p) for p in near_search._phash_candidates(h, 6, k=50)}
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    want = {(i, j) for i, j in zip(*np.nonzero(d <= 6)) if i < j}
    assert got == want and len(want) >= 200


def _patch(seed):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    return (ndimage.gaussian_filter(rng.random((40, 40)), 1.5) * 2000 % 255).astype(np.uint8)


def test_verification_tells_copies_from_look_alikes():
    """A resized, a re-compressed and a cropped (1-2 px a side) copy score above the threshold;
    the same picture with its fine detail changed (same shape, other texture) scores below."""
    from scipy import ndimage

    a = _patch(0)
    shape = ndimage.gaussian_filter(a.astype(np.float32), 4)
    other = np.clip(shape + (a.astype(np.float32) - shape)[::-1, ::-1], 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=70)
    copies = [np.asarray(Image.fromarray(a).resize((30, 30), Image.Resampling.BILINEAR)),
              np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L")),
              a[1:39, 0:39]]
    imgs = [a, *copies, other]
    fps = [fingerprint_array(np.stack([x] * 3, axis=-1)) for x in imgs]
    greys = np.stack([f.grey for f in fps])
    scores = near_verify.verify_pairs(greys, np.array([[0, 1], [0, 2], [0, 3], [0, 4]]), crops=near_verify.REFINE_CROPS)
    assert (scores[:3] >= near_verify.NEAR_THRESHOLD).all(), scores
    assert scores[3] < near_verify.NEAR_THRESHOLD - 0.1, scores
    # without trying crops, the cropped copy is not verified
    plain = near_verify.verify_pairs(greys, np.array([[0, 3]]), crops=(0.0,))
    assert plain[0] < scores[2]


def test_verification_pair_by_pair_equals_image_by_image():
    """The two computations of the verification give the same scores (in one thread or two),
    each against a brute-force normalized cross-correlation; a flat image scores 0 against anything."""
    greys = np.stack([np.asarray(Image.fromarray(_patch(s)).resize((32, 32), Image.Resampling.BILINEAR))
                      for s in range(30)] + [np.full((32, 32), 200, np.uint8)])
    rng = np.random.default_rng(3)
    pairs = np.unique(np.sort(rng.integers(0, 30, (120, 2)), axis=1), axis=0)
    pairs = np.concatenate([pairs[pairs[:, 0] != pairs[:, 1]], [[0, 30], [5, 30]]])
    crops = near_verify.VERIFY_CROPS
    pw = near_verify._verify_pairwise(greys, pairs, crops, 1.0, chunk=16)
    by = near_verify._verify_by_image(greys, pairs, crops, 1.0, block=8)
    np.testing.assert_allclose(pw, by, atol=1e-5)
    np.testing.assert_allclose(near_verify._verify_by_image(greys, pairs, crops, 1.0, block=8, workers=2), by, atol=1e-6)
    np.testing.assert_allclose(near_verify._verify_pairwise(greys, pairs, crops, 1.0, chunk=16, workers=2), pw, atol=1e-6)
    assert (pw[-2:] == 0).all() and (pw[:-2] != 0).all()
    # brute force: band-pass each crop of one image, correlate with the other band-passed, best of all
    band = near_verify._band_filter(32, 1.0)
    mats = [near_verify._crop_matrix(a, b, 32) for a in crops for b in crops]

    def ncc(x, y):
        x, y = x - x.mean(), y - y.mean()
        return float((x * y).sum() / np.linalg.norm(x) / np.linalg.norm(y))

    for (i, j), got in zip(pairs[:20], pw[:20]):
        g = greys.astype(np.float64)
        want = max(ncc(band @ cy @ g[a] @ cx.T @ band.T, band @ g[b] @ band.T)
                   for a, b in ((i, j), (j, i)) for cy in mats for cx in mats)
        assert abs(got - want) < 1e-4, (i, j, got, want)
