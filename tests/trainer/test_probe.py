"""The linear probe: a frozen backbone's head fitted to convergence, and the head LP-FT starts from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers.inference import forward
from helpers.trainer import base_overrides
from transfer.trainer.config import load_config
from transfer.trainer.probe import Probe, fit_probe
from transfer.trainer.sweep import run_sweep


def _logreg(xt, yt):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression(C=1.0, max_iter=2000))]).fit(xt, yt)


def _accuracy(probe: Probe, x, y) -> float:
    return float(np.mean((x @ probe.kernel + probe.bias).argmax(1) == y))


def test_probe_is_as_good_as_logistic_regression_on_real_features():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    tr, va, te = order[:300], order[300:500], order[500:]
    probe = fit_probe(x[tr], y[tr], x[va], y[va], num_classes=10)
    lr = _logreg(x[tr], y[tr])
    assert _accuracy(probe, x[te], y[te]) >= lr.score(x[te], y[te]) - 0.01
    assert probe.iterations > 0 and probe.val_accuracy is not None
    # the standardization is folded into the kernel: raw features in, the probe's own numbers out
    assert _accuracy(probe, x[tr], y[tr]) == pytest.approx(probe.train_accuracy)


def test_probe_reaches_the_minimum_scikit_learn_reaches():
    """Without val images the penalty is scikit-learn's C=1 on standardized features: the
    probe (solved in scaled principal axes) must land on the same minimum, so the same
    probabilities, as LogisticRegression solved to a tight tolerance; also with fewer
    images than features (axes of zero variance are dropped)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    digits, labels = load_digits(return_X_y=True)
    for n in (300, 40):  # 64 features
        x, y = digits[:n], labels[:n]
        probe = fit_probe(x, y, None, None, num_classes=10)
        lr = Pipeline([("scale", StandardScaler()),
                       ("lr", LogisticRegression(C=1.0, tol=1e-10, max_iter=20000))]).fit(x, y)
        z = x @ probe.kernel.astype(np.float64) + probe.bias
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(p, lr.predict_proba(x), atol=2e-3, err_msg=f"{n} images")


def test_probe_numbers_are_the_float32_heads_and_coarse_features_are_flagged():
    """The probe reports (and chooses its penalty by) what the float32 head the model keeps
    does on float32 features. Features that vary by ~1e-6 of their mean (a mostly frozen
    random backbone) are flagged: a float32 head on them computes logits through cancelling
    terms of ~1e6, so its numbers are noisy."""
    from sklearn.datasets import load_digits

    from transfer.trainer.measure import _head_numbers

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    probe = fit_probe(x[:300], y[:300], x[300:500], y[300:500], num_classes=10)
    assert probe.resolution_bits > 20 and not probe.coarse
    for rows, acc, loss in ((slice(0, 300), probe.train_accuracy, probe.train_loss),
                            (slice(300, 500), probe.val_accuracy, probe.val_loss)):
        got = _head_numbers(x[rows], y[rows], probe.kernel, probe.bias, "crossentropy")
        assert got["accuracy"] == acc and got["loss"] == pytest.approx(loss, rel=1e-4)

    coarse = (100.0 + 1e-4 * x).astype(np.float32)  # the same signal, 1e-6 of the mean
    flat = fit_probe(coarse[:300], y[:300], coarse[300:500], y[300:500], num_classes=10)
    assert flat.coarse and flat.resolution_bits < 8
    got = _head_numbers(coarse[300:500], y[300:500], flat.kernel, flat.bias, "crossentropy")
    assert got["accuracy"] == flat.val_accuracy  # the flagged numbers are still the model's
    assert flat.record()["feature_resolution_bits"] == round(flat.resolution_bits, 1)


def test_probe_with_l1_loss_and_without_val():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    probe = fit_probe(x[:400], y[:400], None, None, num_classes=10, loss="l1")
    assert probe.val_loss is None and probe.l2 == pytest.approx(1 / 400)
    assert _accuracy(probe, x[400:], y[400:]) > 0.8


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """Five digit classes, 60 real images each (the small-data case where a few epochs undertrain a head)."""
    from transfer.data.datasets import write_digits

    root = tmp_path_factory.mktemp("digits") / "d"
    write_digits(root)
    for c in sorted(p for p in root.iterdir() if p.is_dir()):
        if c.name not in {"0", "1", "2", "3", "4"}:
            shutil.rmtree(c)
        else:
            for f in sorted(c.iterdir())[60:]:
                f.unlink()
    return root


def _pooled(model_path: Path, run_dir: Path, split: str):
    from transfer.data.image import load_image
    from transfer.models.build import feature_model, load_model
    from transfer.runfolder import RunFolder

    paths, labels = RunFolder(run_dir).split_paths(split)
    x = np.stack([load_image(p, (16, 16)) for p in paths]).astype("float32")
    feats, probs = forward(feature_model(load_model(model_path)), x)
    return feats, np.asarray(labels), probs


def _one_trial(data, tmp_path, backbone: str, trainable: str):
    """(sweep result, trial folder, metrics.json) of one 2-epoch trial on ``data``."""
    cfg = load_config(None, base_overrides(data, tmp_path / "run", backbones=backbone, trainable=trainable,
                                           epochs=2, test=0.3))
    res = run_sweep(cfg, progress=lambda s: None)
    assert res.ok, res.failed
    tdir = res.run_dir / "trials" / f"{backbone}-t{round(float(trainable) * 100):03d}"
    return res, tdir, json.loads((tdir / "metrics.json").read_text())


def test_a_frozen_backbone_trial_head_is_as_good_as_logreg_on_its_own_features(tiny_bn, small_digits, tmp_path):
    """The bar of a feature-extractor trial: its network head is not beaten by a logistic
    regression on the very features it sees (2 epochs of mini-batch steps were)."""
    res, tdir, m = _one_trial(small_digits, tmp_path, tiny_bn, "0")
    assert m["head"]["method"] == "L-BFGS, full batch" and m["epochs_run"] == 1
    ft, yt, _ = _pooled(tdir / "model.keras", res.run_dir, "train")
    fe, ye, pe = _pooled(tdir / "model.keras", res.run_dir, "test")
    network = float(np.mean(pe.argmax(1) == ye))
    assert network == pytest.approx(m["test"]["accuracy"])
    assert network >= _logreg(ft, yt).score(fe, ye) - 0.03
    assert m["cache"]["mode"] == "cached" and m["cache"]["cut"] == "features"


def test_lp_ft_starts_fine_tuning_from_the_probe_and_says_so(tiny_bn, pattern_folder, tmp_path):
    from transfer.models.build import build_classifier, load_model

    model, _ = build_classifier(tiny_bn, input_shape=(16, 16, 3), weights="none", num_classes=3, seed=5)
    wfile = tmp_path / "pre.weights.h5"
    model.save_weights(wfile)
    for lp_ft in (True, False):
        out = tmp_path / f"run-{lp_ft}"
        cfg = load_config(None, base_overrides(pattern_folder, out, backbones=tiny_bn, trainable="0,0.5",
                                               weights=str(wfile), epochs=1, lp_ft=lp_ft))
        res = run_sweep(cfg, progress=lambda s: None)
        assert res.ok, res.failed
        meta = json.loads((out / "trials" / "tiny_bn-t050" / "trial.json").read_text())
        m = json.loads((out / "trials" / "tiny_bn-t050" / "metrics.json").read_text())
        assert meta["lp_ft"] is lp_ft and meta["init"] == "pretrained"
        assert m["head"]["init"] == ("linear probe" if lp_ft else "random")
        probes = list((out / "cache" / "tiny_bn-pretrained").glob("probe-*.npz"))
        assert len(probes) == 1  # one probe, fitted for t000 and reused by t050
        probe = Probe.load(probes[0])
        kernel = load_model(out / "trials" / "tiny_bn-t000" / "model.keras").get_layer("probs").get_weights()[0]
        np.testing.assert_array_equal(kernel, probe.kernel)  # the frozen trial's head is the probe
        if lp_ft:
            assert m["head"]["l2"] == probe.l2


def test_a_fine_tuned_trial_keeps_the_better_head_on_its_own_features(tiny_bn, small_digits, tmp_path):
    """After fine-tuning, the head is refitted on the model's own pooled features and kept when
    it validates better; the saved model is what metrics.json measured, and it is not beaten
    by a logistic regression on its features."""
    res, tdir, m = _one_trial(small_digits, tmp_path, tiny_bn, "1")
    head = m["head"]
    assert set(head["refit"]) >= {"chosen", "val", "l2"}
    kept = head["refit"]["val"] if head["refit"]["chosen"] else head["trained"]
    assert kept["loss"] == min(head["refit"]["val"]["loss"], head["trained"]["loss"])
    assert m["val"]["loss"] == pytest.approx(kept["loss"], rel=1e-5)
    ft, yt, _ = _pooled(tdir / "model.keras", res.run_dir, "train")
    fe, ye, pe = _pooled(tdir / "model.keras", res.run_dir, "test")
    network = float(np.mean(pe.argmax(1) == ye))
    assert network == pytest.approx(m["test"]["accuracy"])  # the saved model, run on the images
    assert network >= _logreg(ft, yt).score(fe, ye) - 0.03
