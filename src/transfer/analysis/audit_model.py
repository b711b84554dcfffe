"""The audit's models as ONNX, converted in a child process that alone imports TensorFlow (or, when
asked to, in a thread of this process: :class:`InProcess`).

``transfer data audit`` needs the pooled features of up to two models for every image: the
feature source (a trained trial's model, or a chosen backbone) and, with a run, the same trial's
network at its *initial* weights (``RUN/init/<backbone>-<init>.weights.h5``: the weights every
trial of that backbone started from, pretrained or random), whose features never saw the
audited labels (:mod:`transfer.analysis.audit_labels`). Running them through Keras in the
audit's own process costs twice: importing TensorFlow holds about 700 MB for the rest of the
audit (measured: 24 MB -> 704 MB resident on import; the whole 60,000-image audit peaked at
1.39 GB), and Keras's per-batch ``predict_on_batch`` of arc2 takes 5.7 s per 10,000
Fashion-MNIST images where ONNX Runtime on one thread takes 2.7 s. So a child process
(``python -m transfer.analysis.audit_model SPEC``) loads each model, converts it with
:func:`transfer.models.onnx_convert.export_onnx` (as ``transfer export`` does), decodes a few of the
audited images with the model's own loader (:func:`transfer.data.image.load_image` with the
run's recorded pixel recipe) and writes Keras's features and softmax of them; it runs while the
audit hashes the files. The audit then runs the ONNX graphs with ONNX Runtime and first compares
ONNX Runtime's features *of the pixels its own pass made* with Keras's of the loader's pixels
(:class:`transfer.analysis.audit._Engine`), so a difference in either the conversion or the
pixels shows.

The spec (JSON, one argument): ``"models"``: a list of ``{"name", "onnx", "reference"}`` plus
``{"run", "trial"}`` (``"initial": true`` for the trial's initial weights) or ``{"backbone",
"weights", "image_size"}``, and ``"convert": false`` for a model whose ONNX file the audit already
has (:mod:`transfer.analysis.audit_cache`: only Keras's reference is computed); ``"parity"``: image
paths; ``"size"``: (H, W) of the model input; ``"recipe"``: the pixel recipe (``null``: the current
one); ``"limit"``: parity images. ``reference`` is where a model's ``features``, ``probs``, the
``paths`` of the images they are of and those files' ``sha256`` go (``.npz``). For each model the
child prints one line, ``RESULT name {"dim": D, "classes": C}`` or, when it cannot be loaded or
converted, ``ERROR name message``.

Example::

    python -m transfer.analysis.audit_model '{"models": [{"name": "trained", "run": "runs/f",
        "trial": "best", "onnx": "/tmp/a/m.onnx", "reference": "/tmp/a/ref.npz"}],
        "parity": ["data/a/1.png"], "size": [28, 28], "recipe": null}'

A process that has imported TensorFlow already (a notebook, a test session) pays a second import
in the child (about 5-9 s of CPU and 700 MB). Asked to (``audit_engine.CONVERT_IN``), :class:`InProcess`
runs the same :func:`run_spec` in a thread of it instead: the same lines, files and fallbacks, with
the process-wide state the conversion changes put back after it (:class:`_SharedState`, and its limits).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
from collections.abc import Callable

import numpy as np

from .._lazy import import_quietly
from ..data.image import load_image
from ..errors import ImageDecodeError, RunFolderError, TransferError
from ..fsutil import sha256_file
from ..models.build import build_classifier
from ..models.onnx_convert import export_onnx, two_output_model
from .features import open_run, resolve_trial

_log = logging.getLogger(__name__)


def initial_weights_path(run, trial):
    """The initial weights ``trial`` of ``run`` started from (``RUN/init/<backbone>-<init>.weights.h5``).

    Raises:
        RunFolderError: the trial does not say its backbone and init, or the file is missing.
    """
    backbone, init = trial.meta.get("backbone"), trial.meta.get("init")
    if not backbone or not init:
        raise RunFolderError(f"trial '{trial.name}' does not record its backbone and init in trial.json")
    path = run.init_weights(backbone, init)
    if not path.is_file():
        raise RunFolderError(f"the initial weights of trial '{trial.name}' are missing: {path}",
                             hint="they are written by `transfer train` before the first trial of the backbone")
    return path


def load_source_model(spec: dict):
    """The contract classifier ``spec`` names: a run's trial (at its initial weights with
    ``"initial": true``), or ``backbone`` with ``weights`` at ``image_size``."""
    if spec.get("run") is not None:
        run = open_run(spec["run"])
        trial = resolve_trial(run, spec.get("trial", "best"))
        model = trial.load_model()
        if spec.get("initial"):
            model.load_weights(initial_weights_path(run, trial))
        return model

    side = int(spec["image_size"])
    model, _ = build_classifier(spec["backbone"], input_shape=(side, side, 3),
                                weights=spec.get("weights") or "imagenet", num_classes=2, seed=0)
    return model


def reference_pixels(paths, size, limit: int, *, recipe: dict | None) -> tuple[np.ndarray, list[str], list[str]]:
    """Up to ``limit`` of ``paths`` as the model's own loader makes them
    (:func:`transfer.data.image.load_image` at ``size`` with ``recipe``), the paths that
    decoded (files that do not decode are skipped) and their SHA-256 (what a kept reference is
    keyed by: taken here, beside the decode, so a file changed during the audit is not kept
    under its old content)."""

    out, used, digests = [], [], []
    for p in paths:
        try:
            digest = sha256_file(p)
            out.append(load_image(p, tuple(size), recipe=recipe))
        except (ImageDecodeError, OSError):
            continue
        used.append(str(p))
        digests.append(digest)
        if len(out) >= limit:
            break
    h, w = (int(v) for v in size)
    return (np.stack(out).astype(np.float32) if out else np.zeros((0, h, w, 3), np.float32)), used, digests


def convert(model_spec: dict, x: np.ndarray, used: list[str], digests: list[str]) -> dict:
    """Convert one model (unless its spec says ``"convert": false``) and write Keras's reference
    of ``x`` (see the module docstring); returns ``{"dim", "classes"}``."""
    model = load_source_model(model_spec)
    if model_spec.get("convert", True):
        export_onnx(model, model_spec["onnx"])
    two = two_output_model(model)
    if len(x):
        f, p = (np.asarray(a, np.float32) for a in two.predict_on_batch(x))
    else:
        f = np.zeros((0, int(two.outputs[0].shape[-1])), np.float32)
        p = np.zeros((0, int(two.outputs[1].shape[-1])), np.float32)
    np.savez(model_spec["reference"], features=f, probs=p, paths=np.array(used, dtype=str),
             sha256=np.array(digests, dtype=str))
    return {"dim": int(two.outputs[0].shape[-1]), "classes": int(two.outputs[1].shape[-1])}


def run_spec(spec: dict, emit: Callable[[str], None], cancelled: Callable[[], bool] = lambda: False) -> int:
    """Convert the models of ``spec`` (see the module docstring) and write their references; ``emit``
    gets each model's ``RESULT`` or ``ERROR`` line; ``cancelled`` is asked before each model (the
    audit stopped: the rest are skipped). Returns 0, or 1 when any model failed or was skipped."""
    try:
        x, used, digests = reference_pixels(spec.get("parity", []), spec["size"], int(spec.get("limit", 32)),
                                            recipe=spec.get("recipe"))
    except (TransferError, ValueError) as exc:  # ValueError: a recipe this runtime does not implement
        for m in spec["models"]:
            emit(f"ERROR {m['name']} " + str(getattr(exc, "message", exc)))
        return 1
    status = 0
    models = list(spec["models"])
    converting = [m for m in models if m.get("convert", True)]
    if converting:
        try:  # before TensorFlow loads a model: a missing or broken converter fails in a moment, not in 5 s
            import_quietly("tf2onnx", purpose="ONNX export")
        except Exception as exc:  # noqa: BLE001 -- a broken package may raise anything on import
            why = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            for m in converting:
                emit(f"ERROR {m['name']} {why}")
            models, status = [m for m in models if not m.get("convert", True)], 1
    for m in models:
        if cancelled():
            emit(f"ERROR {m['name']} the audit stopped before this model was converted")
            status = 1
            continue
        try:
            res = convert(m, x, used, digests)
        except TransferError as exc:
            emit(f"ERROR {m['name']} " + exc.message)
            status = 1
            continue
        except Exception as exc:  # noqa: BLE001 -- tf2onnx raises its own kinds; the audit falls back to Keras
            emit(f"ERROR {m['name']} {type(exc).__name__}: " + " ".join(str(exc).split())[:300])
            status = 1
            continue
        emit(f"RESULT {m['name']} " + json.dumps(res))
    return status


def main(argv: list[str]) -> int:
    return run_spec(json.loads(argv[0]), lambda line: print(line, flush=True))


def _eager_context():
    """TensorFlow's eager context, when it keeps its global seed where :class:`InProcess` can put it
    back (the attributes ``_seed`` and, once a seed is set, ``_rng``: what ``tf.random.set_seed``
    sets); else None."""
    tf_context = sys.modules.get("tensorflow.python.eager.context")
    ctx = tf_context.context() if tf_context is not None else None
    return ctx if ctx is not None and hasattr(ctx, "_seed") and hasattr(ctx, "__dict__") else None


def in_process_blocker(*, loaded: bool) -> str | None:
    """Why this process should not convert in a thread (None: it may). ``loaded``: only if TensorFlow
    is imported here already. A Keras ``floatx`` or image data format other than the defaults would
    build another model than the child (and the conversion cache's key does not hold them)."""
    if "tensorflow" not in sys.modules:
        return "TensorFlow is not loaded in this process" if loaded else None
    if _eager_context() is None:
        return "this TensorFlow keeps its global seed elsewhere"
    keras = sys.modules.get("keras")
    if keras is not None:
        config = keras.config
        if config.floatx() != "float32" or config.image_data_format() != "channels_last":
            return (f"Keras is set to floatx {config.floatx()} / {config.image_data_format()} here; the audit's "
                    "models are built with the defaults")
    return None


#: environment variables the conversion may set in the process (tf2onnx sets TF_CPP_MIN_LOG_LEVEL on import)
_ENV_KEPT = ("TF_CPP_MIN_LOG_LEVEL", "KERAS_BACKEND")


class _SharedState:
    """What a conversion in this process changes for the whole process and :class:`InProcess` puts
    back: Python's, NumPy's and TensorFlow's global random state (building a backbone with a seed calls
    ``keras.utils.set_random_seed``; Keras's own global state is per thread already) and
    :data:`_ENV_KEPT`. Taken and put back by the caller's thread, around the conversion. It cannot
    undo what ``tf.random.set_seed`` also does -- reset the counters of op-seeded random kernels -- nor
    isolate other threads of the process that draw random numbers meanwhile."""

    def __init__(self):
        self.ctx = _eager_context()
        self.py, self.np = random.getstate(), np.random.get_state()
        # TensorFlow not imported yet: it is put back as it starts, with no seed set
        self.tf = ({k: v for k, v in vars(self.ctx).items() if k in ("_seed", "_rng")} if self.ctx is not None
                   else {"_seed": None})
        self.env = {k: os.environ.get(k) for k in _ENV_KEPT}

    def restore(self) -> None:
        random.setstate(self.py)
        np.random.set_state(self.np)
        ctx = self.ctx if self.ctx is not None else _eager_context()
        if ctx is not None:
            for k in ("_seed", "_rng"):
                if k in self.tf:
                    setattr(ctx, k, self.tf[k])
                else:
                    vars(ctx).pop(k, None)
        for k, v in self.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class InProcess:
    """:func:`run_spec` in a thread of this process, answering as the child's ``Popen`` does
    (``poll``, ``communicate``, ``kill``, ``returncode``), so the audit treats both alike.

    For a process that may convert in a thread (:func:`in_process_blocker`). The shared state it
    changes (:class:`_SharedState`) is put back by ``communicate``, in the caller's thread. A thread
    cannot be stopped: ``kill`` asks it to skip the models it has not started, and ``communicate``
    waits for the one it is converting.
    """

    def __init__(self, spec: dict):
        self._shared: _SharedState | None = _SharedState()  # before the import below, which sets the log level
        if "tensorflow" not in sys.modules:  # asked for without it (``CONVERT_IN``): import it here, not
            try:                              # in the thread, whose quiet import would silence fd 2 for all
                import_quietly("tensorflow", purpose="ONNX export")
            except Exception as exc:  # noqa: BLE001 -- the thread meets the same error and says it per model
                _log.debug("TensorFlow import before the conversion thread failed: %s", exc)
        self.returncode: int | None = None
        self._lines: list[str] = []
        self._error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(spec,), name="transfer-audit-convert", daemon=True)
        self._thread.start()

    def _run(self, spec: dict) -> None:
        try:
            self.returncode = run_spec(spec, self._lines.append, self._stop.is_set)
        except BaseException as exc:  # noqa: BLE001 -- said as a child's last stderr line would be
            self._error = f"{type(exc).__name__}: {exc}"
            self.returncode = 1

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else self.returncode

    def communicate(self) -> tuple[str, str]:
        self._thread.join()
        if self._shared is not None:
            self._shared.restore()
            self._shared = None
        return "\n".join(self._lines), self._error

    def kill(self) -> None:
        """Skip the models not started yet (the one being converted finishes: see ``communicate``)."""
        self._stop.set()


__all__ = ["InProcess", "convert", "in_process_blocker", "initial_weights_path", "load_source_model", "main",
           "reference_pixels", "run_spec"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
