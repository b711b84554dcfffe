"""Label issues from out-of-sample probabilities (`transfer.analysis.audit_labels`) and the
audit's model input made exactly as the run's pixel recipe makes it -- on real images (scikit-learn's
digits and sample photographs), no TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from transfer.analysis.audit_labels import Group, find_label_issues, pixel_features


@pytest.fixture(scope="module")
def noisy_digits():
    """scikit-learn's 1,797 digits, 70 % "training" rows of which 5 % carry a wrong label, and a
    "trained" view that memorized every given label (one-hot of it, plus noise): what a network
    that fit its noisy training labels gives."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    n = len(d.target)
    fit = np.zeros(n, bool)
    fit[rng.permutation(n)[:int(0.7 * n)]] = True
    labels = d.target.copy()
    flipped = rng.choice(np.flatnonzero(fit), int(0.05 * fit.sum()), replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, len(flipped))) % 10
    greys = np.stack([np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((32, 32),
                                                                                         Image.Resampling.BILINEAR))
                      for im in d.images])
    memorized = np.eye(10, dtype=np.float32)[labels] * 3 + rng.normal(0, 0.3, (n, 10)).astype(np.float32)
    memorized[~fit] = np.eye(10, dtype=np.float32)[d.target[~fit]] * 3 + rng.normal(0, 0.3, ((~fit).sum(), 10))
    return {"labels": labels, "truth": d.target, "fit": fit, "flipped": set(flipped.tolist()),
            "pixels": pixel_features(greys), "trained": memorized}


def _recall_precision(issues, flipped, rows):
    found = {i for i, *_ in issues if i in rows}
    return len(found & flipped) / max(1, len(flipped)), len(found & flipped) / max(1, len(found))


def test_training_images_are_judged_by_views_that_never_fit_their_labels(noisy_digits):
    d = noisy_digits
    fit_rows, other = np.flatnonzero(d["fit"]), np.flatnonzero(~d["fit"])
    names = [str(i) for i in range(10)]
    groups = [Group("fit", fit_rows, ("pixels",), "training"), Group("held_out", other, ("trained", "pixels"), "other")]
    res = find_label_issues({"pixels": d["pixels"], "trained": d["trained"]}, d["labels"], groups, folds=5,
                            class_names=names)
    recall, precision = _recall_precision(res.issues, d["flipped"], set(fit_rows.tolist()))
    assert recall >= 0.8 and precision >= 0.8, (recall, precision)
    for i, score, suggested, group in res.issues:
        if i in d["flipped"]:
            assert group == "fit" and 0 < score <= 1
    right = [sug == d["truth"][i] for i, _, sug, _ in res.issues if i in d["flipped"]]
    assert np.mean(right) >= 0.9  # the suggested label is the true one
    fit_rec, held_rec = res.record["groups"]
    assert fit_rec["source"] == "pixels" and fit_rec["issues"] >= len(d["flipped"]) * 0.8
    assert held_rec["source"] in ("trained", "mean of trained, pixels")  # the stronger view where it is allowed
    # the same search letting the memorizing view judge the training images: the log loss prefers
    # it (it agrees with every given label) and the flips vanish -- what the audit did before
    blind = find_label_issues({"pixels": d["pixels"], "trained": d["trained"]}, d["labels"],
                              [Group("fit", fit_rows, ("trained", "pixels"), "training")], folds=5, class_names=names)
    assert blind.record["groups"][0]["source"] == "trained"
    assert _recall_precision(blind.issues, d["flipped"], set(fit_rows.tolist()))[0] <= 0.1


def test_classes_too_small_for_the_folds_are_left_out_with_a_note(noisy_digits):
    d = noisy_digits
    labels = d["labels"].copy()
    names = [str(i) for i in range(10)] + ["rare", "gone"]
    labels[0] = 10  # a class with one image
    groups = [Group("all", np.arange(len(labels)), ("pixels",), "every image")]
    res = find_label_issues({"pixels": d["pixels"]}, labels, groups, folds=5, class_names=names)
    assert res.record["searched"] and res.record["not_searched_classes"] == ["rare", "gone"]
    assert any("'rare' (1)" in n and "the other 10 classes are searched" in n for n in res.notes), res.notes
    assert any("'gone'" in n and "no readable image" in n for n in res.notes), res.notes
    assert 0 not in {i for i, *_ in res.issues}
    assert all(names[sug] not in ("rare", "gone") for _, _, sug, _ in res.issues)
    recall, _ = _recall_precision(res.issues, d["flipped"] - {0}, set(range(len(labels))))
    assert recall >= 0.8  # the others are still searched
    # nothing to search: one class left
    one = np.ones_like(labels)
    one[:3] = 0  # class '0' with 3 images, class '1' with the rest
    res = find_label_issues({"pixels": d["pixels"]}, one, groups, folds=5, class_names=names)
    assert not res.record["searched"] and not res.issues
    assert any("not searched" in n for n in res.notes)


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    """scikit-learn's china.jpg as a large JPEG (427x640), a JPEG just too small for a draft at 32
    px, a PNG, and a JPEG with EXIF orientation 6 (stored rotated)."""
    from sklearn.datasets import load_sample_image

    root = tmp_path_factory.mktemp("photos")
    photo = Image.fromarray(load_sample_image("china.jpg"))
    photo.save(root / "big.jpg", quality=90)
    photo.resize((127, 127)).save(root / "small.jpg", quality=90)
    photo.save(root / "big.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(root / "rotated.jpg", quality=90, exif=exif)
    return root


@pytest.mark.parametrize("version", [1, 2])
def test_the_audits_model_input_is_the_loaders_under_each_recipe(photo_files, version):
    from transfer.analysis.audit_pass import read_one
    from transfer.data.image import RECIPES, load_image

    recipe = RECIPES[version]
    for name in ("big.jpg", "small.jpg", "big.png", "rotated.jpg"):
        path = photo_files / name
        err, fp, x, _ = read_one(path, (32, 32), recipe)
        assert err is None
        np.testing.assert_array_equal(x, load_image(path, (32, 32), recipe=recipe), err_msg=name)
    # recipe 2 decodes the big JPEG in the DCT: its pixels are not recipe 1's -- the test can fail
    a = load_image(photo_files / "big.jpg", (32, 32), recipe=RECIPES[1]).astype(int)
    b = load_image(photo_files / "big.jpg", (32, 32), recipe=RECIPES[2]).astype(int)
    assert np.abs(a - b).max() > 0


def test_a_pixel_mismatch_is_noticed_and_the_loader_used(photo_files):
    """The pass's pixels are compared with load_image's before the pass: a reader that ignores the
    run's recipe (decode at full size, resize with today's recipe) is caught and replaced."""
    from transfer.analysis import audit_pass
    from transfer.data.image import RECIPES, load_image

    recipe = RECIPES[1]
    paths = [photo_files / n for n in ("big.jpg", "small.jpg", "big.png")]

    def todays_reader(path, size, recipe, exact=False):
        return audit_pass.read_one(path, size, None, exact)

    parity = audit_pass.check_pixels(paths, (32, 32), recipe=recipe, read=todays_reader)
    assert parity.exact and parity.record["max_abs_diff"] > 0 and parity.record["recipe"] == 1
    for x, p in zip(parity.x, paths):
        np.testing.assert_array_equal(x, load_image(p, (32, 32), recipe=recipe))
    same = audit_pass.check_pixels(paths, (32, 32), recipe=recipe)
    assert not same.exact and same.record["max_abs_diff"] == 0 and same.record["images"] == 3


def test_a_large_set_chooses_c_on_a_sample(noisy_digits, monkeypatch):
    """Beyond SELECT_ROWS rows each view's C is chosen on a stratified sample and only the chosen
    C is cross-fitted on every row: the same choice and the same issues as the full grid here."""
    from transfer.analysis import audit_labels

    d = noisy_digits
    groups = [Group("fit", np.flatnonzero(d["fit"]), ("pixels",), "training"),
              Group("held_out", np.flatnonzero(~d["fit"]), ("pixels", "trained"), "other")]
    views = {"pixels": d["pixels"], "trained": d["trained"]}
    names = [str(i) for i in range(10)]
    full = find_label_issues(views, d["labels"], groups, folds=5, class_names=names)
    monkeypatch.setattr(audit_labels, "SELECT_ROWS", 600)
    sampled = find_label_issues(views, d["labels"], groups, folds=5, class_names=names)
    assert [g["C"] for g in sampled.record["groups"]] == [g["C"] for g in full.record["groups"]]
    a, b = {i for i, *_ in full.issues}, {i for i, *_ in sampled.issues}
    assert a == b
