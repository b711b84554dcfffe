"""transfer.maps: one definition of a map (upsampling, normalization, flags, overlay); its
faithfulness (transfer.faithfulness: deletion, insertion, ROAD against another image's map, with
pixels removed by transfer.map_removal), with a numpy model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers.processes import run_without

from transfer.errors import ConfigError
from transfer.faithfulness import (
    Faithfulness,
    control_maps,
    faithfulness,
    per_image_rows,
    sign_test,
    summarize_faithfulness,
)
from transfer.map_removal import impute_linear, noise_level, substrate
from transfer.maps import (
    border_ring,
    even_geometry,
    jet,
    map_flags,
    mark_flag,
    overlay,
    pointing_hits,
    to_input_maps,
    upsample,
)
from transfer.maps_config import DEFAULT_CONTROLS

# --------------------------------------------------------------------------- making maps


def test_upsample_uses_half_pixel_centres_and_clamped_edges():
    a = np.array([[[0.0, 1.0]]])  # (1, 1, 2)
    np.testing.assert_allclose(upsample(a, (1, 4))[0, 0], [0.0, 0.25, 0.75, 1.0])
    const = np.full((2, 3, 5, 4), 7.0)
    assert upsample(const, (9, 11)).shape == (2, 9, 11, 4)
    np.testing.assert_allclose(upsample(const, (9, 11)), 7.0, rtol=1e-6)
    ramp = np.arange(4, dtype=float)[None, None, :].repeat(4, 1)  # value = column
    up = upsample(ramp, (4, 8))[0, 0]
    np.testing.assert_allclose(up[1:-1], (np.arange(1, 7) + 0.5) / 2 - 0.5, atol=1e-6)  # linear inside


def test_upsample_puts_cells_where_the_geometry_says():
    cells = np.arange(14, dtype=float)[None, None, :].repeat(2, 1)  # value = cell index
    up = upsample(cells, (2, 32), geometry=((1.0, 0.5), (2.0, 2.5)))[0, 0]  # cell r centred at 2r + 2.5
    assert up[2] == pytest.approx(0.0) and up[4] == pytest.approx(1.0) and up[28] == pytest.approx(13.0)
    assert up[3] == pytest.approx(0.5) and up[0] == up[1] == 0.0 and up[31] == 13.0  # clamped beyond the centres
    even = even_geometry((7, 5), (24, 20))
    a = np.random.default_rng(0).normal(size=(2, 7, 5))
    np.testing.assert_allclose(upsample(a, (24, 20), geometry=even), upsample(a, (24, 20)), atol=1e-6)


def test_to_input_maps_relu_normalize_and_empty():
    cams = np.array([
        [[0.0, 2.0], [-1.0, 1.0]],          # ordinary
        [[-1.0, -2.0], [-3.0, -0.5]],       # no positive evidence
        [[np.nan, np.inf], [-np.inf, 0.0]],  # nothing finite and positive
        [[1e-9, -1.0], [-1.0, -1.0]],       # a crumb of positive evidence: empty
    ])
    m = to_input_maps(cams, (4, 4))
    assert m.shape == (4, 4, 4) and m.dtype == np.float32 and np.isfinite(m).all()
    assert m[0].max() == pytest.approx(1.0) and m[0].min() >= 0
    assert not m[1:].any()
    assert map_flags(m) == ["", "empty", "empty", "empty"]
    with pytest.raises(ValueError, match=r"\(N, h, w\)"):
        to_input_maps(np.zeros((4, 4)), (4, 4))


def test_flags_border_and_ring():
    size = 32
    ring = border_ring((size, size))
    assert ring[:2].all() and ring[:, :2].all() and not ring[2:-2, 2:-2].any()  # 1/16 of 32 = 2 px
    yy, xx = np.mgrid[:size, :size]
    centre = np.exp(-((yy - 15.5) ** 2 + (xx - 15.5) ** 2) / 20.0)
    edge = np.exp(-((yy - 0) ** 2) / 2.0) * np.ones_like(xx)  # a band along the top edge
    flat = np.ones((size, size))
    assert map_flags(np.stack([centre, edge, flat, np.zeros((size, size))])) == ["", "border", "", "empty"]


def test_pointing_game_uses_the_peak_plateau():
    m = np.zeros((3, 16, 16), np.float32)
    m[0, 4:8, 4:8] = 1.0                      # plateau centred at (5.5, 5.5)
    m[1, 12, 12] = 1.0
    boxes = np.array([[4, 4, 8, 8], [0, 0, 4, 4], [0, 0, 16, 16]])
    assert pointing_hits(m, boxes).tolist() == [True, False, False]  # an empty map never hits
    assert pointing_hits(m, boxes, margin=9).tolist() == [True, True, False]


def test_jet_is_matplotlibs_jet():
    mpl = pytest.importorskip("matplotlib")
    from matplotlib import colormaps

    v = np.arange(256) / 255.0
    lut = colormaps["jet"](np.arange(256))[:, :3]  # the 256-entry table matplotlib draws with
    assert np.abs(jet(v) - lut).max() < 0.01, mpl.__version__


def test_overlay_sizes_and_flag_frames():
    small = overlay(np.zeros((8, 6, 3), np.uint8), np.ones((4, 4)))
    assert small.shape == (176, 132, 3)  # integer nearest-neighbour enlargement (x22)
    big = overlay(np.full((1000, 700, 3), 200, np.uint8), np.zeros((10, 10)))
    assert big.shape == (512, 358, 3)
    hot = overlay(np.zeros((16, 16, 3), np.uint8), np.ones((16, 16)))
    cold = overlay(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16)))
    assert hot[..., 0].mean() > cold[..., 0].mean() and cold[..., 2].mean() > hot[..., 2].mean()  # jet: red vs blue
    assert mark_flag(hot, "") is hot
    framed = mark_flag(hot, "border")
    assert (framed[0, :, 0] == 230).all() and (framed[64, 64] == hot[64, 64]).all()
    dashed = mark_flag(cold, "empty")
    assert (dashed[0, 0] == 128).all() and not (dashed[0] == 128).all()


# --------------------------------------------------------------------------- removal


@pytest.mark.parametrize("solver", ["banded", "lu"])
def test_imputation_is_the_neighbour_mean_and_keeps_known_pixels(solver, monkeypatch):
    """Both solvers of the hole's system (banded Cholesky below ``BANDED_WORK``, sparse LU above)."""
    from transfer import map_removal

    monkeypatch.setattr(map_removal, "BANDED_WORK", float("inf") if solver == "banded" else -1.0)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :20].astype(float)
    ramp = np.stack([3 * yy + 2 * xx, 100 - xx, 50 + yy], axis=-1)  # linear: its own neighbour mean inside
    removed = np.zeros((20, 20), bool)
    removed[5:12, 6:15] = True
    out = impute_linear(ramp, removed, noise=0.0)
    np.testing.assert_allclose(out, ramp, atol=1e-3)
    noisy = rng.uniform(0, 255, (20, 20, 3))
    out = impute_linear(noisy, removed, noise=0.0)
    assert (out[~removed] == noisy[~removed].astype(np.float32)).all()
    # every imputed pixel is the weighted mean (1/6 edge, 1/12 diagonal) of its 8 neighbours
    w = np.array([[1, 2, 1], [2, 0, 2], [1, 2, 1]]) / 12.0
    for y, x in zip(*np.nonzero(removed)):
        nb = out[y - 1:y + 2, x - 1:x + 2]
        np.testing.assert_allclose(out[y, x], (nb * w[..., None]).sum((0, 1)), atol=1e-3)
    flat = np.full((20, 20, 3), 100.0)
    z = impute_linear(flat, removed, noise=10.0, rng=rng)
    assert 8.0 < z[removed].std() < 12.0 and (z[~removed] == 100).all()
    with pytest.raises(ValueError, match="every pixel"):
        impute_linear(flat, np.ones((20, 20), bool))


def test_substrates_and_noise_level():
    rng = np.random.default_rng(1)
    x = np.clip(100 + rng.normal(0, 20, (2, 32, 32, 3)), 0, 255).astype(np.float32)
    assert noise_level(x) == pytest.approx([20, 20], rel=0.1)
    assert (substrate(x, "zero") == 0).all()
    x[1, :20] = 0  # most of the image black: its median colour is black, its mean is not
    med = substrate(x, "median")
    assert (med[1] == 0).all() and (substrate(x, "mean")[1] > 20).all()
    mean = substrate(x, "mean")
    np.testing.assert_allclose(mean[0, 3, 4], x[0].reshape(-1, 3).mean(0), rtol=1e-5)
    blur = substrate(x, "blur")
    assert blur.shape == x.shape and blur[0].std() < 0.2 * x[0].std()


def test_controls_are_other_images_maps():
    rng = np.random.default_rng(0)
    m = rng.random((7, 8, 8)).astype(np.float32)
    m[3] = 0.0  # empty
    live = [i for i in range(7) if i != 3]
    ctrl, src = control_maps(m, seed=1)
    assert ctrl.shape == (7, 1, 8, 8) and src.shape == (7, 1)
    assert all(src[i, 0] != i and src[i, 0] in live for i in range(7))
    assert sorted(src[live, 0].tolist()) == live  # a derangement of the non-empty maps
    np.testing.assert_array_equal(ctrl[:, 0], m[src[:, 0]])
    ctrl, src = control_maps(m, count=3, seed=1)
    assert ctrl.shape == (7, 3, 8, 8)
    for i in range(7):
        assert len(set(src[i])) == 3 and i not in src[i] and set(src[i]) <= set(live)
    one = np.zeros((3, 8, 8), np.float32)
    one[0, 1, 1] = 1.0  # fewer than two non-empty maps: shifted controls
    ctrl, src = control_maps(one)
    assert (src == -1).all() and ctrl[0, 0, 5, 5] == 1.0
    with pytest.raises(ConfigError, match="unknown control"):
        control_maps(m, control="mirror")


# --------------------------------------------------------------------------- faithfulness


SIZE = 32


def _square_world(n: int, seed: int = 0):
    """Grey noisy images with one bright 8x8 square; a numpy "model" whose class-0 probability
    grows with the brightest 8x8 cell of the image."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(60, 100, (n, SIZE, SIZE, 3)).astype(np.float32)
    pos = rng.integers(0, SIZE // 8, (n, 2)) * 8
    for i, (a, b) in enumerate(pos):
        x[i, a:a + 8, b:b + 8] = 250

    def predict(xb):
        g = xb.mean(-1).reshape(len(xb), SIZE // 8, 8, SIZE // 8, 8).mean((2, 4))
        p = 1 / (1 + np.exp(-(g.max((1, 2)) - 150) / 20))
        return np.stack([p, 1 - p], 1)

    return x, pos, predict


def _blobs(centres, sigma=4.0):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return np.stack([np.exp(-((yy - a) ** 2 + (xx - b) ** 2) / (2 * sigma ** 2)) for a, b in centres]).astype(np.float32)


def test_faithful_maps_beat_their_control_and_blobs_do_not():
    n = 30
    x, pos, predict = _square_world(n)
    cls = np.zeros(n, int)
    rng = np.random.default_rng(5)
    cases = {"true": _blobs(pos + 3.5), "random blob": _blobs(rng.uniform(0, SIZE, (n, 2))),
             "centre blob": _blobs(np.full((n, 2), SIZE / 2 - 0.5))}
    out = {}
    for name, maps in cases.items():
        res = faithfulness(predict, x, maps, cls, steps=8, baseline="mean", seed=0)
        assert isinstance(res, Faithfulness) and res.deletion.shape == (n, 1 + DEFAULT_CONTROLS, 9)
        assert res.road_morf.shape == (n, 1 + DEFAULT_CONTROLS, 7)
        out[name] = summarize_faithfulness(res)
        print(name, {k: round(v["map_beats_control"], 2) for k, v in out[name]["metrics"].items()})
    true = out["true"]
    for k in ("deletion_auc", "insertion_auc", "road_morf", "road_lerf"):
        assert true["metrics"][k]["map_beats_control"] >= 0.9, k
    assert true["beats_control"] and true["min_share_deletion_road"] >= 0.9
    assert true["metrics"]["deletion_auc"]["map"] < true["metrics"]["deletion_auc"]["control"]
    assert true["metrics"]["deletion_auc"]["sign_test_p"] < 1e-6
    for name in ("random blob", "centre blob"):
        assert not out[name]["beats_control"], name
        for k in ("deletion_auc", "road_morf"):
            assert out[name]["metrics"][k]["map_beats_control"] <= 0.65, (name, k)
    # the centre blob's control is the same map: equal numbers, never a win
    assert out["centre blob"]["metrics"]["deletion_auc"]["map_beats_control"] == 0.0
    # curves start at the unchanged image and end at the baseline, for map and control alike
    c = true["curves"]
    assert c["deletion"]["map"][0] == c["deletion"]["control"][0] == c["insertion"]["map"][-1]
    assert c["fractions"] == pytest.approx(np.linspace(0, 1, 9).tolist())


def test_several_controls_take_their_median():
    n = 24
    x, pos, predict = _square_world(n, seed=3)
    rng = np.random.default_rng(9)
    true = faithfulness(predict, x, _blobs(pos + 3.5), np.zeros(n, int), steps=4, controls=3, road=False)
    blob = faithfulness(predict, x, _blobs(rng.uniform(0, SIZE, (n, 2))), np.zeros(n, int), steps=4, controls=3,
                        road=False)
    assert true.deletion.shape == (n, 4, 5) and true.control_source.shape == (n, 3)
    d = np.trapezoid(true.deletion, true.fractions, axis=-1)
    np.testing.assert_allclose(true.scores()["deletion_auc"][:, 1], np.median(d[:, 1:], axis=1))
    s_true, s_blob = summarize_faithfulness(true), summarize_faithfulness(blob)
    assert s_true["controls"] == 3 and s_true["metrics"]["deletion_auc"]["map_beats_control"] >= 0.9
    assert 0.2 <= s_blob["metrics"]["deletion_auc"]["map_beats_control"] <= 0.8
    with pytest.raises(ConfigError, match="invalid controls: 0"):
        faithfulness(predict, x, _blobs(pos), np.zeros(n, int), controls=0)


def test_controls_come_from_images_of_another_class():
    """On centred data a same-class image's map is nearly this one's: controls are drawn from other classes."""
    n = 20
    x, pos, predict = _square_world(n, seed=4)
    cls = np.arange(n) % 2
    res = faithfulness(predict, x, _blobs(pos + 3.5), cls, steps=4, road=False)
    assert res.control_source.shape == (n, DEFAULT_CONTROLS) and res.other_class
    assert (cls[res.control_source] != cls[:, None]).all()
    anyc = faithfulness(predict, x, _blobs(pos + 3.5), cls, steps=4, road=False, control_class="any")
    assert (cls[anyc.control_source] == cls[:, None]).any() and summarize_faithfulness(anyc)["control_class"] == "any"


def test_images_the_baseline_keeps_are_not_measured():
    """Where the removal baseline alone keeps the class, no removal order can show a drop: such images are
    listed and left out of the shares (a true map that wins everywhere else keeps its 100 %)."""
    n = 24
    x, pos, predict = _square_world(n, seed=6)
    cls = np.zeros(n, int)
    cls[[3, 7, 11]] = 1  # "no bright square": the flat baseline image is exactly that class
    res = faithfulness(predict, x, _blobs(pos + 3.5), cls, steps=4, baseline="mean", road=False)
    ok = res.measurable()
    assert ok.sum() == n - 3 and not ok[[3, 7, 11]].any() and res.chance == 0.5
    # probability above chance is the evidence: a baseline at 50 / 50 on two classes has removed all of it
    assert dataclasses.replace(res, base=np.full(n, 0.99), blank=np.full(n, 0.5)).measurable().all()
    assert not dataclasses.replace(res, base=np.full(n, 0.99), blank=np.full(n, 0.75)).measurable().any()
    s = summarize_faithfulness(res)
    assert s["images"] == n and s["measurable"] == n - 3 and s["not_measurable"] == [3, 7, 11]
    assert s["metrics"]["deletion_auc"]["map_beats_control"] == 1.0
    assert s["metrics"]["deletion_auc"]["sign_test_p"] == pytest.approx(2.0 ** -(n - 3))
    header, rows = per_image_rows(res)
    assert header[-2:] == ["baseline_probability", "measurable"] and [r[-1] for r in rows] == ok.astype(int).tolist()
    # nothing measurable: no shares, no verdict
    none = summarize_faithfulness(faithfulness(predict, x, _blobs(pos + 3.5), np.ones(n, int), steps=4, road=False))
    assert none["measurable"] == 0 and none["metrics"] == {} and not none["beats_control"]


def test_empty_maps_never_beat_and_rows_per_image():
    n = 6
    x, pos, predict = _square_world(n, seed=2)
    maps = _blobs(pos + 3.5)
    maps[2] = 0.0
    res = faithfulness(predict, x, maps, np.zeros(n, int), steps=4, road=False)
    assert res.flags[2] == "empty" and np.isnan(res.road_morf).all()
    beats = res.beats()
    assert not any(b[2] for b in beats.values())
    s = summarize_faithfulness(res)
    assert set(s["metrics"]) == {"deletion_auc", "insertion_auc"} and s["flags"]["empty"] == 1
    header, rows = per_image_rows(res)
    assert header[:4] == ["index", "flag", "probability", "controls_of_images"] and len(rows) == n
    assert rows[2][1] == "empty" and rows[2][3] != "2"


def test_bad_arguments():
    x, pos, predict = _square_world(3)
    maps = _blobs(pos)
    with pytest.raises(ConfigError, match="invalid steps: 1; accepted: an integer >= 2"):
        faithfulness(predict, x, maps, [0, 0, 0], steps=1)
    with pytest.raises(ConfigError, match="invalid baseline"):
        faithfulness(predict, x, maps, [0, 0, 0], baseline="grey")
    with pytest.raises(ConfigError, match="do not match"):
        faithfulness(predict, x, maps[:2], [0, 0, 0])


def test_sign_test():
    assert sign_test(16, 16) == pytest.approx(2 ** -16)
    assert sign_test(12, 16) == pytest.approx(0.0384, abs=1e-4)
    assert sign_test(0, 10) == 1.0 and sign_test(0, 0) == 1.0


def test_maps_work_without_tensorflow():
    code = r"""
import sys
import numpy as np
from transfer import faithfulness, maps
m = maps.to_input_maps(np.random.default_rng(0).normal(size=(2, 4, 4)), (16, 16))
x = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
res = faithfulness.faithfulness(lambda z: np.tile([[0.3, 0.7]], (len(z), 1)), x, m, [1, 1], steps=3)
faithfulness.summarize_faithfulness(res)
maps.overlay(x[0].astype(np.uint8), m[0])
assert not any(k.split('.')[0] in ('tensorflow', 'keras', 'matplotlib') for k in sys.modules)
print('ok')
"""
    r = run_without(("tensorflow", "keras", "matplotlib"), code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
