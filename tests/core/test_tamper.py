"""Bundles tampered with as an adversary would (built in code, no TensorFlow): each one is
refused by `transfer verify` and `transfer infer` with exit code 1 and a hint, and no code
in it runs (the marker file a malicious pickle would write is never written).

Cases, from how the checks were beaten before: a rehashed malicious pickle; ``valid: true``
with the verification file unlisted; removed labels with swapped class names; ONNX external
data inside the bundle (undeclared or replaced) and outside it; an edited input size; an
``onnx-fp32`` entry pointing at the int8 file; a wrong precision; required keys removed;
deeply nested JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.bundle_factory import (
    edit_manifest,
    make_bundle,
    malicious_pickle,
    point_external_data,
    rehash,
)
from helpers.image_files import solid_pngs
from transfer.bundle import load_bundle
from transfer.cli import cli
from transfer.errors import BundleError


@pytest.fixture
def images(tmp_path):
    return solid_pngs(tmp_path / "imgs", [10, 200], (8, 8))[0].parent


def _refused(bundle: Path, images: Path, marker: Path | None = None, *, head: list[str] = (),
             match: str = "") -> None:
    """verify and infer both exit 1 with an error, a hint and no output file; no code ran."""
    out = bundle.parent / "preds.csv"
    for args in (["verify", str(bundle)],
                 ["infer", str(bundle), str(images), "--out", str(out), "-q", *head]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1, (args[0], r.output)
        assert "error:" in r.output and "hint:" in r.output and "Traceback" not in r.output, r.output
        assert match in r.output, (args[0], r.output)
    assert not out.exists()
    if marker is not None:
        assert not marker.exists(), "the malicious pickle ran"
    with pytest.raises(BundleError):
        _open_everything(bundle)  # what the server does: load, then a runner per model and the heads
    if marker is not None:
        assert not marker.exists(), "the malicious pickle ran"


def _open_everything(bundle: Path) -> None:
    from transfer.runtime.heads import make_head
    from transfer.runtime.runners import make_runner

    b = load_bundle(bundle)
    for key in b.models:
        make_runner(b, "onnxruntime-" + key.split("-")[1], "cpu")
    for name in b.heads:
        make_head(b, name, "onnx")
        make_head(b, name, "pickle")


def test_rehashed_malicious_pickle_never_runs(tmp_path, images):
    marker = tmp_path / "PWNED"
    b = make_bundle(tmp_path / "b", head="rf")
    (b / "heads" / "rf.pkl").write_bytes(malicious_pickle(marker))
    rehash(b)  # hashes match again: verify says OK, as it did before
    r = CliRunner().invoke(cli, ["verify", str(b)])
    assert r.exit_code == 0 and "unsigned" in r.output
    # ... but the pickle is never unpickled from a bundle nobody trusts
    r = CliRunner().invoke(cli, ["infer", str(b), str(images), "--head", "rf", "--head-format", "pickle", "-q"])
    assert r.exit_code == 1 and "refusing to unpickle" in r.output and "hint:" in r.output, r.output
    assert "ONNX form" in r.output and not marker.exists()
    # the ONNX form of the same head holds no code and runs
    r = CliRunner().invoke(cli, ["infer", str(b), str(images), "--head", "rf", "-q"])
    assert r.exit_code == 0 and r.output.count(",ok,") == 2, r.output


def test_rehashed_pickle_in_a_signed_bundle_breaks_the_signature(tmp_path, images):
    from transfer.signing import generate_key, load_signing_key

    marker = tmp_path / "PWNED"
    priv, pub, _ = generate_key(tmp_path / "k")
    b = make_bundle(tmp_path / "b", head="rf", sign_key=load_signing_key(priv))
    r = CliRunner().invoke(cli, ["infer", str(b), str(images), "--head", "rf", "--head-format", "pickle",
                                 "--trust", str(pub), "-q"])
    assert r.exit_code == 0, r.output  # signed by a trusted key: its pickle may run
    (b / "heads" / "rf.pkl").write_bytes(malicious_pickle(marker))
    json.loads((b / "signature.json").read_text())
    m = json.loads((b / "manifest.json").read_text())
    from transfer.bundle_format import file_entry

    m["files"]["heads/rf.pkl"] = file_entry(b / "heads" / "rf.pkl")  # rehash, keep the old signature
    (b / "manifest.json").write_text(json.dumps(m))
    for trust in ([], ["--trust", str(pub)], ["--trust-pickle"]):
        r = CliRunner().invoke(cli, ["infer", str(b), str(images), "--head", "rf", "--head-format", "pickle",
                                     "-q", *trust])
        assert r.exit_code == 1 and "signature.json does not verify" in r.output, r.output
    assert not marker.exists()
    _refused(b, images, marker, match="does not verify")


def test_valid_flag_with_the_verification_file_unlisted(tmp_path, images):
    b = make_bundle(tmp_path / "b", int8=True, valid=False)  # int8 failed verification
    edit_manifest(b, lambda m: (m.update(valid=True), m["files"].pop("verification.json")))
    _refused(b, images, match="verification.json")
    edit_manifest(b, lambda m: m["verification"]["onnx-int8"].update(passed=True))  # and the summary
    rehash(b, lambda m: m["files"].update({"verification.json": {"sha256": "0" * 64, "bytes": 0}}))
    _refused(b, images, match="verification summary does not match")


def test_removed_labels_and_swapped_class_names(tmp_path, images):
    b = make_bundle(tmp_path / "b", classes=("cat", "dog"))
    edit_manifest(b, lambda m: (m.pop("labels"), m.update(class_names=["dog", "cat"])))
    _refused(b, images, match="'labels'")
    edit_manifest(b, lambda m: m.update(labels="labels.json"))
    _refused(b, images, match="differ from the exported labels")


def test_external_data_inside_the_bundle_is_hashed(tmp_path, images):
    b = make_bundle(tmp_path / "b", external="weights.bin")
    assert "weights.bin" in load_bundle(b).manifest["files"]  # declared, listed and hashed: fine
    r = CliRunner().invoke(cli, ["infer", str(b), str(images), "-q"])
    assert r.exit_code == 0, r.output
    data = bytearray((b / "weights.bin").read_bytes())
    data[0] ^= 0x40  # other weights, same size: predictions would change
    (b / "weights.bin").write_bytes(bytes(data))
    _refused(b, images, match="weights.bin")


def test_external_data_that_is_not_declared(tmp_path, images):
    b = make_bundle(tmp_path / "b", external="weights.bin")
    rehash(b, lambda m: (m["models"]["onnx-fp32"].pop("external_data"), m["files"].pop("weights.bin")))
    _refused(b, images, match="does not declare")


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_external_data_outside_the_bundle(tmp_path, images, where):
    b = make_bundle(tmp_path / "b", external="weights.bin")
    outside = tmp_path / "outside.bin"
    shutil.move(b / "weights.bin", outside)
    point_external_data(b / "model.onnx", "../outside.bin" if where == "relative" else str(outside))
    rehash(b, lambda m: (m["models"]["onnx-fp32"].pop("external_data"), m["files"].pop("weights.bin")))
    _refused(b, images, match="outside the bundle")


def test_edited_input_size_and_swapped_model_files(tmp_path, images):
    b = make_bundle(tmp_path / "b", int8=True)
    edit_manifest(b, lambda m: m["input"].update(height=16, width=16))
    _refused(b, images, match="the manifest says (N, 16, 16, 3)")
    b2 = make_bundle(tmp_path / "b2", int8=True)
    edit_manifest(b2, lambda m: m["models"]["onnx-fp32"].update(file="model.int8.onnx"))  # runs int8 as fp32
    _refused(b2, images, match="it is a int8 model, the manifest says fp32")


def test_wrong_precision(tmp_path, images):
    b = make_bundle(tmp_path / "b", int8=True)
    edit_manifest(b, lambda m: m["models"]["onnx-int8"].update(precision="fp32"))
    _refused(b, images, match="its key would be")
    b2 = make_bundle(tmp_path / "b2", int8=True)
    edit_manifest(b2, lambda m: m["models"]["onnx-int8"].update(file="model.onnx"))  # fp32 file as int8
    r = CliRunner().invoke(cli, ["verify", str(b2)])
    assert r.exit_code == 1 and "it is a fp32 model, the manifest says int8" in r.output, r.output
    r = CliRunner().invoke(cli, ["infer", str(b2), str(images), "--backend", "onnxruntime-int8", "-q"])
    assert r.exit_code == 1 and "the manifest says int8" in r.output, r.output


@pytest.mark.parametrize("key", ["valid", "class_names", "num_classes", "labels", "input", "feature_dim",
                                 "preprocessing", "models", "heads", "files", "verification"])
def test_required_keys_cannot_be_removed(tmp_path, images, key):
    b = make_bundle(tmp_path / "b", head="rf")
    edit_manifest(b, lambda m: m.pop(key))
    _refused(b, images, match=repr(key))


def test_deep_json_is_refused_not_a_recursion_error(tmp_path, images):
    b = make_bundle(tmp_path / "b")
    text = (b / "manifest.json").read_text()
    (b / "manifest.json").write_text(text[:-2] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    _refused(b, images, match="nested 100001 levels deep")
    b2 = make_bundle(tmp_path / "b2")
    (b2 / "labels.json").write_text("[" * 50_000 + "]" * 50_000)
    rehash(b2)
    _refused(b2, images, match="nested 50000 levels deep")


def test_an_untampered_bundle_passes_everything(tmp_path, images):
    """The corpus's control: nothing valid is refused."""
    b = make_bundle(tmp_path / "b", head="rf", int8=True)
    assert CliRunner().invoke(cli, ["verify", str(b), "--deep"]).exit_code == 0
    for args in ([], ["--backend", "onnxruntime-int8"], ["--head", "rf"]):
        r = CliRunner().invoke(cli, ["infer", str(b), str(images), "-q", *args])
        assert r.exit_code == 0 and r.output.count(",ok,") == 2, r.output
    assert np.isfinite(load_bundle(b).feature_dim)
    shutil.rmtree(b)
