"""What a manifest claims, checked against the hashed files of its bundle before anything in it
runs: the class names against ``labels.json``, the verification summary and ``valid`` against
``verification.json``, the calibration and unknown-input records against ``calibration.json``,
the unknown-input arrays and the class-activation-map weights against their ``.npz`` headers,
the pixel recipe against this runtime, and the external weights of every ONNX file against
the manifest entry that declares them. :func:`check_claims` runs them all
(:func:`transfer.bundle.load_bundle` calls it after the hashes held); the ONNX graphs
themselves are checked when a session opens them (:func:`transfer.bundle.check_model_graph`).
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

from .bundle_format import (
    CALIBRATION,
    CALIBRATION_KEYS,
    MANIFEST,
    REEXPORT,
    VERIFICATION,
    read_bundle_json,
    safe_rel,
    verification_summary,
)
from .data.image import recipe_version
from .errors import BundleError, TamperedBundleError
from .onnx_facts import external_data
from .unknown_scores import SCORE_ARRAYS, array_problems


def check_claims(bundle: Path, m: dict) -> None:
    """Every claim of the manifest ``m`` (already of the right shape, its files hashed) against
    the files of the folder ``bundle``.

    Raises:
        BundleError: a pixel recipe this runtime does not implement.
        TamperedBundleError: a claim the files contradict (naming the field and the file).
    """
    _check_labels(bundle, m)
    _check_recipe(bundle, m)
    _check_verdict(bundle, m)
    _check_calibration(bundle, m)
    _check_unknown_arrays(bundle, m)
    _check_cam(bundle, m)
    _check_external_data(bundle, m)


def _check_labels(bundle: Path, m: dict) -> None:
    """The hashed label file must list exactly ``class_names`` (an edited manifest would
    otherwise relabel every prediction silently)."""
    rel = m["labels"]
    labels = read_bundle_json(safe_rel(bundle, rel), "the label file")
    if labels != m["class_names"]:
        shown = labels[:5] if isinstance(labels, list) else labels
        raise TamperedBundleError(
            f"{bundle / MANIFEST}: 'class_names' differ from the exported labels in {rel} "
            f"(manifest {m['class_names'][:5]!r}..., exported {shown!r:.80}...)",
            hint="the manifest was edited after export; re-export the bundle (class names come from the data folders)",
        )


def _check_recipe(bundle: Path, m: dict) -> None:
    """The bundle's pixel recipe must be one this runtime implements (train/serve parity): the
    runtime decodes the bundle's images with the recipe it records, old versions included."""
    try:
        recipe_version(m["preprocessing"])
    except ValueError as exc:
        tools = m.get("tools")
        made_by = tools.get("transfer", "another version") if isinstance(tools, dict) else "another version"
        raise BundleError(
            f"bundle {bundle} was exported with a {exc}; its predictions would not match training",
            hint=f"run it with the transfer that exported it ({made_by}), or re-export it with this one",
        ) from None


def _check_verdict(bundle: Path, m: dict) -> None:
    """The manifest's ``verification`` block must be the summary of the hashed
    ``verification.json``, every model and head must have a check, and ``valid: true`` needs
    every check passed."""
    rec = read_bundle_json(bundle / VERIFICATION, "the verification record")
    if not isinstance(rec, dict) or not all(isinstance(v, dict) and isinstance(v.get("passed"), bool)
                                            for k, v in rec.items() if k != "images"):
        raise TamperedBundleError(f"{bundle / VERIFICATION} is not a verification record", hint=REEXPORT)
    checks = {k: v for k, v in rec.items() if k != "images"}
    summary = verification_summary(checks)

    def same(a, b) -> bool:  # as JSON text: a NaN difference equals itself
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    if not same(summary, m["verification"]):
        differ = sorted(k for k in set(checks) | set(m["verification"])
                        if not same(summary.get(k), m["verification"].get(k)))
        raise TamperedBundleError(
            f"bundle {bundle}: the manifest's verification summary does not match {VERIFICATION} "
            f"(differs in: {', '.join(differ)})",
            hint="the manifest was edited after export; re-export the bundle")
    needed = [*m["models"], *(f"head-{h}" for h in m["heads"])]
    unchecked = [k for k in needed if k not in checks]
    if unchecked:
        raise TamperedBundleError(f"bundle {bundle}: {', '.join(unchecked)} ha{'s' if len(unchecked) == 1 else 've'} "
                                  f"no verification in {VERIFICATION}; an unverified model is never loaded",
                                  hint="the manifest was edited after export; re-export the bundle")
    failed = [k for k, v in checks.items() if v["passed"] is False]
    if m["valid"] and failed:
        raise TamperedBundleError(
            f"bundle {bundle} says it is valid, but its verification record shows {', '.join(failed)} failed",
            hint="the manifest was edited after export; re-export the bundle",
        )


def _check_calibration(bundle: Path, m: dict) -> None:
    """The manifest's calibration and unknown-input records must be the hashed ``calibration.json``
    (an edited threshold would otherwise change which images are called unknown)."""
    present = {k: m[k] for k in CALIBRATION_KEYS if k in m}
    if not present and CALIBRATION not in m["files"]:
        return
    rec = read_bundle_json(bundle / CALIBRATION, "the calibration record")
    if json.dumps(rec, sort_keys=True) != json.dumps(present, sort_keys=True):
        differ = [k for k in CALIBRATION_KEYS if json.dumps((rec or {}).get(k), sort_keys=True)
                  != json.dumps(present.get(k), sort_keys=True)]
        raise TamperedBundleError(
            f"bundle {bundle}: the manifest's {' and '.join(differ) or 'calibration'} record does not match "
            f"{CALIBRATION}", hint="the manifest was edited after export; re-export the bundle")


def _npz_headers(path: Path) -> dict[str, tuple[tuple, str]]:
    """``{array name: (shape, dtype kind)}`` of an ``.npz`` read from its headers only (no array
    data, nothing unpickled).

    Raises:
        ValueError: not a zip of ``.npy`` members, or a member whose header cannot be read.
    """
    import zipfile

    import numpy as np

    out = {}
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(str(exc)) from None
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy") or "/" in info.filename:
                raise ValueError(f"member {info.filename!r} is not a top-level .npy array")
            with zf.open(info) as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            out[info.filename[:-4]] = (tuple(int(d) for d in shape), dtype.kind)
    return out


def _check_unknown_arrays(bundle: Path, m: dict) -> None:
    """The hashed parameter file of the unknown-input scores must hold the arrays the offered
    scores need, floating point (an object array would be a pickle), shaped for the bundle's
    feature width and classes, and a kNN bank with at least ``k`` rows -- read from the array
    headers, before any score is computed."""
    unk = m.get("unknown")
    if not isinstance(unk, dict) or not unk.get("scores"):
        return
    by_file: dict[str, list[str]] = {}
    for name, e in unk["scores"].items():
        if SCORE_ARRAYS[name]:
            by_file.setdefault(e["file"], []).append(name)
    for rel, names in by_file.items():
        path = safe_rel(bundle, rel)
        try:
            headers = _npz_headers(path)
        except (OSError, ValueError, EOFError) as exc:
            raise TamperedBundleError(f"{path}: not the unknown-input parameters of a bundle ({exc})",
                                      hint=REEXPORT) from None
        needed = sorted({a for n in names for a in SCORE_ARRAYS[n]})
        problems = array_problems(headers, feature_dim=m["feature_dim"], num_classes=len(m["class_names"]),
                                  needed=needed)
        if "knn" in names and "bank" in headers and unk["scores"]["knn"]["k"] > headers["bank"][0][0]:
            problems.append(f"kNN k = {unk['scores']['knn']['k']} but the bank holds {headers['bank'][0][0]} rows")
        if problems:
            raise TamperedBundleError(f"{path} does not fit its manifest: {'; '.join(problems)}", hint=REEXPORT)


def _check_cam(bundle: Path, m: dict) -> None:
    """The class-activation-map record (``cam``, :mod:`transfer.export.cam_export`): either
    ``available: false`` with a reason, or a layer, a feature-map shape (h, w, K), models that
    exist, and a hashed weights file holding only ``kernel`` float (K, classes) -- read from its
    array header, nothing unpickled -- or, for a Grad-CAM graph, the listed ``cam.onnx``."""
    cam = m.get("cam")
    if cam is None:
        return
    where = f"{bundle / MANIFEST}: 'cam'"
    if not isinstance(cam, dict) or not isinstance(cam.get("available"), bool):
        raise TamperedBundleError(f"{where} must be an object with available: true|false", hint=REEXPORT)
    if not cam["available"]:
        if not isinstance(cam.get("reason"), str) or not cam["reason"]:
            raise TamperedBundleError(f"{where} says no maps but gives no reason", hint=REEXPORT)
        return
    shape, models = cam.get("shape"), cam.get("models")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise TamperedBundleError(f"{where}.shape must be [h, w, channels], got {shape!r:.80}", hint=REEXPORT)
    if not isinstance(models, list) or not models or any(k not in m["models"] for k in models):
        raise TamperedBundleError(f"{where}.models must name models of the bundle, got {models!r:.80}", hint=REEXPORT)
    if "graph" in cam:  # a Grad-CAM graph (transfer.export.cam_graph); listed and hashed by check_files
        if not isinstance(cam.get("layer"), str) or cam.get("output") != "cam" or cam.get("graph") != "cam.onnx":
            raise TamperedBundleError(f"{where} needs its layer, output 'cam' and graph 'cam.onnx'", hint=REEXPORT)
        return
    if not isinstance(cam.get("layer"), str) or cam.get("output") != "feature_map":
        raise TamperedBundleError(f"{where} needs its layer and output 'feature_map'", hint=REEXPORT)
    path = safe_rel(bundle, str(cam.get("weights")))
    try:
        headers = _npz_headers(path)
    except (OSError, ValueError, EOFError) as exc:
        raise TamperedBundleError(f"{path}: not the class weights of a bundle's maps ({exc})", hint=REEXPORT) from None
    want = (shape[2], len(m["class_names"]))
    if set(headers) != {"kernel"} or headers["kernel"][1] != "f" or headers["kernel"][0] != want:
        got = ", ".join(f"{k} {v[0]} kind {v[1]!r}" for k, v in headers.items()) or "nothing"
        raise TamperedBundleError(f"{path} does not fit its manifest: it holds {got}, the maps need kernel {want} "
                                  "float", hint=REEXPORT)


def _check_external_data(bundle: Path, m: dict) -> None:
    """Weights in external files: each must be declared by its model's entry (and so listed and
    hashed) and lie inside the bundle; heads have none."""
    onnx_files = [(f"models.{k}", e["file"], e.get("external_data", [])) for k, e in m["models"].items()
                  if e.get("runtime", "onnxruntime") == "onnxruntime"]
    onnx_files += [(f"heads.{k}", e["onnx"], []) for k, e in m["heads"].items() if e.get("onnx")]
    for where, rel, declared in onnx_files:
        refs = external_data(safe_rel(bundle, rel))
        if refs is None:
            raise TamperedBundleError(
                f"{bundle / rel} refers to external data this runtime cannot list without the onnx package",
                hint="pip install onnx to check it, or re-export the bundle (transfer writes no external data)")
        for ref in refs:
            target = posixpath.normpath(posixpath.join(posixpath.dirname(rel), ref.replace("\\", "/")))
            if posixpath.isabs(ref) or target.split("/")[0] == ".." or "\\" in ref:
                raise TamperedBundleError(f"{bundle / rel} loads weights from {ref!r}, outside the bundle; refusing "
                                          "to load it", hint="re-export the bundle")
            if target not in declared:
                raise TamperedBundleError(
                    f"{bundle / rel} loads weights from {target}, which its manifest entry {where} does not "
                    "declare (so nothing checks their hash)", hint="re-export the bundle")
