"""The runner interface every backend follows (Polygraphy's shape) and the outputs it returns.

A runner owns what runs one model (an ONNX Runtime session, a TensorRT engine and its device
buffers, a Keras model) and has a lifecycle: :meth:`Runner.activate` acquires it,
:meth:`Runner.infer` runs one batch of pixels, :meth:`Runner.deactivate` releases it; ``with
runner:`` does both, and a runner used without ``with`` activates on its first
:meth:`~Runner.infer`. Every call checks the input (``(N, H, W, 3)`` pixels, RGB 0..255, at
the model's size), checks that every output has a row per image, and records its time
(:attr:`Runner.last_seconds`, :attr:`Runner.total_seconds`, :attr:`Runner.calls`).

:class:`Outputs` names what a model returns. Adding an output of the model contract (say a
``feature_map`` for class activation maps) is one field here with a ``None`` default: the
ONNX Runtime runner asks its session for every field the graph has.

Example::

    with make_runner(bundle, "onnxruntime") as runner:
        out = runner.infer(pixels)          # float32 or uint8 (N, H, W, 3)
        out.features, out.probs             # (N, D), (N, C)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, fields
from typing import Iterable

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class Outputs:
    """The named outputs of one batch, one row per image (the model contract's tensor names)."""

    features: np.ndarray
    probs: np.ndarray
    #: the last spatial feature map (N, h, w, K) of a bundle with class activation maps; fetched only
    #: when asked (:meth:`Runner.request`), so a run without maps pays nothing for it
    feature_map: np.ndarray | None = None

    #: outputs a runner fetches only when asked
    ON_REQUEST = ("feature_map",)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every output name (those without a default first: every model has them)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, named: dict) -> "Outputs":
        """Outputs from ``{name: array}`` (names that are not outputs are ignored)."""
        return cls(**{n: np.asarray(named[n]) for n in cls.names() if named.get(n) is not None})

    def arrays(self) -> dict[str, np.ndarray]:
        """``{name: array}`` of the outputs present."""
        return {n: getattr(self, n) for n in self.names() if getattr(self, n) is not None}

    def __len__(self) -> int:
        return len(self.probs)

    @classmethod
    def concat(cls, parts: Iterable["Outputs"]) -> "Outputs":
        """The outputs of consecutive batches as one (at least one part)."""
        parts = list(parts)
        if len(parts) == 1:
            return parts[0]
        return cls(**{n: np.concatenate([getattr(p, n) for p in parts]) for n in parts[0].arrays()})


class Runner:
    """The lifecycle, checks and timing every runner shares; a backend implements
    :meth:`_activate`, :meth:`_deactivate` and :meth:`_infer`.

    Attributes:
        name: what runs, as reports show it (``onnxruntime``, ``onnxruntime-int8``,
            ``tensorrt-fp16``, ``keras``).
        provider: where it runs (``CPUExecutionProvider``, ``TensorRT``, ``TensorFlow``).
        model_key: the bundle's model entry (``onnx-fp32``), or ``keras``.
        input_hw: the ``(H, W)`` the model takes (``None``: not known before activation).
    """

    def __init__(self, name: str, provider: str, model_key: str, input_hw: tuple[int, int] | None = None):
        self.name, self.provider, self.model_key = name, provider, model_key
        self.input_hw = tuple(input_hw) if input_hw is not None else None
        self.last_seconds = 0.0
        self.total_seconds = 0.0
        self.calls = 0
        self.requested: frozenset[str] = frozenset()
        self._active = False
        self._lifecycle = threading.RLock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r} on {self.provider!r}, {'active' if self._active else 'inactive'})"

    # -- the lifecycle ------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self._active

    def activate(self) -> "Runner":
        """Acquire what the model needs (idempotent); returns the runner."""
        with self._lifecycle:
            if not self._active:
                self._activate()
                self._active = True
        return self

    def deactivate(self) -> None:
        """Release it (idempotent); a later :meth:`infer` activates again."""
        with self._lifecycle:
            if not self._active:
                return
            self._active = False
            self._deactivate()

    close = deactivate

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.deactivate()
            return
        try:  # do not hide the error that is already propagating
            self.deactivate()
        except Exception:  # noqa: BLE001
            pass

    def request(self, *names: str) -> "Runner":
        """Also fetch these on-request outputs (:attr:`Outputs.ON_REQUEST`, e.g. ``feature_map``)
        from now on, when the model has them; returns the runner."""
        self.requested = self.requested | frozenset(n for n in names if n in Outputs.ON_REQUEST)
        return self

    # -- one batch ----------------------------------------------------------------------------

    def infer(self, x: np.ndarray) -> Outputs:
        """The outputs of one batch of pixels ``x`` (any batch size, an empty one too).

        Args:
            x: uint8 or floating point ``(N, H, W, 3)`` RGB 0..255 at the model's input size.

        Raises:
            ConfigError: ``x`` is not such an array; the backend's own errors (a failing
                CUDA call, for instance) as they are.
        """
        self.activate()
        x = self.check_input(x)
        if not len(x):
            return self._check_outputs(Outputs.of(self._empty()), 0)
        t = time.perf_counter()
        named = self._infer(x)
        self.last_seconds = time.perf_counter() - t
        self.total_seconds += self.last_seconds
        self.calls += 1
        return self._check_outputs(Outputs.of(named), len(x))

    def check_input(self, x) -> np.ndarray:
        """``x`` as contiguous float32, after checking its shape and dtype.

        Raises:
            ConfigError: naming the shape or dtype received and the one the model takes.
        """
        x = np.asarray(x)
        want = "(N, {}, {}, 3)".format(*self.input_hw) if self.input_hw else "(N, H, W, 3)"
        if x.ndim != 4 or x.shape[-1] != 3 or (self.input_hw is not None and tuple(x.shape[1:3]) != self.input_hw):
            raise ConfigError(f"{self.name} takes images of shape {want}; got {x.shape}")
        if x.dtype.kind not in "uif":
            raise ConfigError(f"{self.name} takes pixels as numbers 0..255 (uint8 or float32); got {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _check_outputs(self, out: Outputs, n: int) -> Outputs:
        bad = {k: v.shape for k, v in out.arrays().items() if v.ndim < 1 or len(v) != n}
        if bad:
            raise ConfigError(f"{self.name} returned outputs of shapes {bad} for {n} image(s)")
        return out

    # -- what a backend implements ------------------------------------------------------------

    def _activate(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _deactivate(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _infer(self, x: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        """``{output name: array}`` of contiguous float32 pixels ``x`` (at least one image; active)."""
        raise NotImplementedError

    def _empty(self) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        """``{output name: array with no rows}`` (active)."""
        raise NotImplementedError


def infer_batches(runner: Runner, x: np.ndarray, batch: int = 64) -> Outputs:
    """The outputs of ``runner`` over ``x`` in batches of ``batch`` (as one :class:`Outputs`)."""
    if not len(x):
        return runner.infer(x)
    return Outputs.concat(runner.infer(x[i:i + batch]) for i in range(0, len(x), batch))


__all__ = ["Outputs", "Runner", "infer_batches"]
