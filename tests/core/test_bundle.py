"""bundle.py: manifest writing, hash checks, tamper and incompleteness detection."""

from __future__ import annotations

import json

import pytest

from transfer.bundle import finalize_manifest, load_bundle, read_manifest, verify_bundle
from transfer.data.image import PREPROCESSING
from transfer.errors import BundleError, TamperedBundleError


def _make(tmp_path, valid=True):
    b = tmp_path / "b"
    (b / "heads").mkdir(parents=True)
    (b / "model.onnx").write_bytes(b"\x08\x01fake-onnx-bytes")
    (b / "heads" / "rf.pkl").write_bytes(b"pickle-bytes")
    manifest = {
        "valid": valid,
        "class_names": ["a", "b"],
        "input": {"name": "image", "height": 8, "width": 8, "channels": 3},
        "preprocessing": dict(PREPROCESSING),
        "models": {"onnx-fp32": {"file": "model.onnx", "precision": "fp32"}},
        "heads": {"rf": {"pickle": "heads/rf.pkl"}},
    }
    finalize_manifest(b, manifest)
    return b


def test_roundtrip_lists_every_file_with_hash(tmp_path):
    b = _make(tmp_path)
    m = read_manifest(b)
    assert set(m["files"]) == {"model.onnx", "heads/rf.pkl"}
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


def _edit(b, fn):
    m = json.loads((b / "manifest.json").read_text())
    fn(m)
    (b / "manifest.json").write_text(json.dumps(m))


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
    b = tmp_path / "b"
    b.mkdir()
    (b / "model.onnx").write_bytes(b"x")
    (b / "labels.json").write_text(json.dumps(["cat", "dog"]))
    (b / "verification.json").write_text(json.dumps({"onnx-fp32": {"passed": True}, "head-rf": {"passed": False}}))
    finalize_manifest(b, {"valid": False, "class_names": ["cat", "dog"], "labels": "labels.json",
                          "input": {"height": 8, "width": 8}, "preprocessing": dict(PREPROCESSING),
                          "models": {"onnx-fp32": {"file": "model.onnx"}}})
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
