"""The deployment bundle: a folder with ``manifest.json`` and the files inference needs, opened
and checked here.

Layout and manifest schema: docs/design.md; what the checks protect against:
docs/security.md. This module and its parts have no TensorFlow dependency. The exporter
writes bundles with :mod:`transfer.bundle_write` (the only code that spells the format
fields, with :mod:`transfer.bundle_format`); everything that loads one goes through
:func:`load_bundle`, which refuses a tampered, incomplete or self-contradicting bundle
before anything in it is run:

* the manifest is read with bounded size and depth, and every field it must have is
  there with the right shape (:mod:`transfer.bundle_schema`: a removed field cannot switch
  a check off);
* every file it refers to (labels, verification record, models, their external data,
  heads) is listed with its SHA-256, lies inside the bundle and has that hash;
* its claims agree with the hashed files (:mod:`transfer.bundle_claims`): class names with
  ``labels.json``, the verification summary and ``valid`` with ``verification.json``, the
  pixel recipe with this runtime, and every ONNX model's inputs, outputs and precision with
  the graph itself (:func:`check_model_graph`, run by the runners on the session they open);
* with trust configured (``trust=`` or ``TRANSFER_TRUST``), ``signature.json`` must be a
  valid Ed25519 signature of the manifest by a trusted key (:mod:`transfer.signing`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .bundle_claims import check_claims
from .bundle_format import (
    MANIFEST,
    SIGNATURE,
    VERIFICATION,
    check_files,
    manifest_bytes,
    read_bundle_json,
    safe_rel,
    unlisted_files,
)
from .bundle_schema import parse_manifest
from .errors import BundleError, TamperedBundleError
from .onnx_facts import PRECISION_KEY, ROLE_KEY, facts_of_session, graph_precision
from .signing import SignatureError, check_signature, trust_store


class UntrustedBundleError(TamperedBundleError):
    """Trust is configured and the bundle is unsigned or signed by a key that is not trusted."""

@dataclass(frozen=True)
class Bundle:
    """A loaded, checked bundle. ``signer``: the key id of a valid signature (or ``None``);
    ``trusted``: that key is among the trusted keys; ``digest``: the SHA-256 of the exact
    ``manifest.json`` bytes that were checked (the manifest holds every file's hash, so this
    names the whole bundle).

    What the runtime reads is set once, when the bundle is made (:func:`load_bundle` checked
    it before): ``class_names``, ``input_size``, ``feature_dim``, ``recipe`` (the pixel recipe
    the runtime decodes with), the ``models`` and ``heads`` entries, and ``paths`` (every
    listed file's absolute path, inside the bundle). Reading them runs no check again.
    """

    path: Path
    manifest: dict
    signer: str | None = None
    trusted: bool = False
    digest: str | None = None  # SHA-256 (hex) of the manifest bytes that were checked (None: made in code)
    class_names: list[str] = field(init=False, repr=False, compare=False)
    input_size: tuple[int, int] | None = field(init=False, repr=False, compare=False)
    feature_dim: int | None = field(init=False, repr=False, compare=False)
    recipe: dict | None = field(init=False, repr=False, compare=False)
    models: dict[str, dict] = field(init=False, repr=False, compare=False)
    heads: dict[str, dict] = field(init=False, repr=False, compare=False)
    paths: dict[str, Path] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m, put = self.manifest, lambda k, v: object.__setattr__(self, k, v)
        put("path", Path(self.path))
        put("class_names", list(m.get("class_names") or []))
        i = m.get("input") or {}
        put("input_size", (int(i["height"]), int(i["width"])) if "height" in i and "width" in i else None)
        put("feature_dim", int(m["feature_dim"]) if m.get("feature_dim") is not None else None)
        put("recipe", dict(m["preprocessing"]) if isinstance(m.get("preprocessing"), dict) else None)
        put("models", dict(m.get("models") or {}))
        put("heads", dict(m.get("heads") or {}))
        put("paths", {rel: safe_rel(self.path, rel) for rel in (m.get("files") or {})})

    def file(self, rel: str) -> Path:
        """Absolute path of a file listed in the manifest (:attr:`paths`, or an error naming it)."""
        if rel not in self.paths:
            raise BundleError(f"{self.path}: file {rel!r} is not listed in {MANIFEST}")
        return self.paths[rel]

    def model_entry(self, key: str) -> dict:
        """The ``models`` entry ``key`` (``onnx-fp32``, ``trt-fp16`` ...).

        Raises:
            BundleError: no such model (the hint lists the ones there are).
        """
        return self._entry("models", "model", key, [])

    def head_entry(self, name: str) -> dict:
        """The ``heads`` entry ``name`` (``rf`` ...); ``network`` is not a bundled head."""
        return self._entry("heads", "head", name, ["network"])

    def _entry(self, group: str, what: str, key: str, always: list[str]) -> dict:
        entries = dict(self.manifest.get(group) or {})
        if key not in entries:
            raise BundleError(f"bundle {self.path} has no {what} {key!r}",
                              hint=f"available: {', '.join(always + sorted(entries)) or '(none)'}")
        return entries[key]

    def check_model_graph(self, key: str, session) -> None:
        """See :func:`check_model_graph`."""
        check_model_graph(self, key, session)

    def check_head_graph(self, name: str, session) -> None:
        """See :func:`check_head_graph`."""
        check_head_graph(self, name, session)


# ---- opening a bundle ----------------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict:
    """Read and check ``manifest.json`` (bounded, complete schema; no hashing)."""
    mpath, raw = manifest_bytes(Path(path))
    return parse_manifest(raw, mpath)


def _check_signature(bundle: Path, raw: bytes, trust) -> tuple[str | None, bool]:
    """``(signer key id or None, trusted)``; refuses a signature that does not verify, and with
    trust configured an unsigned bundle or a signer that is not trusted."""
    store = trust_store(trust)
    sig = bundle / SIGNATURE
    signer, raw_key = None, None
    if sig.is_file():
        record = read_bundle_json(sig, "the signature")
        try:
            signer = check_signature(record, raw)
        except SignatureError as exc:
            raise TamperedBundleError(f"bundle {bundle}: {SIGNATURE} does not verify: {exc}",
                                      hint="the manifest or the signature was changed after signing; "
                                           "re-export (and sign) the bundle") from None
        import base64

        raw_key = base64.b64decode(record["public_key"])
    if store is None:
        return signer, False
    trusted = signer is not None and store.keys.get(signer) == raw_key
    if not trusted:
        why = "it is not signed" if signer is None else f"it is signed by {signer}, which is not a trusted key"
        raise UntrustedBundleError(
            f"bundle {bundle} is refused: {why} ({store.describe()})",
            hint="sign it with a trusted key (`transfer sign BUNDLE --key KEY` or `transfer export RUN --sign KEY`), "
                 "or trust the key it was signed with")
    return signer, True


def load_bundle(path: str | os.PathLike, *, verify_hashes: bool = True, allow_invalid: bool = False,
                trust=None) -> Bundle:
    """Open a bundle, checking every file against its SHA-256 and the manifest against the files.

    Args:
        path: the bundle folder.
        verify_hashes: hash every file (``False``: sizes only, after a caller hashed them).
        allow_invalid: open a bundle that failed verification at export (``transfer verify``).
        trust: trusted public keys (a ``.pub`` file, a folder of them, a list,
            :class:`transfer.signing.TrustStore`); ``None``: ``TRANSFER_TRUST`` if set, else no
            signature is required; ``False``: none required whatever the environment says.
            With trust, only a bundle signed by a trusted key loads, and its pickled heads
            may be unpickled (:attr:`Bundle.trusted`).

    Raises:
        BundleError: no manifest, unsupported version, a missing file, or the bundle is
            marked invalid (failed verification at export; ``allow_invalid`` overrides).
        TamperedBundleError: a file's size or SHA-256 differs from the manifest (names it),
            a required field is missing, or the manifest contradicts its files.
        UntrustedBundleError: trust is configured and the bundle is not signed by a trusted key.
    """
    bundle = Path(path)
    mpath, raw = manifest_bytes(bundle)
    signer, trusted = _check_signature(bundle, raw, trust)
    manifest = parse_manifest(raw, mpath)
    problems = check_files(bundle, manifest, hashes=verify_hashes)
    if problems:
        first = problems[0]
        names = ", ".join(f"{p['file']} ({p['problem']})" for p in problems)
        cls = BundleError if all(p["problem"] == "missing" for p in problems) else TamperedBundleError
        raise cls(
            f"bundle {bundle} does not match its manifest: {names}",
            hint="the file was changed or damaged after export; re-export the bundle"
            if first["problem"] != "missing"
            else "copy the whole bundle folder, or re-export it",
        )
    check_claims(bundle, manifest)
    if not manifest["valid"] and not allow_invalid:
        raise BundleError(
            f"bundle {bundle} is marked invalid: it failed verification at export",
            hint=f"see {bundle / VERIFICATION}; re-export, or relax the limits of `transfer export`",
        )
    return Bundle(bundle, manifest, signer, trusted, hashlib.sha256(raw).hexdigest())


# ---- the claims against the ONNX graphs ---------------------------------------------------

def _dims(shape: tuple, expected: tuple) -> bool:
    """``expected`` = (None, d1, d2, ...): the batch dimension must be dynamic; the others must
    equal the manifest's (a dimension the graph leaves open does not contradict it)."""
    return (len(shape) == len(expected) and shape[0] is None
            and all(d is None or d == e for d, e in zip(shape[1:], expected[1:])))


def _show(t) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in t.shape) + f") {t.type}"


def _graph_problems(facts, wants: list[tuple[str, str, tuple]]) -> list[str]:
    problems = []
    for kind, name, expected in wants:
        t = facts.input(name) if kind == "input" else facts.output(name)
        want = "(" + ", ".join("N" if e is None else str(e) for e in expected) + ") tensor(float)"
        if t is None:
            problems.append(f"has no {kind} {name!r} (the manifest expects {want})")
        elif t.type != "tensor(float)" or not _dims(t.shape, expected):
            problems.append(f"{kind} {name!r} is {_show(t)}, the manifest says {want}")
    return problems


def _refuse_graph(bundle: Bundle, rel: str, problems: list[str]) -> None:
    if problems:
        raise TamperedBundleError(f"{bundle.path / rel} does not match its manifest entry: {'; '.join(problems)}",
                                  hint="the manifest was edited or the file swapped after export; re-export the bundle")


def check_model_graph(bundle: Bundle, key: str, session) -> None:
    """The ONNX model ``key`` must take ``image`` (N, H, W, 3) float32 at the manifest's input
    size and give ``features`` (N, feature_dim) and ``probs`` (N, classes), and be of the
    declared precision (the ``transfer.precision`` the exporter stamped into it, or its
    graph's quantize nodes when ``onnx`` is installed). ``session``: an open ONNX Runtime
    session of the file (the one that will run it; sessions are made by
    :mod:`transfer.runtime.sessions`). TensorRT engines are checked by their runner.

    Raises:
        TamperedBundleError: naming what differs.
    """
    e = bundle.model_entry(key)
    if e.get("runtime", "onnxruntime") != "onnxruntime":
        return
    facts = facts_of_session(session)
    h, w = bundle.input_size
    wants = [("input", "image", (None, h, w, 3)), ("output", "features", (None, bundle.feature_dim)),
             ("output", "probs", (None, len(bundle.class_names)))]
    cam = bundle.manifest.get("cam") or {}
    if cam.get("available") and "graph" not in cam and key in cam.get("models", []):  # the maps' feature map
        wants.append(("output", "feature_map", (None, *cam["shape"])))
    problems = _graph_problems(facts, wants)
    if facts.metadata.get(ROLE_KEY, "model") != "model":
        problems.append(f"it is a {facts.metadata[ROLE_KEY]}, not a model")
    precision = facts.metadata.get(PRECISION_KEY) or graph_precision(bundle.file(e["file"]))
    if precision is None:
        problems.append("its precision cannot be read (no transfer.precision in it, and the onnx package is not "
                        "installed to read its graph)")
    elif precision != e["precision"]:
        problems.append(f"it is a {precision} model, the manifest says {e['precision']}")
    _refuse_graph(bundle, e["file"], problems)


def check_head_graph(bundle: Bundle, name: str, session) -> None:
    """The ONNX head ``name`` must take its input (N, feature_dim) float32 and give its output
    (N, classes) float32. ``session``: an open ONNX Runtime session of its file.

    Raises:
        TamperedBundleError: naming what differs.
    """
    e = bundle.head_entry(name)
    if not e.get("onnx"):
        return
    facts = facts_of_session(session)
    problems = _graph_problems(facts, [("input", e.get("input", "features"), (None, bundle.feature_dim)),
                                       ("output", e.get("output", "probabilities"),
                                        (None, len(bundle.class_names)))])
    if facts.metadata.get(ROLE_KEY, "head") != "head":
        problems.append(f"it is a {facts.metadata[ROLE_KEY]}, not a head")
    _refuse_graph(bundle, e["onnx"], problems)


def check_graphs(bundle: Bundle, open_session) -> list[dict]:
    """Every ONNX model and head against its manifest entry (``transfer verify``); problems as
    ``{"file", "problem"}``, empty when all agree. ``open_session(path)``: a session that can
    read a file's inputs, outputs and metadata
    (:func:`transfer.runtime.sessions.light_session`)."""
    problems = []
    checks = [(e["file"], check_model_graph, k) for k, e in sorted(bundle.models.items())
              if e.get("runtime", "onnxruntime") == "onnxruntime"]
    checks += [(e["onnx"], check_head_graph, k) for k, e in sorted(bundle.heads.items()) if e.get("onnx")]
    for rel, check, key in checks:
        try:
            check(bundle, key, open_session(bundle.file(rel)))
        except TamperedBundleError as exc:
            problems.append({"file": rel, "problem": exc.message})
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime cannot open it: that is the finding
            problems.append({"file": rel, "problem": f"ONNX Runtime cannot open it: {type(exc).__name__}: {exc}"})
    return problems


# ---- transfer verify -----------------------------------------------------------------------

def verify_bundle(path: str | os.PathLike, *, trust=None) -> dict:
    """Re-check a bundle later (``transfer verify``): returns a report; never raises for file problems.

    Report: ``{"bundle", "valid_at_export", "files_checked", "problems": [...], "unlisted_files",
    "signer", "ok"}``.

    Raises:
        BundleError / TamperedBundleError: no bundle, a manifest of the wrong shape, a
            signature that does not verify, or (with trust) an untrusted one.
    """
    bundle = Path(path)
    mpath, raw = manifest_bytes(bundle)
    signer, trusted = _check_signature(bundle, raw, trust)
    manifest = parse_manifest(raw, mpath)
    problems = check_files(bundle, manifest, hashes=True)
    listed = set(manifest.get("files", {}))
    reported = {p["file"] for p in problems}
    extra = [rel for rel in unlisted_files(bundle, manifest) if rel not in reported]
    return {
        "bundle": str(bundle),
        "valid_at_export": bool(manifest.get("valid", False)),
        "files_checked": len(listed),
        "problems": problems,
        "unlisted_files": extra,
        "signer": signer,
        "trusted": trusted,
        "ok": not problems and bool(manifest.get("valid", False)),
    }
