"""bundle.py: manifest writing, hash checks, tamper and incompleteness detection."""

from __future__ import annotations

import pytest

from helpers.bundle_factory import check, make_bundle
from helpers.bundle_factory import edit_manifest as _edit
from transfer.bundle import load_bundle, read_manifest, verify_bundle
from transfer.bundle_write import new_manifest, write_bundle
from transfer.errors import BundleError, TamperedBundleError


def _make(tmp_path, valid=True):
    """A real bundle (tiny ONNX graphs made in code) with an rf head; ``valid=False``: its int8
    model failed verification."""
    return make_bundle(tmp_path / "b", head="rf", int8=not valid, valid=valid)


def test_roundtrip_lists_every_file_with_hash(tmp_path):
    b = _make(tmp_path)
    m = read_manifest(b)
    assert set(m["files"]) == {"model.onnx", "heads/rf.pkl", "heads/rf.onnx", "labels.json", "verification.json"}
    assert all(len(e["sha256"]) == 64 for e in m["files"].values())
    bundle = load_bundle(b)
    assert bundle.class_names == ["a", "b"]
    assert bundle.input_size == (8, 8)
    assert verify_bundle(b)["ok"] is True


def test_tampered_file_is_refused_and_named(tmp_path):
    b = _make(tmp_path)
    data = bytearray((b / "heads" / "rf.pkl").read_bytes())
    data[0] ^= 0xFF  # same size, different content
    (b / "heads" / "rf.pkl").write_bytes(bytes(data))
    with pytest.raises(TamperedBundleError, match="heads/rf.pkl"):
        load_bundle(b)
    report = verify_bundle(b)
    assert not report["ok"]
    assert report["problems"][0]["file"] == "heads/rf.pkl"
    assert report["problems"][0]["problem"] == "sha256"


def test_missing_file_and_missing_manifest(tmp_path):
    b = _make(tmp_path)
    (b / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx"):
        load_bundle(b)
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(b)


def test_invalid_bundle_refused_unless_allowed(tmp_path):
    b = _make(tmp_path, valid=False)
    with pytest.raises(BundleError, match="marked invalid"):
        load_bundle(b)
    assert load_bundle(b, allow_invalid=True).manifest["valid"] is False


def test_manifest_path_escape_is_refused(tmp_path):
    b = _make(tmp_path)
    _edit(b, lambda m: m["files"].update({"../outside": {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(TamperedBundleError, match="outside the bundle"):
        load_bundle(b)


def test_unsupported_version(tmp_path):
    b = _make(tmp_path)
    _edit(b, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="version 99"):
        load_bundle(b)


def test_model_file_missing_from_the_hash_list_is_refused(tmp_path):
    b = _make(tmp_path)
    _edit(b, lambda m: m["files"].pop("heads/rf.pkl"))  # the head is still referenced but no longer hashed
    with pytest.raises(TamperedBundleError, match="heads/rf.pkl"):
        load_bundle(b)
    rep = verify_bundle(b)
    assert not rep["ok"] and {"file": "heads/rf.pkl", "problem": "unlisted"} in rep["problems"]


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(class_names="ab"), "class_names"),
    (lambda m: m.update(class_names=["a", "a"]), "duplicate"),
    (lambda m: m.update(num_classes=3), "num_classes"),
    (lambda m: m.update(input={}), "input.height"),
    (lambda m: m["input"].update(height=0), "input.height"),
    (lambda m: m.update(models=None), "'models' must be an object"),
    (lambda m: m.update(models={}), "no model to run"),
    (lambda m: m.update(files=[]), "'files' must be an object"),
    (lambda m: m["heads"].update(rf={"kind": "rf"}), "heads.rf' names no file"),
])
def test_hand_edited_manifest_fields_are_named(tmp_path, edit, match):
    """A manifest of the wrong shape is refused with the field named, by verify and load
    alike (before: KeyError / AttributeError tracebacks, or silent wrong labels)."""
    b = _make(tmp_path)
    _edit(b, edit)
    with pytest.raises(TamperedBundleError, match=match):
        load_bundle(b)
    with pytest.raises(TamperedBundleError, match=match):
        verify_bundle(b)


def _with_labels(tmp_path):
    """A bundle of two classes whose head check failed at export (so it is invalid)."""
    b = make_bundle(tmp_path / "b", classes=("cat", "dog"))
    m = read_manifest(b)
    write_bundle(b, new_manifest(class_names=["cat", "dog"], input_size=(8, 8), feature_dim=m["feature_dim"],
                                 models=m["models"]), {"onnx-fp32": check(True), "head-rf": check(False)})
    return b


def test_relabelled_manifest_and_flipped_verdict_are_refused(tmp_path):
    b = _with_labels(tmp_path)
    assert load_bundle(b, allow_invalid=True).class_names == ["cat", "dog"]
    _edit(b, lambda m: m.update(class_names=["dog", "cat"]))  # same names, swapped: every answer would flip
    with pytest.raises(TamperedBundleError, match="differ from the exported labels"):
        load_bundle(b, allow_invalid=True)
    _edit(b, lambda m: m.update(class_names=["cat", "dog"], valid=True))  # hide a failed verification
    with pytest.raises(TamperedBundleError, match="head-rf failed"):
        load_bundle(b)
    _edit(b, lambda m: m.pop("labels") or m["files"].pop("labels.json"))
    with pytest.raises(TamperedBundleError):  # still caught by the verdict; labels.json is now unlisted
        load_bundle(b)


def test_foreign_recipe_and_newer_format_are_refused_with_the_right_hint(tmp_path):
    b = _make(tmp_path)
    _edit(b, lambda m: m["preprocessing"].update(resize="opencv-area"))
    with pytest.raises(BundleError, match="differs in: resize") as e:
        load_bundle(b)
    assert "re-export" in e.value.hint
    _edit(b, lambda m: m.update(format_version=2, tools={"transfer": "9.0"}))
    with pytest.raises(BundleError, match="version 2") as e:
        load_bundle(b)
    assert "upgrade transfer" in e.value.hint and "9.0" in e.value.hint
