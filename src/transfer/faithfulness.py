"""Is a class-activation map faithful: does the model need the pixels the map ranks first?

Deletion, insertion and ROAD curves of each map against *controls* (other images' maps), their
per-image scores, a JSON summary with sign tests and a verdict (numpy; pixels are removed by
:mod:`transfer.map_removal`, maps come from :mod:`transfer.maps`). Used by ``transfer gradcam``
(:mod:`transfer.analysis.gradcam`) and the benchmarks; never TensorFlow: the model is a
``predict`` callable.

:func:`faithfulness` asks whether the model's output depends on the pixels a map ranks
first, against a *control*: for each image, other images' maps from the same method
(:func:`control_maps`), which have a real map's smoothness, size and overall position but
none of this image's evidence. By default the controls are maps of images the model puts in
*another class*: on centred data (digits) an image of the same class has nearly the same map,
so a same-class control carries the very evidence being tested and the comparison is a coin
flip even for a map that knows where the object is. The control's number is the median over
:data:`~transfer.maps_config.DEFAULT_CONTROLS` controls: the test asks "better than a typical uninformative map",
not "better than one random draw" (an uninformative map still wins on half the images). With ``shifted``
controls the map rolled by half the image is used instead; it rewards any map that simply
lights the centre (a fixed centre blob beats its rolled copy on centred data), so it is not
the default. The numbers, per image, for the map and for its control (``p`` is the
explained class's probability):

* ``deletion_auc`` (Petsiuk et al. 2018, RISE): remove the pixels in order of map value,
  most relevant first, in ``steps`` equal steps from 0 to 100 % of the pixels, each removed
  pixel set to the baseline (:func:`~transfer.map_removal.substrate`: by default the image's median colour, its
  background where one colour dominates); area under ``p`` over the
  removed fraction 0..1 (trapezoid). **Lower is better**: the map's first pixels are what
  the model needs.
* ``insertion_auc`` (same paper): start from the baseline image and put the original
  pixels back, most relevant first; area under ``p``. **Higher is better.**
* ``road_morf`` (Rong et al. 2022, ROAD): remove the most relevant 1/steps .. (steps-1)/steps
  of the pixels, but fill them by noisy linear imputation (:func:`~transfer.map_removal.impute_linear`: each
  removed pixel is the weighted mean of its 8 neighbours, the whole hole solved as one
  sparse linear system, plus Gaussian noise of :data:`~transfer.map_removal.ROAD_NOISE` grey levels), so the
  fill's shape does not tell the model where pixels were removed; mean ``p`` over those
  fractions. **Lower is better.**
* ``road_lerf``: the same, least relevant first. **Higher is better.**

"Beats its control" per image means a strictly better number than the control's; an empty
map never beats it. Only *measurable* images count (:meth:`Faithfulness.measurable`): those where
removing every pixel (the baseline image) takes away at least half of the explained class's
probability above chance (1 / classes).
Where the baseline alone keeps the class -- a uniform image is a "square" to a shapes model,
a black one a "7" to a digits model -- no order of removal can show a drop, and map and
control win by chance; those images are counted and named, not scored. Per metric the summary
gives the mean over measurable images for the map and the control, the share of them where
the map beats its control, and a one-sided sign test (the chance of that many wins or more if
map and control were exchangeable). A method's
``min_share_deletion_road`` is the smaller of its deletion and ROAD-MoRF shares; it *beats its
control* when both sign tests give p < :data:`SIGN_TEST_ALPHA`.

Cost: ``2 * (steps - 1)`` model calls per image for deletion + insertion and as many for
ROAD, each for the map and its control, batched; one sparse solve per ROAD step.

Example::

    from transfer.faithfulness import faithfulness, summarize_faithfulness
    res = faithfulness(predict, images, maps, classes, steps=10)
    summarize_faithfulness(res)["metrics"]["deletion_auc"]["map_beats_control"]   # e.g. 0.94
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Callable, Sequence

import numpy as np

from .errors import ConfigError
from .map_removal import ROAD_NOISE, impute_linear, noise_level, ranks, substrate
from .maps import map_flags
from .maps_config import CONTROLS, FaithOptions
from .options import replace

#: an image is measurable when the baseline image keeps less than this share of the class probability above chance
MEASURABLE_DROP = 0.5
#: a method beats its control when the one-sided sign tests of deletion and ROAD-MoRF are below this
SIGN_TEST_ALPHA = 0.05
#: the metrics, and whether lower is better
METRICS = {"deletion_auc": "lower", "insertion_auc": "higher", "road_morf": "lower", "road_lerf": "higher"}

Predict = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- controls


def control_maps(maps: np.ndarray, *, control: str = "other", count: int = 1, groups=None,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` control maps of each image and where they came from.

    ``other``: other images' maps: the non-empty maps in a random cycle, each image's controls
    are the next ``count`` maps of the cycle (distinct and never its own while there are more
    than ``count`` non-empty maps; an empty map's image gets random non-empty maps); with
    fewer than two non-empty maps it falls back to ``shifted``. ``shifted``: the map rolled
    by ``j / (count + 1)`` of its height and width, ``j = 1..count`` (half of both for one).

    Returns:
        ``(controls (N, count, H, W), source (N, count))``: ``source[i, j]`` is the index of
        the image whose map is image ``i``'s ``j``-th control, -1 for a shifted map.
    """
    if control not in CONTROLS:
        raise ConfigError(f"unknown control {control!r}; accepted: {', '.join(CONTROLS)}", option="control")
    m = np.asarray(maps, dtype=np.float32)
    n, H, W = m.shape
    count = int(count)
    live = np.flatnonzero(m.reshape(n, -1).max(axis=1) > 0) if n else np.zeros(0, np.int64)
    if control == "shifted" or len(live) < 2:
        rolled = [np.roll(m, (round(H * j / (count + 1)), round(W * j / (count + 1))), axis=(1, 2))
                  for j in range(1, count + 1)]
        return np.stack(rolled, axis=1), np.full((n, count), -1, np.int64)
    rng = np.random.default_rng([int(seed), 0xC0])
    src = np.full((n, count), -1, np.int64)
    if groups is not None:
        g = np.asarray(groups)
        for i in range(n):
            pool = live[(live != i) & (g[live] != g[i])]
            if len(pool) == 0:
                pool = live[live != i]
            src[i] = rng.choice(pool, size=count, replace=len(pool) < count)
        return m[src], src
    cycle = rng.permutation(live)
    for pos, i in enumerate(cycle):
        src[i] = cycle[(pos + 1 + np.arange(count)) % len(cycle)]
    for i in np.setdiff1d(np.arange(n), live):
        src[i] = rng.choice(live, size=count, replace=len(live) < count)
    return m[src], src


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Faithfulness:
    """Per-image curves of :func:`faithfulness`; ``[:, 0]`` = the map, ``[:, 1:]`` = its controls.

    Attributes:
        fractions: ``(steps + 1,)`` removed / inserted shares 0..1 of the deletion and insertion curves.
        road_fractions: ``(steps - 1,)`` removed shares of ROAD.
        deletion, insertion: ``(N, 1 + controls, steps + 1)`` probability of the explained class.
        road_morf, road_lerf: ``(N, 1 + controls, steps - 1)`` (NaN without ROAD).
        base: ``(N,)`` probability on the unchanged image.
        blank: ``(N,)`` probability on the baseline image (every pixel removed).
        chance: 1 / the model's number of classes.
        flags: one flag per map (:func:`map_flags`).
        control_source: ``(N, controls)`` the images whose maps are the controls (-1: shifted map).
        baseline, control: what removed pixels became and what the controls are.
    """

    fractions: np.ndarray
    road_fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    road_morf: np.ndarray
    road_lerf: np.ndarray
    base: np.ndarray
    blank: np.ndarray
    flags: list
    control_source: np.ndarray
    baseline: str
    control: str
    other_class: bool = True
    chance: float = 0.0

    def measurable(self) -> np.ndarray:
        """``(N,) bool``: the baseline image (every pixel removed) keeps less than :data:`MEASURABLE_DROP`
        of the class probability above chance, so removal can show what the model needs."""
        return (self.blank - self.chance) < MEASURABLE_DROP * (self.base - self.chance)

    def scores(self) -> dict[str, np.ndarray]:
        """``{metric: (N, 2)}``: the map's number and its control's (the median over the controls):
        areas of deletion / insertion, mean probability of ROAD."""
        fr = self.fractions
        raw = {"deletion_auc": np.trapezoid(self.deletion, fr, axis=-1),
               "insertion_auc": np.trapezoid(self.insertion, fr, axis=-1),
               "road_morf": self.road_morf.mean(axis=-1),
               "road_lerf": self.road_lerf.mean(axis=-1)}
        return {k: np.stack([v[:, 0], np.median(v[:, 1:], axis=1)], axis=1) for k, v in raw.items()}

    def beats(self) -> dict[str, np.ndarray]:
        """``{metric: (N,) bool}``: the map strictly better than its control (never for an empty map;
        every image, measurable or not -- :meth:`measurable` says which count)."""
        empty = np.array([f == "empty" for f in self.flags], bool)
        out = {}
        for k, s in self.scores().items():
            win = s[:, 0] < s[:, 1] if METRICS[k] == "lower" else s[:, 0] > s[:, 1]
            out[k] = win & ~empty
        return out


def _check_inputs(images, maps, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(images, dtype=np.float32)
    m = np.asarray(maps, dtype=np.float32)
    cls = np.asarray(classes, dtype=np.int64).reshape(-1)
    if x.ndim != 4 or m.ndim != 3 or x.shape[:3] != m.shape or len(cls) != len(x):
        raise ConfigError(f"images {x.shape}, maps {m.shape} and classes ({len(cls)}) do not match: "
                          "one (H, W) map and one class per (H, W, C) image")
    return x, m, cls


def _predict_class(predict: Predict, x: np.ndarray, cls: np.ndarray, *, classes: bool = False):
    """The probability of each image's class (and, with ``classes``, the model's number of classes)."""
    p = np.asarray(predict(x), dtype=np.float64)
    if p.ndim != 2 or len(p) != len(x):
        raise ValueError(f"predict returned shape {p.shape} for {len(x)} images; expected (N, classes)")
    out = p[np.arange(len(x)), cls]
    return (out, p.shape[1]) if classes else out


def faithfulness(
    predict: Predict,
    images: np.ndarray,
    maps: np.ndarray,
    classes: Sequence[int],
    options: FaithOptions | None = None,
    *,
    chunk: int = 256,
    **overlay,
) -> Faithfulness:
    """Deletion, insertion and ROAD curves of each map and of its control (see the module docstring).

    Args:
        predict: ``float32 (n, H, W, C) pixels 0..255 -> (n, classes)`` probabilities (batches
            itself as it likes; it gets at most about ``chunk`` images per call).
        images: ``(N, H, W, C)`` pixels at the model's input size.
        maps: ``(N, H, W)`` maps (:func:`to_input_maps`).
        classes: the explained class of each image.
        options: how it is measured (:class:`~transfer.maps_config.FaithOptions`; ``overlay``
            sets fields by name): ``steps``, the points of the deletion / insertion curves minus
            one (fractions 0, 1/steps, .., 1; ROAD removes 1/steps .. (steps-1)/steps); the
            ``baseline`` removed pixels become (:func:`substrate`; ROAD imputes them instead);
            the ``control`` (``other`` or ``shifted``, :func:`control_maps`) and ``controls`` per
            image, whose median is the control's number (an uninformative map still beats it on
            half of the images, and an informative one more often than one noisy control lets
            it), from another class with ``control_other_class``; ``road_noise``, grey levels
            of the ROAD noise, or ``auto``: each image's own noise level (:func:`noise_level`),
            at least :data:`~transfer.map_removal.ROAD_NOISE`; ``road``: compute ROAD (one sparse solve per step and
            map; ``auto``: inputs of at most :data:`~transfer.maps_config.ROAD_AUTO_PIXELS`
            pixels), else its curves are NaN; ``seed`` for tie breaking, controls and ROAD noise
            (the map and its control share the noise).
        chunk: perturbed images per ``predict`` call, about.

    Returns:
        A :class:`Faithfulness`.

    Raises:
        ConfigError: bad steps, baseline or control; shapes that do not match.
    """
    o = replace(options or FaithOptions(), **overlay)
    steps, baseline, control, controls, seed = o.steps, o.baseline, o.control, o.controls, o.seed
    x, m, cls = _check_inputs(images, maps, classes)
    n, H, W, C = x.shape
    hw = H * W
    road = o.road_runs(hw)
    fr = np.linspace(0.0, 1.0, steps + 1)
    counts = np.rint(fr * hw).astype(np.int64)
    inner = counts[1:-1]
    ctrl, source = control_maps(m, control=control, count=int(controls), seed=seed,
                                groups=cls if o.control_other_class else None)
    c1 = 1 + int(controls)
    flags = map_flags(m)
    subs_img = substrate(x, baseline)
    subs = subs_img.reshape(n, hw, C)
    sigma = np.maximum(noise_level(x), ROAD_NOISE) if o.road_noise == "auto" else np.full(n, float(o.road_noise))
    base, n_classes = _predict_class(predict, x, cls, classes=True) if n else (np.zeros(0), 0)
    blank = _predict_class(predict, subs_img, cls) if n else np.zeros(0)
    k = len(inner)
    deletion = np.empty((n, c1, steps + 1))
    insertion = np.empty((n, c1, steps + 1))
    deletion[:, :, 0] = insertion[:, :, -1] = base[:, None]
    deletion[:, :, -1] = insertion[:, :, 0] = blank[:, None]
    morf = np.full((n, c1, k), np.nan)
    lerf = np.full((n, c1, k), np.nan)
    per_image = c1 * 2 * k * (2 if road else 1)
    group = max(1, chunk // max(1, per_image))
    for g0 in range(0, n, group):
        batch, where = [], []
        for i in range(g0, min(n, g0 + group)):
            rng = np.random.default_rng([int(seed), int(i)])
            xf = x[i].reshape(-1, C)
            noise = rng.standard_normal((2, k, H, W, C)) if road else None
            ties = rng.random(hw)  # one tie breaking for the map and its control: equal maps, equal numbers
            for j, mm in enumerate([m[i], *ctrl[i]]):
                rank = ranks(mm, ties)
                first = rank[None, :] < inner[:, None]  # (k, hw): the top fraction of pixels
                batch.append(np.where(first[..., None], subs[i], xf).reshape(k, H, W, C))
                where.append((deletion, i, j))
                batch.append(np.where(first[..., None], xf, subs[i]).reshape(k, H, W, C))
                where.append((insertion, i, j))
                if road:
                    batch.append(np.stack([impute_linear(x[i], (rank < c).reshape(H, W), noise=sigma[i], noise_field=noise[0, s])
                                           for s, c in enumerate(inner)]))
                    where.append((morf, i, j))
                    batch.append(np.stack([impute_linear(x[i], (rank >= hw - c).reshape(H, W), noise=sigma[i], noise_field=noise[1, s])
                                           for s, c in enumerate(inner)]))
                    where.append((lerf, i, j))
        xb = np.concatenate(batch).astype(np.float32)
        cb = np.concatenate([np.full(k, cls[i]) for _, i, _ in where])
        p = _predict_class(predict, xb, cb).reshape(len(where), k)
        for (arr, i, j), row in zip(where, p):
            if arr is morf or arr is lerf:
                arr[i, j] = row
            else:
                arr[i, j, 1:-1] = row
    return Faithfulness(fractions=fr, road_fractions=fr[1:-1], deletion=deletion, insertion=insertion,
                        road_morf=morf, road_lerf=lerf, base=base, blank=blank, flags=flags, control_source=source,
                        baseline=baseline, control=control, other_class=bool(o.control_other_class),
                        chance=1.0 / n_classes if n_classes else 0.0)


def sign_test(wins: int, n: int) -> float:
    """One-sided sign test: P(at least ``wins`` of ``n`` fair coin flips), 1.0 for n = 0."""
    if n <= 0:
        return 1.0
    return float(sum(comb(n, j) for j in range(int(wins), n + 1)) / 2 ** n)


def summarize_faithfulness(res: Faithfulness) -> dict:
    """The JSON summary of :func:`faithfulness`: per metric the mean over the measurable images for
    the map and the control, the share of them where the map beats its control and the sign test;
    the flags; the mean curves (all images); the verdict.

    Returns:
        ``{"images", "measurable", "not_measurable": [indices], "steps", "baseline", "control",
        "controls", "control_class", "base_probability", "flags": {"empty": k, "border": k,
        "per_image": [...]}, "metrics": {name: {"better", "map", "control", "map_beats_control",
        "sign_test_p"}}, "min_share_deletion_road", "beats_control", "curves": {...}}``.
    """
    n = len(res.base)
    scores, beats = res.scores(), res.beats()
    ok = res.measurable() if n else np.zeros(0, bool)
    k = int(ok.sum())
    metrics = {}
    for name, better in METRICS.items():
        s = scores[name][ok]
        if k == 0 or np.isnan(s).all():
            continue
        wins = int(beats[name][ok].sum())
        metrics[name] = {"better": better, "map": float(s[:, 0].mean()), "control": float(s[:, 1].mean()),
                         "map_beats_control": wins / k, "sign_test_p": sign_test(wins, k)}
    keys = [k for k in ("deletion_auc", "road_morf") if k in metrics]
    share = min(metrics[k]["map_beats_control"] for k in keys) if keys else None
    verdict = bool(keys) and all(metrics[k]["sign_test_p"] < SIGN_TEST_ALPHA for k in keys)

    def mean_curve(a):
        return {"map": [float(v) for v in a[:, 0].mean(axis=0)],
                "control": [float(v) for v in a[:, 1:].mean(axis=(0, 1))]}

    curves = {"fractions": [float(f) for f in res.fractions], "deletion": mean_curve(res.deletion),
              "insertion": mean_curve(res.insertion)}
    if "road_morf" in metrics:
        curves.update({"road_fractions": [float(f) for f in res.road_fractions],
                       "road_morf": mean_curve(res.road_morf), "road_lerf": mean_curve(res.road_lerf)})
    return {
        "images": int(n), "measurable": k, "not_measurable": [int(i) for i in np.flatnonzero(~ok)],
        "steps": len(res.fractions) - 1, "baseline": res.baseline, "control": res.control,
        "controls": int(res.deletion.shape[1] - 1), "control_class": "other" if res.other_class else "any",
        "base_probability": float(res.base.mean()) if n else None,
        "flags": {"empty": sum(f == "empty" for f in res.flags), "border": sum(f == "border" for f in res.flags),
                  "per_image": list(res.flags)},
        "metrics": metrics, "min_share_deletion_road": share, "beats_control": verdict, "curves": curves,
    }


def per_image_rows(res: Faithfulness) -> tuple[list[str], list[list]]:
    """``(header, rows)``: one row per image (flag, control source, each metric for map / control / beats)."""
    scores, beats = res.scores(), res.beats()
    names = [k for k in METRICS if not np.isnan(scores[k]).all()]
    header = ["index", "flag", "probability", "controls_of_images"] + [
        f"{k}_{w}" for k in names for w in ("map", "control", "map_beats_control")] + ["baseline_probability",
                                                                                          "measurable"]
    ok = res.measurable()
    rows = []
    for i in range(len(res.base)):
        row = [i, res.flags[i], round(float(res.base[i]), 6), ";".join(str(int(v)) for v in res.control_source[i])]
        for k in names:
            row += [round(float(scores[k][i, 0]), 6), round(float(scores[k][i, 1]), 6), int(beats[k][i])]
        rows.append(row + [round(float(res.blank[i]), 6), int(ok[i])])
    return header, rows


__all__ = [
    "MEASURABLE_DROP", "METRICS", "SIGN_TEST_ALPHA", "Faithfulness", "Predict", "control_maps", "faithfulness",
    "per_image_rows", "sign_test", "summarize_faithfulness",
]
