"""The source run's Keras model behind the runner interface (needs TensorFlow).

Export verification runs it as the reference of the ONNX model, and ``transfer bench
--backends keras`` times it beside the runtime's backends. It lives here, not in
``transfer.runtime``: the runtime never imports TensorFlow; the bench command hands this
runner to the runtime's benchmark as an extra backend.
"""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle
from ..errors import TransferError
from ..runfolder import RunFolder
from ..runtime.runner_base import Runner
from ..models.onnx_convert import two_output_model


class KerasRunner(Runner):
    """A contract Keras model (input ``image``; layers ``features`` and ``probs``) run by
    ``model.predict``.

    Args:
        model: the trial's ``model.keras`` as loaded (one output, ``probs``).
        batch_size: ``predict``'s batch size (``None``: the whole call in one batch, as
            ``transfer bench`` times it; export verification runs 32 at a time).

    Example::

        with KerasRunner(model, batch_size=32) as r:
            probs = r.infer(x).probs
    """

    def __init__(self, model, name: str = "keras", *, batch_size: int | None = None):
        self.source = model
        self.batch_size = batch_size
        self.model = None
        hw = tuple(int(d) for d in model.input_shape[1:3]) if None not in model.input_shape[1:3] else None
        super().__init__(name=name, provider="TensorFlow", model_key="keras", input_hw=hw)

    def _activate(self) -> None:
        self.model = two_output_model(self.source)  # features and probs of one forward pass

    def _deactivate(self) -> None:
        self.model = None

    def _infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        f, p = self.model.predict(x, batch_size=self.batch_size or max(1, len(x)), verbose=0)
        return {"features": np.asarray(f), "probs": np.asarray(p)}

    def _empty(self) -> dict[str, np.ndarray]:
        return {"features": np.zeros((0, int(self.model.outputs[0].shape[-1])), np.float32),
                "probs": np.zeros((0, int(self.model.outputs[1].shape[-1])), np.float32)}


def keras_runner_for(bundle: Bundle) -> KerasRunner:
    """The Keras model a bundle was exported from, found through its manifest's ``source``.

    Raises:
        TransferError: the source run or trial is not on this machine, or TensorFlow is missing
            (the message says which; ``transfer bench`` lists it as a skipped backend).
    """

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
