"""export/calibrate.py: temperature inside the ONNX graph, unknown-input thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from transfer import calibration as C
from transfer import unknown_scores as U
from transfer.errors import ExportError


def _tiny_onnx(path, softmax=True):
    """features (N,4) -> MatMul -> [Softmax] -> probs, built with onnx.helper."""
    import onnx
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 2, (4, 3)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["image"], ["features"]),
             helper.make_node("MatMul", ["features", "w"], ["logits"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    else:  # probabilities some other way: exp / sum
        nodes += [helper.make_node("Softmax", ["logits"], ["p0"], axis=-1), helper.make_node("Identity", ["p0"], ["probs"])]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probs"], {"image": x})[0]


@pytest.mark.parametrize("softmax", [True, False])
def test_temperature_in_the_graph_equals_the_numpy_formula(tmp_path, softmax):
    from transfer.export.calibrate import temperature_onnx

    _tiny_onnx(tmp_path / "m.onnx", softmax=softmax)
    x = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)
    before = _run(tmp_path / "m.onnx", x)
    rec = temperature_onnx(tmp_path / "m.onnx", tmp_path / "c.onnx", 2.5)
    assert rec == {"temperature": 2.5, "method": "logits" if softmax else "log-probs"}
    after = _run(tmp_path / "c.onnx", x)
    np.testing.assert_allclose(after, C.apply_temperature(before, 2.5), atol=1e-5)
    assert (after.argmax(1) == before.argmax(1)).all()
    with pytest.raises(ExportError):
        temperature_onnx(tmp_path / "m.onnx", tmp_path / "d.onnx", 0.0)


def _clusters(seed=0, d=6, c=3):
    """Features of c classes around separated means, a linear head that reads them, and outliers
    of two kinds: far from every class (noise-like) and between two classes (mix-like)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 4, (c, d))
    ytr, yva = np.repeat(np.arange(c), 60), np.repeat(np.arange(c), 40)
    ftr, fva = means[ytr] + rng.normal(size=(len(ytr), d)), means[yva] + rng.normal(size=(len(yva), d))
    kernel, bias = means.T / 4, -np.sum(means ** 2, axis=1) / 8
    far = rng.normal(0, 1, (50, d)) * 12
    between = (means[0] + means[1]) / 2 + rng.normal(size=(50, d))
    probs = lambda f: C.softmax(f @ kernel + bias)  # noqa: E731
    out = {"far": (far, probs(far)), "between": (between, probs(between))}
    return ftr, ytr, fva, probs(fva), (kernel, bias), out


def test_fit_unknown_fits_every_score_and_chooses_by_the_rule():
    from transfer.export.calibrate import DEFAULT_RULE, KNN_KS, fit_unknown

    ftr, ytr, fva, pva, head, outliers = _clusters()
    rec, arrays = fit_unknown(ftr, ytr, fva, pva, 3, accept=0.9, head=head, outliers=outliers)
    assert set(rec["scores"]) == set(U.SCORES) and rec["rule"] == DEFAULT_RULE
    fa = {k: v["synthetic"]["expected_false_accept"] for k, v in rec["scores"].items()}
    assert fa[rec["default"]] <= min(fa.values()) + 0.005  # the fewest outliers accepted
    for name, e in rec["scores"].items():
        assert e["val_acceptance"] == pytest.approx(0.9, abs=0.01)
        assert set(e["synthetic"]["auroc"]) == {"far", "between"}
        assert ("file" in e) == bool(U.SCORE_ARRAYS[name])
        # the recorded numbers are what a scorer built from the stored arrays computes
        scorer = U.UnknownScorer.from_arrays(name, arrays, e, feature_dim=6, num_classes=3)
        sv = scorer(fva, pva)
        assert U.threshold_for_acceptance(sv, 0.9) == pytest.approx(e["threshold"])
        assert U.auroc(sv, scorer(*outliers["far"])) == pytest.approx(e["synthetic"]["auroc"]["far"])
    assert rec["scores"]["knn"]["k"] in KNN_KS and set(rec["scores"]["knn"]["k_candidates"]) == {str(k) for k in KNN_KS}
    assert arrays["bank"].dtype == np.float16 and arrays["bank"].shape == (180, 6)
    assert arrays["means"].shape == (3, 6) and arrays["vim_basis"].shape[0] == 6 and rec["scores"]["vim"]["alpha"] > 0
    assert rec["images"] == {"train": 180, "val": 120, "bank": 180, "outliers": {"far": 50, "between": 50}}
    assert "optimistic" in rec["outliers"]["note"]  # the numbers that chose the default say so


def test_fit_unknown_choices_and_refusals():
    from transfer.export.calibrate import fit_unknown

    ftr, ytr, fva, pva, head, outliers = _clusters(seed=1)
    rec, arrays = fit_unknown(ftr, ytr, fva, pva, 3, head=head, outliers=outliers, default="msp")
    assert rec["default"] == "msp" and "user" in rec["rule"]
    rec, arrays = fit_unknown(ftr, ytr, fva, pva, 3, default="mahalanobis")  # no head, no outliers
    assert set(rec["scores"]) == {"msp", "mahalanobis", "knn"} and "kernel" not in arrays
    assert "energy" in rec["not_offered"] and "synthetic" not in rec["scores"]["msp"]
    assert rec["scores"]["knn"]["k"] == 10
    rec, _ = fit_unknown(ftr[::5], ytr[::5], fva, pva, 3, bank_rows=20, default="knn")
    assert rec["images"]["bank"] == 20 and rec["scores"]["knn"]["k"] == 10
    with pytest.raises(ExportError, match="outlier images"):
        fit_unknown(ftr, ytr, fva, pva, 3)
    with pytest.raises(ExportError, match="not offered"):
        fit_unknown(ftr, ytr, fva, pva, 3, default="vim")
    with pytest.raises(ExportError, match="classes without images"):
        fit_unknown(ftr[ytr < 2], ytr[ytr < 2], fva, pva, 3, default="msp")
    with pytest.raises(ExportError, match="validation images"):
        fit_unknown(ftr, ytr, fva[:0], pva[:0], 3, default="msp")


def test_synthetic_outliers_are_made_from_the_training_images():
    from transfer.export.calibrate import OUTLIER_KINDS, synthetic_outliers

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 16, 16, 3)).astype(np.uint8)
    y = np.arange(30) % 3
    out = synthetic_outliers(x, y, per_kind=10, seed=0)
    assert set(out) == set(OUTLIER_KINDS)
    for kind, imgs in out.items():
        assert imgs.shape == (10, 16, 16, 3) and imgs.dtype == np.float32, kind
        assert imgs.min() >= 0 and imgs.max() <= 255
    assert out["blur"].std(axis=(1, 2)).mean() < 0.5 * x.astype(float).std(axis=(1, 2)).mean()
    # a shuffle moves tiles, not pixels: the same pixel values, another layout
    flat = np.sort(out["shuffle"].reshape(10, -1), axis=1)
    assert any(np.array_equal(f, np.sort(xi.reshape(-1).astype(np.float32))) for f in flat[:1] for xi in x)
    one_class = synthetic_outliers(x, np.zeros(30, int), per_kind=5)
    assert "mix" not in one_class and len(one_class["noise"]) == 5
    again = synthetic_outliers(x, y, per_kind=10, seed=0)
    assert all(np.array_equal(out[k], again[k]) for k in out)  # seeded
    with pytest.raises(ValueError):
        synthetic_outliers(x[:, :, :, :1], y)


def test_temperature_record_says_what_it_did_and_on_which_images():
    from transfer.export.calibrate import SPLIT_ROLES, temperature_record

    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (600, 4))
    y = np.array([rng.choice(4, p=p) for p in C.softmax(z)])
    rec = temperature_record((3 * z[:400], y[:400]), (3 * z[400:], y[400:]))  # overconfident by 3
    assert rec["applied"] and rec["method"] == "temperature (logits)" and rec["fitted_on"] == "val"
    assert rec["check"]["passed"] and rec["temperature"] == pytest.approx(3, rel=0.2)
    assert rec["val"]["role"] == SPLIT_ROLES["val"] and rec["test"]["role"] == SPLIT_ROLES["test"]
    assert rec["test"]["after"]["nll"] < rec["test"]["before"]["nll"]
    assert rec["test"]["after"]["accuracy"] == rec["test"]["before"]["accuracy"]
    rec = temperature_record(None, (z, y), skipped="the run has no val split", images={"listed": 0})
    assert not rec["applied"] and rec["method"] == "none" and rec["temperature"] == 1.0
    assert rec["reason"] == "the run has no val split" and "check" not in rec and "val" not in rec
    assert "after" not in rec["test"] and rec["images"] == {"val": 0, "listed": 0}
    with pytest.raises(ValueError):
        temperature_record(None, (z, y))
