"""The TensorRT runner: a bundle's engine on this machine's NVIDIA GPU (device-free parts tested
with stand-ins, tests/runtime/test_trt_runner.py; real engines behind the ``gpu`` marker)."""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError
from . import devices
from .devices import CudaError, cuda_call, device_info, error_string, require_tensorrt
from .runner_base import Outputs, Runner


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

    Lifecycle (:class:`~transfer.runtime.runner_base.Runner`): the constructor only checks that
    TensorRT and a CUDA device are there and that the engine was built for this GPU and
    TensorRT version (so a wrong machine fails before any work). :meth:`activate` loads the
    engine and allocates the device buffers once, for the optimization profile's maximum
    batch; ``with TrtRunner(...) as r:`` activates and releases them, and a runner used
    without ``with`` activates on its first :meth:`infer` and releases on :meth:`close`.

    :meth:`infer` takes any batch size: batches larger than the profile's maximum are split,
    and a batch smaller than its minimum (``--batch 8`` builds an 8:8:8 profile; the last
    batch of a folder may hold 3 images) is zero-padded to the minimum and the padding is
    cut off the outputs (each image's outputs depend on that image only). Every CUDA return
    code and every TensorRT call's result is checked: a failure raises
    :class:`~transfer.runtime.devices.CudaError` naming the call and CUDA's message, never
    returns uninitialised memory as predictions.

    Example::

        with TrtRunner(bundle, "trt-fp16") as r:
            out = r.infer(x)   # x: float32 (N, H, W, 3), RGB 0..255; out.features, out.probs
    """

    #: I/O tensors of the model contract (docs/design.md), all float32
    IO = ("image", "features", "probs")
    #: outputs an engine may also have (a bundle exported with maps: ``feature_map``), fetched
    #: only when asked for (:meth:`~transfer.runtime.runner_base.Runner.request`); TensorRT runs
    #: an engine only with an address for every output, so their buffers are always there
    OPTIONAL = Outputs.ON_REQUEST

    def __init__(self, bundle: Bundle, model_key: str, *, device: int | None = None):
        entry = bundle.models[model_key]
        check_engine_matches(entry, device_info(device))
        self._file = bundle.paths[entry["file"]]
        self._device = device
        self._gpu: _TrtResources | None = None
        super().__init__(name=f"tensorrt-{entry['precision']}", provider="TensorRT", model_key=model_key,
                         input_hw=bundle.input_size)

    @property
    def batch_range(self) -> tuple[int, int]:
        """(min, max) batch of the engine's optimization profile (activates the runner)."""
        self.activate()
        return self._gpu.batch_min, self._gpu.batch_max

    def _activate(self) -> None:
        """Load the engine, create the execution context and stream, allocate the buffers once."""
        self._gpu = _TrtResources.create(self._file, self.input_hw, self._device)

    def _deactivate(self) -> None:
        """Free the device buffers and stream and drop the engine.

        Raises:
            CudaError: a ``cudaFree`` / ``cudaStreamDestroy`` failed (everything else is still released).
        """
        gpu, self._gpu = self._gpu, None
        if gpu is not None:
            gpu.release()

    def __del__(self):  # last resort for a runner nobody closed
        try:
            if getattr(self, "_gpu", None) is not None:
                self.deactivate()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def _fetched(self) -> tuple[str, ...]:
        return ("features", "probs", *sorted(n for n in self.requested if n in self._gpu.host))

    def _infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self._lifecycle:  # one engine context: one call at a time
            gpu, names = self._gpu, self._fetched()
            parts = [gpu.run(x[i:i + gpu.batch_max], names) for i in range(0, len(x), gpu.batch_max)]
        if len(parts) == 1:
            return parts[0]
        return {n: np.concatenate([part[n] for part in parts]) for n in names}

    def _empty(self) -> dict[str, np.ndarray]:
        return self._gpu.empty(self._fetched())


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
        trt = require_tensorrt()
        cudart = devices.import_cudart()  # looked up on the module: tests stand a fake CUDA in
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
        cudart, n = self.cudart, self.batch_max
        self.stream = _cuda(cudart, "cudaStreamCreate", cudart.cudaStreamCreate())
        for name in shapes:  # every I/O tensor the engine has: TensorRT needs an address for each
            nbytes = int(n * np.prod(shapes[name][1:], dtype=np.int64) * 4)
            self.device[name] = _cuda(cudart, "cudaMalloc", cudart.cudaMalloc(nbytes))
            if not self.context.set_tensor_address(name, int(self.device[name])):
                raise CudaError(f"TensorRT set_tensor_address({name!r}) failed")
            if name != "image" or self.batch_min > 1:  # the input buffer pads batches below the minimum
                self.host[name] = np.zeros((n, *shapes[name][1:]), np.float32)

    def empty(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        return {n: np.zeros((0, *self.host[n].shape[1:]), np.float32) for n in names}

    def run(self, x: np.ndarray, names: tuple[str, ...] = ("features", "probs")) -> dict[str, np.ndarray]:
        """One engine call on ``len(x) <= batch_max`` images (contiguous float32); the outputs
        ``names`` copied back (the others stay on the device)."""
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
        for name in names:
            got = tuple(ctx.get_tensor_shape(name))
            if got != (b, *self.host[name].shape[1:]):
                raise CudaError(f"TensorRT reports output {name!r} of shape {got} for a batch of {b}; expected "
                                f"{(b, *self.host[name].shape[1:])}")
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda(cudart, "cudaMemcpyAsync", cudart.cudaMemcpyAsync(self.device["image"], src.ctypes.data, src.nbytes,
                                                                h2d, self.stream))
        if not ctx.execute_async_v3(int(self.stream)):
            raise CudaError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        outs = {}
        for name in names:
            out = self.host[name][:b]
            _cuda(cudart, "cudaMemcpyAsync", cudart.cudaMemcpyAsync(out.ctypes.data, self.device[name], out.nbytes,
                                                                    d2h, self.stream))
            outs[name] = out
        _cuda(cudart, "cudaStreamSynchronize", cudart.cudaStreamSynchronize(self.stream))
        return {name: out[:k].copy() for name, out in outs.items()}

    def release(self, quiet: bool = False) -> None:
        """Free every buffer and the stream, even when one of the calls fails; then raise the first failure."""
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
    return cuda_call(cudart, call, result)


def _engine_io(trt, engine, engine_file, hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """Shapes of the engine's I/O tensors (batch dimension first, -1 when dynamic), checked
    against the model contract: tensors ``image`` / ``features`` / ``probs`` and optionally
    those of :attr:`TrtRunner.OPTIONAL` (``feature_map``), nothing else, all float32, and the
    bundle's input size.

    Raises:
        BundleError: naming what differs.
    """
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    missing = [n for n in TrtRunner.IO if n not in names]
    if missing:
        raise BundleError(f"engine {engine_file} has tensors {names}; missing {missing}",
                          hint="rebuild it from the bundle's model: transfer export RUN --trt PRECISION --force")
    extra = [n for n in names if n not in TrtRunner.IO + TrtRunner.OPTIONAL]
    if extra:
        raise BundleError(f"engine {engine_file} has tensors {names}; {extra} are not part of a bundle model",
                          hint="rebuild it from the bundle's model: transfer export RUN --trt PRECISION --force")
    shapes = {}
    for name in names:
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


__all__ = ["TrtRunner", "check_engine_matches"]
