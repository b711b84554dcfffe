"""Small real bundles built in code (no TensorFlow): ONNX graphs made with ``onnx.helper``,
written through :func:`transfer.bundle_write.new_manifest` / :func:`transfer.bundle_write.write_bundle`
exactly as the exporter writes them, and helpers to tamper with them as an adversary would
(edit the manifest, rehash a replaced file)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

SIZE, FEATURES = 8, 4


def _graph_model(path: Path, *, size: int, d: int, classes: int, precision: str = "fp32", seed: int = 0,
                 external: str | None = None) -> None:
    """image (N, size, size, 3) -> features = mean over pixels @ W1 (N, d) -> probs = softmax(features @ W2)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.normal(size=(3, d)) / 100).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(d, classes)).astype(np.float32), "w2")
    nodes = [helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w1"], ["features"]),
             helper.make_node("MatMul", ["features", "w2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", d]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 9
    for k, v in (("transfer.role", "model"), ("transfer.precision", precision)):
        model.metadata_props.add(key=k, value=v)
    if external is not None:
        from onnx.external_data_helper import convert_model_to_external_data

        convert_model_to_external_data(model, all_tensors_to_one_file=True, location=external, size_threshold=0)
    onnx.save(model, str(path))


def _graph_head(path: Path, *, d: int, classes: int, seed: int = 1) -> None:
    """features (N, d) -> probabilities = softmax(features @ W) (N, classes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(seed).normal(size=(d, classes)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)], "head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, d])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    model.metadata_props.add(key="transfer.role", value="head")
    onnx.save(model, str(path))


def fitted_head(d: int = FEATURES, classes: int = 2):
    """A real scikit-learn classifier on ``d`` features (what ``transfer heads`` would pickle)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    return LogisticRegression(max_iter=200).fit(rng.normal(size=(40, d)), np.arange(40) % classes)


def check(passed: bool = True) -> dict:
    return {"images": 8, "max_abs_diff": 0.0, "top1_agreement": 1.0, "passed": passed, "reference": "test"}


def make_bundle(folder: Path, *, classes=("a", "b"), size: int = SIZE, d: int = FEATURES, int8: bool = False,
                head: str | None = None, pickle_bytes: bytes | None = None, valid: bool = True,
                external: str | None = None, sign_key=None, unknown: bool = False) -> Path:
    """A complete bundle: fp32 model (and an int8-stamped one), optionally a head ``head`` with
    its ONNX graph and a pickle (``pickle_bytes``, default a fitted classifier), and with
    ``unknown`` the unknown-input scores the exporter fits (on :func:`known_images`)."""
    from transfer.bundle_write import new_manifest, write_bundle

    folder.mkdir(parents=True, exist_ok=True)
    c = len(classes)
    _graph_model(folder / "model.onnx", size=size, d=d, classes=c, external=external)
    models = {"onnx-fp32": {"file": "model.onnx", "precision": "fp32", "runtime": "onnxruntime",
                            "inputs": {"image": "image"}, "outputs": {"features": "features", "probs": "probs"},
                            **({"external_data": [external]} if external else {})}}
    checks = {"onnx-fp32": check()}
    if int8:
        _graph_model(folder / "model.int8.onnx", size=size, d=d, classes=c, precision="int8", seed=2)
        models["onnx-int8"] = {"file": "model.int8.onnx", "precision": "int8", "runtime": "onnxruntime"}
        checks["onnx-int8"] = check(valid)
    heads = {}
    if head:
        (folder / "heads").mkdir(exist_ok=True)
        _graph_head(folder / "heads" / f"{head}.onnx", d=d, classes=c)
        (folder / "heads" / f"{head}.pkl").write_bytes(
            pickle_bytes if pickle_bytes is not None else pickle.dumps(fitted_head(d, c)))
        heads[head] = {"kind": head, "pickle": f"heads/{head}.pkl", "onnx": f"heads/{head}.onnx",
                       "input": "features", "output": "probabilities", "feature_dim": d, "classes": list(range(c))}
        checks[f"head-{head}"] = check()
    records = _unknown_records(folder, size, c) if unknown else {}
    manifest = new_manifest(class_names=list(classes), input_size=(size, size), feature_dim=d, models=models,
                            heads=heads, backbone="tiny", opset=18, source={"run": None, "trial": None}, **records)
    write_bundle(folder, manifest, checks, images=["x.png"], sign_key=sign_key)
    return folder


def known_images(n: int, size: int = SIZE, classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images of the tiny bundle's classes: class k is a grey level (40 + 150 k) with noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = (40 + 150 * y[:, None, None, None] / max(classes - 1, 1) + rng.normal(0, 8, (n, size, size, 3)))
    return np.clip(x, 0, 255).astype(np.uint8), y


def unknown_image(size: int = SIZE) -> np.ndarray:
    """Saturated red: none of the tiny bundle's grey classes."""
    x = np.zeros((size, size, 3), np.uint8)
    x[..., 0] = 255
    return x


def _unknown_records(folder: Path, size: int, classes: int) -> dict:
    """Fit the unknown-input scores as the exporter does (train: class means, val: thresholds)."""
    import onnxruntime as ort

    from transfer.export.calibrate import fit_unknown

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (xtr, ytr), (xva, yva) = known_images(200, size, classes, 0), known_images(100, size, classes, 1)
    ftr, _ = sess.run(["features", "probs"], {"image": xtr.astype(np.float32)})
    fva, pva = sess.run(["features", "probs"], {"image": xva.astype(np.float32)})
    record, arrays = fit_unknown(ftr, ytr, fva, pva, classes, default="mahalanobis")
    np.savez(folder / "unknown.npz", **arrays)
    return {"unknown": record, "calibration": {"method": "none", "reason": "a test bundle"}}


def edit_manifest(bundle: Path, fn) -> None:
    """Change the manifest as a hand edit would (hashes untouched, signature left as it was)."""
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def rehash(bundle: Path, fn=None) -> None:
    """An adversary who also updates the hashes: change the manifest with ``fn`` and rewrite
    every file's SHA-256 (the signature, if any, no longer matches)."""
    from transfer.bundle_format import file_entry

    m = json.loads((bundle / "manifest.json").read_text())
    if fn is not None:
        fn(m)
    for rel in list(m["files"]):
        if (bundle / rel).is_file():
            m["files"][rel] = file_entry(bundle / rel)
    (bundle / "manifest.json").write_text(json.dumps(m))


class Marker:
    """A pickle that, when loaded, writes a marker file (what a malicious head would do)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "code ran"))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(Marker(marker))


def point_external_data(onnx_path: Path, location: str) -> None:
    """Rewrite where an ONNX file's external weights are read from (``../x.bin``, ``/abs/x.bin``)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(onnx_path))
