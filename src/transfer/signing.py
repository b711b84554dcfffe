"""Ed25519 keys and signatures for bundles (the ``cryptography`` package), and trust.

A bundle's ``manifest.json`` lists the SHA-256 of every file of the bundle, so a signature
over the manifest's exact bytes covers every file. ``signature.json`` beside the manifest
holds the signature, the signer's public key and its key id. Whether a signer is
*trusted* is decided by the machine that loads the bundle: the public keys in ``trust``
(a ``.pub`` file, a folder of them, or several separated by ``os.pathsep``), or in the
environment variable ``TRANSFER_TRUST`` when no trust is given. See docs/security.md.

Key files: ``transfer keygen KEY`` writes ``KEY`` (the private key, PKCS#8 PEM, mode 0600;
encrypted when ``TRANSFER_KEY_PASSPHRASE`` is set) and ``KEY.pub`` (SubjectPublicKeyInfo
PEM). A trust file may also hold an OpenSSH ``ssh-ed25519`` line.

Example::

    key = load_signing_key("release.key")
    record = sign(manifest_bytes, key)               # -> signature.json
    store = trust_store("keys/")                     # the public keys this machine trusts
    signer = check_signature(record, manifest_bytes) # raises SignatureError when it does not verify
    signer in store                                  # True when trusted
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ._lazy import require
from .errors import ConfigError, OutputError
from .fsutil import write_text_atomic

SIGNATURE_FILE = "signature.json"
SIGNATURE_FORMAT = "transfer-signature"
TRUST_ENV = "TRANSFER_TRUST"
PASSPHRASE_ENV = "TRANSFER_KEY_PASSPHRASE"
PUBLIC_SUFFIXES = (".pub", ".pem")


class SignatureError(ValueError):
    """A signature record is malformed or does not verify."""


def _crypto():
    require("cryptography", purpose="signed bundles")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519, InvalidSignature


def key_id(public_raw: bytes) -> str:
    """``ed25519:`` and the first 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    """A private key loaded for signing."""

    private: Any = field(repr=False)
    public_raw: bytes
    path: str

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)


@dataclass(frozen=True)
class TrustStore:
    """The public keys a machine trusts (``key id -> raw public key``) and where they came from."""

    keys: dict[str, bytes]
    sources: tuple[str, ...]

    def __contains__(self, kid: object) -> bool:
        return kid in self.keys

    def describe(self) -> str:
        return f"{len(self.keys)} trusted key(s) from {', '.join(self.sources)}"


def _public_raw(pub) -> bytes:
    serialization, _, _ = _crypto()
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_key(path: str | os.PathLike, *, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair: ``path`` (private, mode 0600) and ``path.pub``.

    The private key is encrypted with the passphrase in ``TRANSFER_KEY_PASSPHRASE`` when it is set.

    Returns:
        ``(private path, public path, key id)``.

    Raises:
        OutputError: a key file exists already (and ``force`` is off) or cannot be written.
    """
    serialization, ed25519, _ = _crypto()
    priv_path = Path(path)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not force:
            raise OutputError(f"{p} exists; a key is never overwritten by accident",
                              hint="choose another name, or replace it on purpose with force")
    key = ed25519.Ed25519PrivateKey.generate()
    secret = os.environ.get(PASSPHRASE_ENV)
    enc = (serialization.BestAvailableEncryption(secret.encode("utf-8")) if secret
           else serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        priv_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = priv_path.with_name(f".{priv_path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.replace(tmp, priv_path)
        write_text_atomic(pub_path, pub.decode("ascii"))
    except OSError as exc:
        raise OutputError(f"cannot write the key {priv_path}: {exc.strerror or exc}") from None
    return priv_path, pub_path, key_id(_public_raw(key.public_key()))


def load_signing_key(path: str | os.PathLike) -> SigningKey:
    """The private key at ``path`` (PEM; encrypted ones need ``TRANSFER_KEY_PASSPHRASE``).

    Raises:
        ConfigError: missing, unreadable, encrypted without the passphrase, or not Ed25519.
    """
    serialization, ed25519, _ = _crypto()
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the signing key {p}: {exc.strerror or exc}",
                          hint="make one with `transfer keygen KEY`", option="sign") from None
    secret = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(data, password=secret.encode("utf-8") if secret else None)
    except TypeError:
        raise ConfigError(f"the signing key {p} is encrypted", hint=f"set {PASSPHRASE_ENV} to its passphrase",
                          option="sign") from None
    except ValueError as exc:
        raise ConfigError(f"{p} is not a readable private key ({exc})",
                          hint="give the private key `transfer keygen` wrote (not the .pub file)",
                          option="sign") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{p} is a {type(key).__name__}, not an Ed25519 key", hint="make one with `transfer keygen`",
                          option="sign")
    return SigningKey(key, _public_raw(key.public_key()), str(p))


def load_public_keys(path: str | os.PathLike) -> dict[str, bytes]:
    """The Ed25519 public keys of one file (PEM blocks and ``ssh-ed25519`` lines).

    Raises:
        ConfigError: unreadable, or no Ed25519 public key in it.
    """
    serialization, ed25519, _ = _crypto()
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the trusted key {p}: {exc.strerror or exc}", option="trust") from None
    keys: dict[str, bytes] = {}
    blocks = [b"-----BEGIN PUBLIC KEY-----" + part for part in text.split(b"-----BEGIN PUBLIC KEY-----")[1:]]
    blocks += [line for line in text.splitlines() if line.startswith(b"ssh-ed25519 ")]
    for blk in blocks:
        try:
            pub = (serialization.load_ssh_public_key(blk) if blk.startswith(b"ssh-")
                   else serialization.load_pem_public_key(blk))
        except ValueError:
            continue
        if isinstance(pub, ed25519.Ed25519PublicKey):
            raw = _public_raw(pub)
            keys[key_id(raw)] = raw
    if not keys:
        raise ConfigError(f"{p} holds no Ed25519 public key", hint="give the KEY.pub file `transfer keygen` wrote",
                          option="trust")
    return keys


def trust_store(trust: str | os.PathLike | Sequence | TrustStore | bool | None = None) -> TrustStore | None:
    """The trusted public keys: ``trust`` (a file, a folder of ``*.pub`` / ``*.pem`` files, a list
    of them, or several paths joined by ``os.pathsep``), else ``TRANSFER_TRUST``; ``None`` when
    neither is set (no signature is required). ``False`` or ``""``: no trust, whatever the
    environment says.

    Raises:
        ConfigError: a path that does not exist, or a folder without public keys.
    """
    if isinstance(trust, TrustStore):
        return trust
    if trust is False or trust == "":
        return None
    if trust is None:
        trust = os.environ.get(TRUST_ENV) or None
        if trust is None:
            return None
    items = ([os.fspath(t) for t in trust] if isinstance(trust, (list, tuple))
             else [t for t in os.fspath(trust).split(os.pathsep) if t])
    keys: dict[str, bytes] = {}
    for item in items:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in PUBLIC_SUFFIXES and f.is_file())
            if not files:
                raise ConfigError(f"trust folder {p} holds no *.pub / *.pem public key", option="trust")
            for f in files:
                keys.update(load_public_keys(f))
        elif p.exists():
            keys.update(load_public_keys(p))
        else:
            raise ConfigError(f"trusted key {p} does not exist",
                              hint=f"give a KEY.pub file or a folder of them (or fix {TRUST_ENV})", option="trust")
    return TrustStore(keys, tuple(items))


def sign(data: bytes, key: SigningKey) -> dict:
    """The signature record of ``data`` (the exact bytes of manifest.json)."""
    return {"format": SIGNATURE_FORMAT, "version": 1, "algorithm": "ed25519", "signed": "manifest.json",
            "key_id": key.key_id, "public_key": base64.b64encode(key.public_raw).decode("ascii"),
            "sha256": hashlib.sha256(data).hexdigest(),
            "signature": base64.b64encode(key.private.sign(data)).decode("ascii")}


def check_signature(record: Any, data: bytes) -> str:
    """Verify a signature record over ``data``; returns the signer's key id.

    Raises:
        SignatureError: malformed record, or the signature does not match the bytes.
    """
    _, ed25519, InvalidSignature = _crypto()
    if not isinstance(record, dict) or record.get("format") != SIGNATURE_FORMAT or \
            record.get("algorithm") != "ed25519":
        raise SignatureError("not a transfer Ed25519 signature record")
    try:
        raw = base64.b64decode(str(record["public_key"]), validate=True)
        sig = base64.b64decode(str(record["signature"]), validate=True)
        pub = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (KeyError, ValueError) as exc:
        raise SignatureError(f"malformed signature record ({exc})") from None
    if record.get("key_id") != key_id(raw):
        raise SignatureError("its key id does not belong to its public key")
    try:
        pub.verify(sig, data)
    except InvalidSignature:
        raise SignatureError("the signature does not match manifest.json (it was changed after signing)") from None
    return key_id(raw)


__all__ = ["SIGNATURE_FILE", "TRUST_ENV", "PASSPHRASE_ENV", "SignatureError", "SigningKey", "TrustStore",
           "generate_key", "load_signing_key", "load_public_keys", "trust_store", "sign", "check_signature", "key_id"]
