"""The source run's Keras model behind the runtime's runner interface (needs TensorFlow).

Export verification compares ONNX Runtime against it, and ``transfer bench --backends keras``
times it beside the runtime's backends. It lives here, not in ``transfer.runtime``: the
runtime never imports TensorFlow; the bench command hands this runner to the runtime's
benchmark as an extra backend.
"""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle
from ..errors import TransferError
from ..runtime.runners import Runner


class KerasRunner(Runner):
    """``run(x) -> (features, probs)`` of a contract Keras model (``model.predict``, one batch per call)."""

    def __init__(self, model, name: str = "keras"):
        from .onnx import two_output_model

        self.model = two_output_model(model)
        super().__init__(name=name, provider="TensorFlow", model_key="keras")

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, p = self.model.predict(np.asarray(x, dtype=np.float32), batch_size=max(1, len(x)), verbose=0)
        return np.asarray(f), np.asarray(p)


def keras_runner_for(bundle: Bundle) -> KerasRunner:
    """The Keras model a bundle was exported from, found through its manifest's ``source``.

    Raises:
        TransferError: the source run or trial is not on this machine, or TensorFlow is missing
            (the message says which; ``transfer bench`` lists it as a skipped backend).
    """
    from ..runfolder import RunFolder

    src = bundle.manifest.get("source") or {}
    run, trial = src.get("run"), src.get("trial")
    if not run or not trial:
        raise TransferError(f"bundle {bundle.path} does not name the run it was exported from")
    try:
        t = RunFolder(run).trial(str(trial))
    except TransferError as exc:
        raise TransferError(f"the source model is not on this machine ({exc.message})") from None
    try:
        return KerasRunner(t.load_model())
    except ImportError as exc:
        raise TransferError(f"TensorFlow is not installed ({exc})") from None
