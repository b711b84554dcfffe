"""Signed bundles: keygen, signing at export or afterwards, trust from --trust or TRANSFER_TRUST,
and what is refused once trust is configured."""

from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from helpers.bundle_factory import edit_manifest, make_bundle, rehash
from helpers.image_files import solid_pngs
from helpers.processes import run_without
from transfer.bundle import UntrustedBundleError, load_bundle
from transfer.bundle_write import sign_bundle
from transfer.cli import cli
from transfer.errors import ConfigError, TamperedBundleError
from transfer.signing import TRUST_ENV, generate_key, load_signing_key, trust_store


def test_key_commands_are_registered():
    import click

    ctx = click.Context(cli)
    assert {"keygen", "sign"} <= set(cli.list_commands(ctx))
    assert all(cli.get_command(ctx, name) is not None for name in ("keygen", "sign"))


@pytest.fixture
def keys(tmp_path):
    a = generate_key(tmp_path / "keys" / "release.key")
    b = generate_key(tmp_path / "other" / "other.key")
    return a, b


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path):
    r = CliRunner().invoke(cli, ["keygen", str(tmp_path / "k")])
    assert r.exit_code == 0 and "ed25519:" in r.output, r.output
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert (tmp_path / "k.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    r = CliRunner().invoke(cli, ["keygen", str(tmp_path / "k")])  # never overwritten by accident
    assert r.exit_code == 1 and "exists" in r.output
    with pytest.raises(ConfigError, match="not a readable private key"):
        load_signing_key(tmp_path / "k.pub")


def test_encrypted_key_needs_its_passphrase(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_KEY_PASSPHRASE", "s3cret")
    priv, _, kid = generate_key(tmp_path / "k")
    assert b"ENCRYPTED" in priv.read_bytes()
    assert load_signing_key(priv).key_id == kid
    monkeypatch.delenv("TRANSFER_KEY_PASSPHRASE")
    with pytest.raises(ConfigError, match="encrypted"):
        load_signing_key(priv)


def test_signed_bundle_loads_trusted_and_refuses_other_keys(tmp_path, keys):
    (priv, pub, kid), (_, other_pub, _) = keys
    b = make_bundle(tmp_path / "b", head="rf", sign_key=load_signing_key(priv))
    got = load_bundle(b, trust=pub)
    assert got.signer == kid and got.trusted
    assert load_bundle(b, trust=tmp_path / "keys").trusted  # a folder of public keys
    assert not load_bundle(b, trust=False).trusted and load_bundle(b, trust=False).signer == kid
    with pytest.raises(UntrustedBundleError, match=f"signed by {kid}, which is not a trusted key"):
        load_bundle(b, trust=other_pub)
    unsigned = make_bundle(tmp_path / "u")
    with pytest.raises(UntrustedBundleError, match="it is not signed"):
        load_bundle(unsigned, trust=pub)
    r = CliRunner().invoke(cli, ["verify", str(unsigned), "--trust", str(pub)])
    assert r.exit_code == 1 and "not signed" in r.output and "hint:" in r.output


def test_trust_from_the_environment(tmp_path, keys, monkeypatch):
    (priv, pub, _), (_, other_pub, _) = keys
    b = make_bundle(tmp_path / "b", sign_key=load_signing_key(priv))
    imgs = solid_pngs(tmp_path / "imgs", [5], (8, 8))[0].parent
    monkeypatch.setenv(TRUST_ENV, str(other_pub))
    r = CliRunner().invoke(cli, ["infer", str(b), str(imgs), "-q"])
    assert r.exit_code == 1 and "not a trusted key" in r.output
    monkeypatch.setenv(TRUST_ENV, f"{other_pub}{os.pathsep}{pub}")
    r = CliRunner().invoke(cli, ["infer", str(b), str(imgs), "-q"])
    assert r.exit_code == 0, r.output
    assert trust_store(None).keys and trust_store(False) is None
    monkeypatch.setenv(TRUST_ENV, str(tmp_path / "nope.pub"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_bundle(b)


def test_any_edit_after_signing_is_refused_even_without_trust(tmp_path, keys):
    (priv, pub, _), _ = keys
    b = make_bundle(tmp_path / "b", classes=("cat", "dog"), sign_key=load_signing_key(priv))
    edit_manifest(b, lambda m: m.update(created="2000-01-01T00:00:00Z"))  # a harmless-looking edit
    for trust in (False, pub):
        with pytest.raises(TamperedBundleError, match="signature.json does not verify"):
            load_bundle(b, trust=trust)
    rehash(b)  # an adversary rehashes and drops the signature: unsigned now
    (b / "signature.json").unlink()
    assert load_bundle(b, trust=False).signer is None
    with pytest.raises(UntrustedBundleError, match="not signed"):
        load_bundle(b, trust=pub)
    sig = make_bundle(tmp_path / "c", sign_key=load_signing_key(priv))
    rec = json.loads((sig / "signature.json").read_text())
    rec["key_id"] = "ed25519:0000000000000000"  # a forged key id
    (sig / "signature.json").write_text(json.dumps(rec))
    with pytest.raises(TamperedBundleError, match="key id does not belong"):
        load_bundle(sig, trust=False)


def test_sign_command_signs_only_a_bundle_that_checks_out(tmp_path, keys):
    (priv, pub, kid), _ = keys
    b = make_bundle(tmp_path / "b")
    r = CliRunner().invoke(cli, ["sign", str(b), "--key", str(priv)])
    assert r.exit_code == 0 and kid in r.output, r.output
    assert load_bundle(b, trust=pub).trusted
    bad = make_bundle(tmp_path / "bad", int8=True)
    edit_manifest(bad, lambda m: m["models"]["onnx-int8"].update(file="model.onnx"))
    r = CliRunner().invoke(cli, ["sign", str(bad), "--key", str(priv)])
    assert r.exit_code == 1 and "does not match its manifest" in r.output
    assert not (bad / "signature.json").exists()
    assert sign_bundle(b, priv) == kid  # re-signing is idempotent


def test_checks_hold_without_the_onnx_package(tmp_path, keys):
    """The runtime's base install has no onnx: precision stamps are read through ONNX Runtime,
    external data is found in the file's bytes, and signatures need only cryptography."""
    from helpers.bundle_factory import point_external_data

    (priv, pub, _), _ = keys
    good = make_bundle(tmp_path / "good", head="rf", int8=True, sign_key=load_signing_key(priv))
    swapped = make_bundle(tmp_path / "swapped", int8=True)
    edit_manifest(swapped, lambda m: m["models"]["onnx-fp32"].update(file="model.int8.onnx"))
    ext = make_bundle(tmp_path / "ext", external="weights.bin")
    out = make_bundle(tmp_path / "out", external="weights.bin")
    (out / "weights.bin").rename(tmp_path / "w.bin")
    point_external_data(out / "model.onnx", "../w.bin")
    rehash(out, lambda m: (m["models"]["onnx-fp32"].pop("external_data"), m["files"].pop("weights.bin")))
    code = f"""
        import sys
        from transfer.bundle import load_bundle
        from transfer.errors import BundleError
        from transfer.runtime.heads import make_head
        from transfer.runtime.runners import make_runner
        b = load_bundle({str(good)!r}, trust={str(pub)!r})
        for be in ("onnxruntime", "onnxruntime-int8"):
            make_runner(b, be, "cpu")
        make_head(b, "rf", "onnx")
        make_runner(load_bundle({str(ext)!r}), "onnxruntime", "cpu")
        for bad, why in (({str(swapped)!r}, "int8 model, the manifest says fp32"), ({str(out)!r}, "outside")):
            try:
                make_runner(load_bundle(bad), "onnxruntime", "cpu")
            except BundleError as exc:
                assert why in exc.message, exc.message
            else:
                raise SystemExit("not refused: " + bad)
        assert "onnx" not in sys.modules
        print("OK")
    """
    r = run_without(("onnx", "tensorflow", "keras", "sklearn"), code)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
