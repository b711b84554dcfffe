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
    """A native TensorRT engine from the bundle (TensorRT 10.x / 11.x, cuda-python 12 / 13; NVIDIA GPU only).

    Lifecycle (Polygraphy's ``activate`` / ``deactivate``): the constructor only checks that
    TensorRT and a CUDA device are there and that the engine was built for this GPU and
    TensorRT version (so a wrong machine fails before any work). :meth:`activate` loads the
    engine and allocates the device buffers once, for the optimization profile's maximum
    batch; ``with TrtRunner(...) as r:`` activates and releases them, and a runner used
    without ``with`` activates on its first :meth:`run` and releases on :meth:`close`.

    :meth:`run` takes any batch size: batches larger than the profile's maximum are split,
    and a batch smaller than its minimum (``--batch 8`` builds an 8:8:8 profile; the last
    batch of a folder may hold 3 images) is zero-padded to the minimum and the padding is
    cut off the outputs (each image's outputs depend on that image only). Every CUDA return
    code and every TensorRT call's result is checked: a failure raises
    :class:`~transfer.runtime.devices.CudaError` naming the call and CUDA's message, never
    returns uninitialised memory as predictions.

    Example::

        with TrtRunner(bundle, "trt-fp16") as r:
            features, probs = r.run(x)   # x: float32 (N, H, W, 3), RGB 0..255
    """

    #: I/O tensors of the model contract (docs/design.md), all float32
    IO = ("image", "features", "probs")

    def __init__(self, bundle: Bundle, model_key: str, *, device: int | None = None):
        import threading

        from .devices import device_info

        entry = bundle.model_entry(model_key)
        check_engine_matches(entry, device_info(device))
        self._file = bundle.file(entry["file"])
        self._hw = tuple(bundle.input_size)
        self._device = device
        self._lock = threading.RLock()
        self._gpu: _TrtResources | None = None
        super().__init__(name=f"tensorrt-{entry['precision']}", provider="TensorRT", model_key=model_key)

    @property
    def active(self) -> bool:
        return self._gpu is not None

    @property
    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch of the engine's optimization profile (activates the runner)."""
        gpu = self.activate()._gpu
        return gpu.batch_min, gpu.batch_max

    def activate(self) -> "TrtRunner":
        """Load the engine, create the execution context and stream, allocate the buffers once."""
        with self._lock:
            if self._gpu is None:
                self._gpu = _TrtResources.create(self._file, self._hw, self._device)
        return self

    def deactivate(self) -> None:
        """Free the device buffers and stream and drop the engine (idempotent).

        Raises:
            CudaError: a ``cudaFree`` / ``cudaStreamDestroy`` failed (everything else is still released).
        """
        with self._lock:
            gpu, self._gpu = self._gpu, None
        if gpu is not None:
            gpu.release()

    close = deactivate

    def __enter__(self) -> "TrtRunner":
        return self.activate()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.deactivate()
            return
        try:  # do not hide the error that is already propagating
            self.deactivate()
        except Exception:  # noqa: BLE001
            pass

    def __del__(self):  # last resort for a runner nobody closed
        try:
            if getattr(self, "_gpu", None) is not None:
                self.deactivate()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(features, probs)`` of float32 NHWC pixels ``x`` (any batch size).

        Raises:
            ConfigError: ``x`` is not (N, H, W, 3) at the bundle's input size.
            CudaError: a CUDA or TensorRT call failed (named in the message).
        """
        x = np.asarray(x)
        h, w = self._hw
        if x.ndim != 4 or x.shape[1:] != (h, w, 3):
            raise ConfigError(f"the engine takes images of shape (N, {h}, {w}, 3); got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        with self._lock:
            gpu = self.activate()._gpu
            if len(x) == 0:
                return gpu.empty()
            parts = [gpu.run(x[i:i + gpu.batch_max]) for i in range(0, len(x), gpu.batch_max)]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([f for f, _ in parts]), np.concatenate([p for _, p in parts])


class _TrtResources:
    """What an active :class:`TrtRunner` holds on the GPU: engine, context, stream, buffers.

    The TensorRT calls are those of the Python API read in NVIDIA/TensorRT
    ``python/src/infer/pyCore.cpp`` (identical in 10.x and 11.x):
    ``Runtime.deserialize_cuda_engine`` (None on failure), ``ICudaEngine.num_io_tensors`` /
    ``get_tensor_name`` / ``get_tensor_shape`` / ``get_tensor_dtype`` /
    ``get_tensor_profile_shape(name, profile)`` (``[min, opt, max]``),
    ``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``
    (each returns ``bool``: ``False`` is a failure, reported by TensorRT's logger). CUDA calls
    go through :func:`transfer.runtime.devices.cuda_call`.
    """

    def __init__(self, trt, cudart, engine, context, hw: tuple[int, int], batch: tuple[int, int]):
        self.trt, self.cudart, self.engine, self.context = trt, cudart, engine, context
        self.hw, (self.batch_min, self.batch_max) = hw, batch
        self.stream = None
        self.device: dict[str, int] = {}        # tensor name -> device pointer, allocated once
        self.host: dict[str, np.ndarray] = {}   # outputs (and the padding buffer of the input), allocated once

    @classmethod
    def create(cls, engine_file, hw: tuple[int, int], device: int | None) -> "_TrtResources":
        from .devices import CudaError, import_cudart, require_tensorrt

        trt = require_tensorrt()
        cudart = import_cudart()
        if device is not None:
            _cuda(cudart, "cudaSetDevice", cudart.cudaSetDevice(int(device)))
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(engine_file.read_bytes())
        if engine is None:
            raise BundleError(f"TensorRT could not load the engine {engine_file} (see the TensorRT log above)",
                              hint="rebuild it on this machine: transfer export RUN --trt PRECISION --force")
        shapes = _engine_io(trt, engine, engine_file, hw)
        batch = _profile_batch(engine, engine_file)
        context = engine.create_execution_context()
        if context is None:
            raise CudaError(f"TensorRT create_execution_context failed for {engine_file} (out of device memory?)")
        res = cls(trt, cudart, engine, context, hw, batch)
        try:
            res._allocate(shapes)
        except BaseException:
            res.release(quiet=True)
            raise
        return res

    def _allocate(self, shapes: dict[str, tuple[int, ...]]) -> None:
        from .devices import CudaError

        cudart, n = self.cudart, self.batch_max
        self.stream = _cuda(cudart, "cudaStreamCreate", cudart.cudaStreamCreate())
        for name in TrtRunner.IO:
            nbytes = int(n * np.prod(shapes[name][1:], dtype=np.int64) * 4)
            self.device[name] = _cuda(cudart, "cudaMalloc", cudart.cudaMalloc(nbytes))
            if not self.context.set_tensor_address(name, int(self.device[name])):
                raise CudaError(f"TensorRT set_tensor_address({name!r}) failed")
            if name != "image" or self.batch_min > 1:  # the input buffer pads batches below the minimum
                self.host[name] = np.zeros((n, *shapes[name][1:]), np.float32)

    def empty(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.zeros((0, *self.host["features"].shape[1:]), np.float32),
                np.zeros((0, *self.host["probs"].shape[1:]), np.float32))

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One engine call on ``len(x) <= batch_max`` images (contiguous float32)."""
        from .devices import CudaError

        cudart, ctx = self.cudart, self.context
        k = len(x)
        b = max(k, self.batch_min)
        if b > k:  # pad to the profile's minimum with zeros; the padding rows are cut off below
            src = self.host["image"][:b]
            src[:k] = x
            src[k:] = 0.0
        else:
            src = x
        shape = (b, *self.hw, 3)
        if not ctx.set_input_shape("image", shape):
            raise CudaError(f"TensorRT set_input_shape('image', {shape}) failed (profile batch "
                            f"{self.batch_min}..{self.batch_max})")
        for name in ("features", "probs"):
            got = tuple(ctx.get_tensor_shape(name))
            if got != (b, *self.host[name].shape[1:]):
                raise CudaError(f"TensorRT reports output {name!r} of shape {got} for a batch of {b}; expected "
                                f"{(b, *self.host[name].shape[1:])}")
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda(cudart, "cudaMemcpyAsync", cudart.cudaMemcpyAsync(self.device["image"], src.ctypes.data, src.nbytes,
                                                                h2d, self.stream))
        if not ctx.execute_async_v3(int(self.stream)):
            raise CudaError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        outs = []
        for name in ("features", "probs"):
            out = self.host[name][:b]
            _cuda(cudart, "cudaMemcpyAsync", cudart.cudaMemcpyAsync(out.ctypes.data, self.device[name], out.nbytes,
                                                                    d2h, self.stream))
            outs.append(out)
        _cuda(cudart, "cudaStreamSynchronize", cudart.cudaStreamSynchronize(self.stream))
        return outs[0][:k].copy(), outs[1][:k].copy()

    def release(self, quiet: bool = False) -> None:
        """Free every buffer and the stream, even when one of the calls fails; then raise the first failure."""
        from .devices import CudaError, error_string

        cudart, failures = self.cudart, []
        for name, ptr in list(self.device.items()):
            err = cudart.cudaFree(ptr)[0]
            if int(err) != 0:
                failures.append(f"cudaFree({name}): {error_string(cudart, err)}")
        self.device.clear()
        if self.stream is not None:
            err = cudart.cudaStreamDestroy(self.stream)[0]
            if int(err) != 0:
                failures.append(f"cudaStreamDestroy: {error_string(cudart, err)}")
            self.stream = None
        self.context = self.engine = None
        self.host.clear()
        if failures and not quiet:
            raise CudaError("releasing the TensorRT runner failed: " + "; ".join(failures))


def _cuda(cudart, call: str, result):
    from .devices import cuda_call

    return cuda_call(cudart, call, result)


def _engine_io(trt, engine, engine_file, hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Shapes of the engine's I/O tensors (batch dimension first, -1 when dynamic), checked
    against the model contract: tensors ``image`` / ``features`` / ``probs``, float32, and
    the bundle's input size.

    Raises:
        BundleError: naming what differs.
    """
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    missing = [n for n in TrtRunner.IO if n not in names]
    if missing:
        raise BundleError(f"engine {engine_file} has tensors {names}; missing {missing}",
                          hint="rebuild it from the bundle's model: transfer export RUN --trt PRECISION --force")
    shapes = {}
    for name in TrtRunner.IO:
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        if dtype != np.float32:
            raise BundleError(f"engine {engine_file}: tensor {name!r} is {dtype}, the bundle contract is float32 "
                              "input and outputs (fp16 models keep float32 I/O)")
        if any(d < 0 for d in shape[1:]):
            raise BundleError(f"engine {engine_file}: tensor {name!r} has shape {shape}; only the batch may vary")
        shapes[name] = shape
    if shapes["image"][1:] != (*hw, 3):
        raise BundleError(f"engine {engine_file} takes images of shape {shapes['image'][1:]}; the bundle's input "
                          f"is {(*hw, 3)}")
    return shapes


def _profile_batch(engine, engine_file) -> tuple[int, int]:
    """(min, max) batch of optimization profile 0 (``get_tensor_profile_shape`` -> [min, opt, max])."""
    lo, _, hi = [tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape("image", 0)]
    if not 1 <= lo[0] <= hi[0]:
        raise BundleError(f"engine {engine_file} has an unusable batch profile {lo[0]}..{hi[0]}")
    return lo[0], hi[0]


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
