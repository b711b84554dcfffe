"""Running a bundle's model: :class:`OrtRunner` (ONNX Runtime) and :func:`make_runner`, which
picks the runner of a backend (the TensorRT one is :class:`~transfer.runtime.trt_runner.TrtRunner`).

Every runner follows :class:`~transfer.runtime.runner_base.Runner`: ``activate`` /
``infer(x) -> Outputs`` / ``deactivate``, a context manager (Polygraphy's shape).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, TensorRTUnavailableError
from .predict_config import ModelOptions, check_value
from .runner_base import Outputs, Runner
from .sessions import choose_providers, make_session
from .trt_runner import TrtRunner


class OrtRunner(Runner):
    """ONNX Runtime on one model file of the model contract (input ``image``; outputs
    ``features``, ``probs`` and any other :class:`~transfer.runtime.runner_base.Outputs` field
    the graph has).

    :meth:`activate` makes the session (:func:`transfer.runtime.sessions.make_session`) and
    runs ``check(session)`` on it (a bundle's runner checks the graph against the manifest:
    once per session); :meth:`deactivate` drops it.

    Args:
        path: the ONNX model.
        providers / threads / spinning: as :func:`~transfer.runtime.sessions.make_session` takes them.
        name / model_key: what reports show (``onnxruntime-int8``) and the bundle's model entry.
        check: called with every session made, before it runs anything.

    Example::

        with OrtRunner("bundle/model.onnx", "cpu") as r:
            probs = r.infer(x).probs
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | str | None = None, threads: int | None = None,
                 *, name: str = "onnxruntime", model_key: str = "onnx-fp32", check: Callable | None = None,
                 spinning: bool = True):
        self.path = path
        self._session_args = dict(providers=providers, threads=threads, spinning=spinning)
        self._check = check
        self.session = None
        self._outputs: list[str] = []
        super().__init__(name=name, provider=choose_providers(providers)[0], model_key=model_key)

    def _activate(self) -> None:
        args = self._session_args
        session, self.provider = make_session(self.path, args["providers"], threads=args["threads"],
                                              spinning=args["spinning"])
        if self._check is not None:
            self._check(session)  # the graph is what the manifest says it is, before it runs
        shape = session.get_inputs()[0].shape
        if len(shape) == 4 and all(isinstance(d, int) for d in shape[1:3]):
            self.input_hw = (shape[1], shape[2])
        have = {o.name for o in session.get_outputs()}
        self._outputs = [n for n in Outputs.names() if n in have]
        self.session = session

    def _deactivate(self) -> None:
        self.session = None

    def _infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        names = [n for n in self._outputs if n not in Outputs.ON_REQUEST or n in self.requested]
        return dict(zip(names, self.session.run(names, {"image": x})))

    def _empty(self) -> dict[str, np.ndarray]:
        dims = {o.name: o.shape[1:] for o in self.session.get_outputs()}
        return {n: np.zeros((0, *[d if isinstance(d, int) else 0 for d in dims[n]]), np.float32)
                for n in self._outputs if n not in Outputs.ON_REQUEST or n in self.requested}


def bundle_runner(bundle: Bundle, model_key: str, providers=None, threads: int | None = None, *,
                  spinning: bool = True) -> OrtRunner:
    """The :class:`OrtRunner` of the bundle's ONNX model ``model_key``, active: its session made
    and its graph checked against the manifest (:func:`transfer.bundle.check_model_graph`).

    Raises:
        TamperedBundleError: the graph is not what the manifest says.
    """
    entry = bundle.models[model_key]
    name = "onnxruntime" if model_key == "onnx-fp32" else f"onnxruntime-{entry['precision']}"
    return OrtRunner(bundle.paths[entry["file"]], providers, threads, name=name, model_key=model_key,
                     check=lambda session: bundle.check_model_graph(model_key, session),
                     spinning=spinning).activate()


def model_key_for(bundle: Bundle, backend: str | None) -> str:
    """The bundle's model entry that ``backend`` runs (no session is created; the driver of
    a Ray job checks the options with this before any worker starts).

    Raises:
        ConfigError: unknown backend; BundleError: the bundle has no such model / engine.

    Example::

        model_key_for(bundle, "onnxruntime-int8")
        # 'onnx-int8'
    """
    backend = check_value(ModelOptions, "backend", backend or "onnxruntime")
    if backend.startswith("tensorrt"):
        engines = sorted(k for k, e in bundle.models.items() if e.get("runtime") == "tensorrt")
        key = engines[0] if backend == "tensorrt" and engines else "trt-" + backend.partition("-")[2]
        if key not in engines:
            raise BundleError(f"bundle {bundle.path} has no {'TensorRT' if backend == 'tensorrt' else backend} engine",
                              hint=f"engines in it: {', '.join(engines) or '(none)'}; build one on a GPU machine "
                                   "(`transfer export RUN --trt fp16 --force`), or run its ONNX model "
                                   "(`transfer infer BUNDLE ... --backend onnxruntime`)", option="backend")
        return key
    key = "onnx-" + (backend.partition("-")[2] or "fp32")
    if key not in bundle.models:
        bundle.model_entry(key)  # BundleError naming the models it has
    return key


def make_runner(bundle: Bundle, backend: str | None = None, providers: Sequence[str] | str | None = None,
                threads: int | None = None, *, spinning: bool = True) -> Runner:
    """The runner for ``backend`` (default: ONNX Runtime fp32 on the best provider available).

    An ONNX Runtime runner comes back active (its session made, its graph checked: a tampered
    model is refused here); a TensorRT runner loads its engine when activated.

    Raises:
        ConfigError: unknown backend; BundleError: the bundle has no such model;
        TamperedBundleError: the model is not what the manifest says;
        TensorRTUnavailableError: ``tensorrt`` without GPU.
    """
    key = model_key_for(bundle, backend)
    if bundle.models[key].get("runtime") == "tensorrt":
        try:
            return TrtRunner(bundle, key)
        except TensorRTUnavailableError as exc:
            raise TensorRTUnavailableError(exc.message, hint="run the bundle's ONNX model here (`transfer infer "
                                                            "BUNDLE ... --backend onnxruntime`); TensorRT engines "
                                                            "need an NVIDIA GPU and TensorRT") from None
    return bundle_runner(bundle, key, providers, threads, spinning=spinning)


__all__ = ["OrtRunner", "TrtRunner", "bundle_runner", "make_runner", "model_key_for"]
