"""Backends behind one interface: ``run(x) -> (features, probs)`` for float32 NHWC 0..255 pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, ConfigError, TensorRTUnavailableError

BACKENDS = ("onnxruntime", "onnxruntime-int8", "tensorrt")


@dataclass
class Runner:
    name: str
    provider: str
    model_key: str

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError


class OrtRunner(Runner):
    """ONNX Runtime on the bundle's fp32 or int8 model."""

    def __init__(self, bundle: Bundle, model_key: str = "onnx-fp32", providers=None, threads: int | None = None):
        from .sessions import make_session

        entry = bundle.model_entry(model_key)
        self.session, provider = make_session(bundle.file(entry["file"]), providers, threads=threads)
        bundle.check_model_graph(model_key, self.session)  # the graph is what the manifest says it is
        super().__init__(name="onnxruntime" if model_key == "onnx-fp32" else f"onnxruntime-{entry['precision']}",
                         provider=provider, model_key=model_key)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, p = self.session.run(["features", "probs"], {"image": np.ascontiguousarray(x, dtype=np.float32)})
        return f, p


def check_engine_matches(entry: dict, device: dict) -> None:
    """Refuse an engine built for another GPU or TensorRT version (engines are not portable).

    Raises:
        BundleError: naming what differs and how to rebuild.
    """
    diffs = []
    if entry.get("compute_capability") and entry["compute_capability"] != device.get("compute_capability"):
        diffs.append(f"compute capability {entry['compute_capability']} vs this GPU's {device.get('compute_capability')}")
    if entry.get("tensorrt") and entry["tensorrt"] != device.get("tensorrt"):
        diffs.append(f"TensorRT {entry['tensorrt']} vs installed {device.get('tensorrt')}")
    if diffs:
        raise BundleError(
            f"engine {entry.get('file')} was built for {entry.get('gpu', '?')} and cannot run here: {'; '.join(diffs)}",
            hint="rebuild it on this machine (`transfer export RUN --trt PRECISION --force`), or run the bundle's "
                 "ONNX model (`transfer infer BUNDLE ... --backend onnxruntime`)",
        )


class TrtRunner(Runner):
    """A native TensorRT engine from the bundle (TensorRT 10 API; NVIDIA GPU only)."""

    def __init__(self, bundle: Bundle, model_key: str):
        from .devices import device_info, require_tensorrt

        trt = require_tensorrt()
        entry = bundle.model_entry(model_key)
        check_engine_matches(entry, device_info())
        from cuda import cudart

        self._cudart = cudart
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(bundle.file(entry["file"]).read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT could not load {entry['file']}")
        h, w = bundle.input_size
        shape = tuple(self.engine.get_tensor_shape("image"))
        if len(shape) != 4 or tuple(shape[1:]) != (h, w, 3):
            raise BundleError(f"engine {entry['file']} takes images of shape {shape}, the manifest says (N, {h}, {w}, 3)",
                              hint="the manifest was edited or the engine swapped after export; re-export the bundle")
        self.context = self.engine.create_execution_context()
        self.max_batch = int(entry.get("batch", {}).get("max", 1))
        err, self.stream = cudart.cudaStreamCreate()
        super().__init__(name=f"tensorrt-{entry['precision']}", provider="TensorRT", model_key=model_key)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cud = self._cudart
        if len(x) > self.max_batch:
            parts = [self.run(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
            return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.context.set_input_shape("image", x.shape)
        outs, ptrs = {}, []
        for name in ("image", "features", "probs"):
            shape = tuple(self.context.get_tensor_shape(name))
            arr = x if name == "image" else np.empty(shape, np.float32)
            _, ptr = cud.cudaMalloc(arr.nbytes)
            ptrs.append(ptr)
            self.context.set_tensor_address(name, int(ptr))
            if name == "image":
                cud.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, cud.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream)
            else:
                outs[name] = (arr, ptr)
        self.context.execute_async_v3(self.stream)
        for arr, ptr in outs.values():
            cud.cudaMemcpyAsync(arr.ctypes.data, ptr, arr.nbytes, cud.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream)
        cud.cudaStreamSynchronize(self.stream)
        for ptr in ptrs:
            cud.cudaFree(ptr)
        return outs["features"][0], outs["probs"][0]


def model_key_for(bundle: Bundle, backend: str | None) -> str:
    """The bundle's model entry that ``backend`` runs (no session is created; the driver of
    a Ray job checks the options with this before any worker starts).

    Raises:
        ConfigError: unknown backend; BundleError: the bundle has no such model / engine.

    Example::

        model_key_for(bundle, "onnxruntime-int8")
        # 'onnx-int8'
    """
    backend = backend or "onnxruntime"
    if backend == "tensorrt" or backend.startswith("tensorrt-"):
        engines = sorted(k for k, e in bundle.models.items() if e.get("runtime") == "tensorrt")
        key = engines[0] if backend == "tensorrt" and engines else "trt-" + backend.partition("-")[2]
        if key not in engines:
            raise BundleError(f"bundle {bundle.path} has no {'TensorRT' if backend == 'tensorrt' else backend} engine",
                              hint=f"engines in it: {', '.join(engines) or '(none)'}; build one on a GPU machine "
                                   "(`transfer export RUN --trt fp16 --force`), or run its ONNX model "
                                   "(`transfer infer BUNDLE ... --backend onnxruntime`)", option="backend")
        return key
    if backend == "onnxruntime" or backend.startswith("onnxruntime-"):
        key = "onnx-" + (backend.partition("-")[2] or "fp32")
        bundle.model_entry(key)  # BundleError naming the models it has
        return key
    raise ConfigError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)} (tensorrt-fp16 etc.)")


def make_runner(bundle: Bundle, backend: str | None = None, providers: Sequence[str] | str | None = None,
                threads: int | None = None) -> Runner:
    """The runner for ``backend`` (default: ONNX Runtime fp32 on the best provider available).

    Raises:
        ConfigError: unknown backend; BundleError: the bundle has no such model;
        TensorRTUnavailableError: ``tensorrt`` without GPU.
    """
    if threads is not None and threads < 1:
        raise ConfigError(f"ONNX Runtime threads must be positive (got {threads})", option="threads")
    key = model_key_for(bundle, backend)
    if bundle.models[key].get("runtime") == "tensorrt":
        try:
            return TrtRunner(bundle, key)
        except TensorRTUnavailableError as exc:
            raise TensorRTUnavailableError(exc.message, hint="run the bundle's ONNX model here (`transfer infer "
                                                            "BUNDLE ... --backend onnxruntime`); TensorRT engines "
                                                            "need an NVIDIA GPU and TensorRT") from None
    return OrtRunner(bundle, key, providers, threads)


__all__ = ["BACKENDS", "OrtRunner", "TrtRunner", "make_runner", "model_key_for", "check_engine_matches", "TensorRTUnavailableError"]
