"""Recording stand-ins for the ``tensorrt`` module and cuda-python's runtime (``cudart``).

Why stand-ins: TensorRT cannot be installed on the machines this project is developed and
tested on (no GPU; PyPI's ``tensorrt`` packages fetch their libraries from NVIDIA's own
index, which is unreachable here), and cuda-python's runtime, which does install, answers
every call with ``cudaErrorInsufficientDriver`` without a GPU. So the device-free tests
check the code's *choices* against these objects, which follow the documented API:

* ``tensorrt``: NVIDIA/TensorRT ``python/src/infer/pyCore.cpp`` and ``include/NvInfer.h`` of
  release/10.16 and release/11.1 -- ``create_network(flags)``, ``BuilderFlag`` (10.x has
  FP16/INT8/..., 11.x does not), ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (1 in 10.x,
  0 and ignored in 11.x), ``set_shape`` raising on bad shapes, ``add_optimization_profile``
  returning -1 when invalid, ``set_input_shape`` / ``set_tensor_address`` /
  ``execute_async_v3`` returning bool;
* ``cudart``: cuda-python's ``cuda.bindings.runtime`` -- every call returns
  ``(cudaError_t, *values)``; memory is real host memory here (ctypes buffers), so copies
  and the fake engine's arithmetic move real bytes.

Real GPU behaviour is tested behind ``@pytest.mark.gpu`` (tests/runtime/test_trt_runner.py,
tests/export/test_tensorrt_parts.py) and by ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import ctypes
import enum
import types

import numpy as np

# --------------------------------------------------------------------------- cudart


class CudaErr(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorNoDevice = 100


class FakeCudart:
    """cuda-python's runtime with host memory behind the "device" pointers.

    ``fail = {"cudaMalloc": CudaErr.cudaErrorMemoryAllocation}`` makes that call fail;
    ``calls`` records ``(name, args)`` of every call.
    """

    cudaError_t = CudaErr

    class cudaMemcpyKind(enum.IntEnum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, devices=(("NVIDIA A10", 8, 6),), current: int = 0):
        self.devices, self.current = list(devices), current
        self.fail: dict[str, CudaErr] = {}
        self.calls: list[tuple[str, tuple]] = []
        self.buffers: dict[int, ctypes.Array] = {}
        self.streams: set[int] = set()
        self._next_stream = 1000

    def _ret(self, name, args, *values):
        self.calls.append((name, args))
        err = self.fail.get(name, CudaErr.cudaSuccess)
        if err:
            return (err, *([None] * len(values)))
        return (err, *values)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    # device identity
    def cudaGetDeviceCount(self):
        return self._ret("cudaGetDeviceCount", (), len(self.devices))

    def cudaGetDevice(self):
        return self._ret("cudaGetDevice", (), self.current)

    def cudaSetDevice(self, d):
        self.current = d
        return self._ret("cudaSetDevice", (d,))

    def cudaGetDeviceProperties(self, d):
        name, major, minor = self.devices[d]
        props = types.SimpleNamespace(name=name.encode() + b"\0" * (256 - len(name)), major=major, minor=minor)
        return self._ret("cudaGetDeviceProperties", (d,), props)

    def cudaGetErrorString(self, err):
        text = {CudaErr.cudaErrorMemoryAllocation: b"out of memory", CudaErr.cudaErrorInvalidValue: b"invalid argument",
                CudaErr.cudaErrorNoDevice: b"no CUDA-capable device is detected"}.get(err, b"unknown error")
        return (CudaErr.cudaSuccess, text)

    # memory and streams
    def cudaMalloc(self, nbytes):
        buf = ctypes.create_string_buffer(int(nbytes))
        ptr = ctypes.addressof(buf)
        res = self._ret("cudaMalloc", (nbytes,), ptr)
        if res[0] == 0:
            self.buffers[ptr] = buf
        return res

    def cudaFree(self, ptr):
        res = self._ret("cudaFree", (ptr,))
        if res[0] == 0:
            self.buffers.pop(int(ptr))
        return res

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        res = self._ret("cudaMemcpyAsync", (dst, src, count, kind, stream))
        if res[0] == 0:
            dev = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
            assert self._inside(int(dev), int(count)), "copy outside a device allocation"
            ctypes.memmove(dst, src, count)
        return res

    def _inside(self, ptr: int, count: int) -> bool:
        return any(p <= ptr and ptr + count <= p + len(b) for p, b in self.buffers.items())

    def cudaStreamCreate(self):
        self._next_stream += 1
        res = self._ret("cudaStreamCreate", (), self._next_stream)
        if res[0] == 0:
            self.streams.add(self._next_stream)
        return res

    def cudaStreamSynchronize(self, s):
        return self._ret("cudaStreamSynchronize", (s,))

    def cudaStreamDestroy(self, s):
        res = self._ret("cudaStreamDestroy", (s,))
        if res[0] == 0:
            self.streams.discard(int(s))
        return res


# --------------------------------------------------------------------------- tensorrt


class _Flags:
    """An enum namespace holding only the given names (attribute access to others fails, as in 11.x)."""

    def __init__(self, **values):
        for k, v in values.items():
            setattr(self, k, v)


def fake_tensorrt(version: str = "11.1.0", *, features: int = 4, classes: int = 3, hw=(8, 8),
                  profile=(1, 4, 8), parse_ok: bool = True, build_ok: bool = True, profile_index: int = 0,
                  context_fail: str | None = None, engine_ok: bool = True, timing_cache_ok: bool = True,
                  feature_map: tuple[int, int, int] | None = None, extra_output: str | None = None):
    """A ``tensorrt`` module for one engine: ``image`` (N, H, W, 3) -> ``features`` (N, D), ``probs`` (N, C)
    and, with ``feature_map=(h, w, K)``, ``feature_map`` (N, h, w, K) (a bundle exported with maps).

    The "engine" computes ``features[i] = mean of image i per channel, tiled to D``,
    ``probs[i] = softmax(features[i][:C])`` and the feature map's cells as block means of the
    image (:func:`reference_map`): each row depends on its own image only, like a real
    network, so padding and splitting can be checked against a per-image reference. As
    TensorRT does, ``execute_async_v3`` fails when an output has no address. ``record`` lists
    the builder calls.
    """
    major = int(version.split(".")[0])
    record: list[tuple] = []
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    m.record = record
    builder_flags = dict(DEBUG=2, GPU_FALLBACK=3, REFIT=4, DISABLE_TIMING_CACHE=5, TF32=6, SPARSE_WEIGHTS=7)
    if major < 11:  # present in 10.x, removed in 11.0 (pyCore.cpp release/10.16 vs release/11.0)
        builder_flags.update(FP16=0, INT8=1, OBEY_PRECISION_CONSTRAINTS=9, PREFER_PRECISION_CONSTRAINTS=10,
                             FP8=15, BF16=17, INT4=22, FP4=26)
    m.BuilderFlag = _Flags(**builder_flags)
    m.NetworkDefinitionCreationFlag = _Flags(**({"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major < 11
                                                 else {"STRONGLY_TYPED": 0}))
    m.MemoryPoolType = _Flags(WORKSPACE=0)
    m.TensorIOMode = _Flags(INPUT=1, OUTPUT=2)
    m.DataType = _Flags(FLOAT=0, HALF=1)
    m.float32, m.float16 = 0, 1
    m.nptype = lambda t: {0: np.float32, 1: np.float16}[t]

    class Logger:
        WARNING = 2

        def __init__(self, severity=None):
            self.severity = severity

    class Config:
        def __init__(self):
            self.flags = {builder_flags["TF32"]}  # TF32 on by default (NvInfer.h kTF32)
            self.profiles = []

        def set_memory_pool_limit(self, pool, size):
            record.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, f):
            record.append(("set_flag", f))
            self.flags.add(f)

        def clear_flag(self, f):
            record.append(("clear_flag", f))
            self.flags.discard(f)

        def get_flag(self, f):
            return f in self.flags

        def add_optimization_profile(self, p):
            record.append(("add_optimization_profile", dict(p.shapes)))
            return profile_index

        def create_timing_cache(self, data):
            record.append(("create_timing_cache", bytes(data)))
            return types.SimpleNamespace(serialize=lambda: b"timing-cache:" + bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            record.append(("set_timing_cache", ignore_mismatch))
            return timing_cache_ok

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            if not (lo[0] <= opt[0] <= hi[0]):
                raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return types.SimpleNamespace(name="image")

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            record.append(("parse_from_file", path))
            return parse_ok

        def get_error(self, i):
            return "In node 3 (Conv): unsupported"

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            record.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record.append(("build_serialized_network", sorted(config.flags)))
            return b"ENGINE" if build_ok else None

    h, w = hw
    shapes = {"image": (-1, h, w, 3), "features": (-1, features), "probs": (-1, classes)}
    if feature_map is not None:
        shapes["feature_map"] = (-1, *feature_map)
    if extra_output is not None:
        shapes[extra_output] = (-1, 2)
    io_names = tuple(shapes)

    class Context:
        def __init__(self):
            self.addr, self.batch = {}, None

        def set_tensor_address(self, name, ptr):
            ok = context_fail != "set_tensor_address"
            self.addr[name] = ptr
            return ok

        def set_input_shape(self, name, shape):
            if context_fail == "set_input_shape" or not profile[0] <= shape[0] <= profile[2]:
                return False
            self.batch = shape[0]
            return True

        def get_tensor_shape(self, name):
            return (self.batch, *shapes[name][1:])

        def execute_async_v3(self, stream_handle):
            if context_fail == "execute_async_v3":
                return False
            assert isinstance(stream_handle, int)
            if set(self.addr) != set(io_names):  # TensorRT: "Neither address or allocator is set for output tensor"
                return False
            b = self.batch
            img = np.frombuffer((ctypes.c_char * (b * h * w * 3 * 4)).from_address(self.addr["image"]),
                                np.float32).reshape(b, h, w, 3)
            f, p = reference_outputs(img, features, classes)
            ctypes.memmove(self.addr["features"], f.ctypes.data, f.nbytes)
            ctypes.memmove(self.addr["probs"], p.ctypes.data, p.nbytes)
            if feature_map is not None:
                fm = reference_map(img, feature_map)
                ctypes.memmove(self.addr["feature_map"], fm.ctypes.data, fm.nbytes)
            return True

    class Engine:
        num_io_tensors = len(io_names)

        def get_tensor_name(self, i):
            return io_names[i]

        def get_tensor_shape(self, name):
            return shapes[name]

        def get_tensor_dtype(self, name):
            return m.float32

        def get_tensor_mode(self, name):
            return m.TensorIOMode.INPUT if name == "image" else m.TensorIOMode.OUTPUT

        def get_tensor_profile_shape(self, name, index):
            return [(b, h, w, 3) for b in profile]

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            record.append(("deserialize_cuda_engine", len(data)))
            return Engine() if engine_ok else None

    m.Logger, m.Builder, m.OnnxParser, m.Runtime = Logger, Builder, Parser, Runtime
    return m


def reference_outputs(img: np.ndarray, features: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """What the fake engine computes, image by image: per-channel means tiled to ``features``,
    softmax of the first ``classes`` of them (scaled to 0..1)."""
    means = img.reshape(len(img), -1, 3).astype(np.float64).mean(1)
    f = np.ascontiguousarray(np.tile(means, (1, -(-features // 3)))[:, :features], dtype=np.float32)
    z = f[:, :classes].astype(np.float64) / 255.0
    e = np.exp(z - z.max(1, keepdims=True))
    return f, np.ascontiguousarray(e / e.sum(1, keepdims=True), dtype=np.float32)


def reference_map(img: np.ndarray, cells: tuple[int, int, int]) -> np.ndarray:
    """The fake engine's feature map: the mean of each of ``h x w`` blocks of each image's first
    channel, repeated over ``K`` channels (scaled by the channel index + 1)."""
    fh, fw, k = cells
    n, h, w, _ = img.shape
    blocks = img[..., 0].astype(np.float64).reshape(n, fh, h // fh, fw, w // fw).mean(axis=(2, 4))
    return np.ascontiguousarray(blocks[..., None] * np.arange(1, k + 1), dtype=np.float32)


def install(monkeypatch, trt=None, cudart=None):
    """Make ``import tensorrt`` return ``trt`` and transfer's cuda-python import return ``cudart``."""
    import sys

    from transfer.runtime import devices

    if trt is not None:
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if cudart is not None:
        monkeypatch.setattr(devices, "import_cudart", lambda: cudart)
