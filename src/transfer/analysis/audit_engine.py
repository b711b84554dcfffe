"""The models whose features the audit uses, and the engine that runs them.

:func:`feature_source` names the models without loading them -- a run's trained trial (and the
same trial's network at its initial weights, and with a k-fold run the fold models' softmax), or
a chosen backbone -- as a :class:`FeatureSource`. :class:`FeatureEngine` has a child process
convert them to ONNX (:mod:`transfer.analysis.audit_model`; only that process imports
TensorFlow; or, asked to, a thread of this process: :data:`CONVERT_IN`), runs them in ONNX
Runtime, and checks them against Keras on the pass's first images
(:class:`~transfer.analysis.audit_pass.Parity`); a model that fails the check runs in Keras,
and the audit says why.

Example::

    src = feature_source("runs/fashion", "best", None, None, None)   # a run's best trial
    engine = FeatureEngine(src, Path(tmp), parity, threads=ORT_THREADS, p=as_progress(None))
    engine.run(x)      # {"source": features, "initial": features}
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.image import recipe_version
from ..errors import ConfigError, RunFolderError, TransferError
from ..fsutil import sha256_file
from ..models.onnx_convert import two_output_model
from ..models.registry import get_backbone
from ..options import OneOf, OptionSpec, check
from ..runtime.sessions import make_session
from .audit_cache import CacheEntry
from .audit_model import (
    InProcess,
    in_process_blocker,
    initial_weights_path,
    load_source_model,
)
from .audit_pass import Parity
from .features import open_run, resolve_trial

_log = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: largest difference between ONNX Runtime's and Keras's features allowed, relative to their largest magnitude
PARITY_TOLERANCE = 1e-4
#: ONNX Runtime threads of the forward pass (the decoding threads run beside it)
ORT_THREADS = 1
#: the outputs of a contract model an audit model gives (by index)
OUTPUTS = ("features", "probs")
#: where the models are converted: ``"child"`` (the default: the audit's process never imports
#: TensorFlow, nothing it does reaches the caller); ``"process"`` -- a thread of this process
#: (:class:`~transfer.analysis.audit_model.InProcess`: no second TensorFlow import, about 5-9 s of
#: CPU less, but it shares the process: see its limits), importing TensorFlow if needed; ``"auto"`` --
#: that thread only when TensorFlow is loaded here already. Either falls back to the child when
#: :func:`~transfer.analysis.audit_model.in_process_blocker` says why not.
CONVERT_IN = "child"
#: the values of :data:`CONVERT_IN`
CONVERT_CHOICES = ("child", "process", "auto")
_CONVERT_SPEC = OptionSpec(OneOf(*CONVERT_CHOICES), "where the audit converts its models to ONNX")
#: how ``audit.json`` (``feature_engine``) names where a conversion or reference was made
ORIGIN = {"child": "child process", "process": "in process"}


@dataclass
class FeatureSource:
    """The models whose features the audit uses (contract classifiers, ``image -> features ->
    probs``, each named by a spec for :func:`transfer.analysis.audit_model.load_source_model`):
    ``models[0]`` (``source``) is the trained trial's or the backbone's, ``initial`` (with a
    run) the trial's network at its initial weights. Also: their input size and pixel recipe,
    how to name them, the paths (relative to the data root) the trial trained on (``None``
    without a run) and notes for the user."""

    models: list
    size: tuple[int, int]
    recipe: dict | None
    describe: dict
    fit: frozenset | None = None
    notes: list = field(default_factory=list)
    #: a k-fold run: each image's held-out fold model (path -> model name), the models, the run's classes
    folds: dict | None = None


def feature_source(run, trial: str, backbone: str | None, weights: str | None,
                   image_size: int | None) -> FeatureSource:
    """The feature sources, checked without loading a model (that happens in the child process)."""
    if run is not None:

        run = open_run(run)
        t = resolve_trial(run, trial).require_finished()
        path = str(run.path.resolve())
        recipe = run.recipe
        try:
            version = recipe_version(recipe)
        except ValueError as exc:
            raise RunFolderError(f"the run's pixel recipe (dataset.json) is not one this version implements: {exc}",
                                 hint="audit with the transfer version that trained the run") from exc
        models = [{"name": "source", "run": path, "trial": t.name}]
        desc = {"run": path, "trial": t.name, "model_sha256": sha256_file(t.model_path), "recipe": version}
        notes = []
        try:
            init = initial_weights_path(run, t)
        except RunFolderError as exc:
            notes.append(f"label issues of the images trial {t.name} trained on: {exc.message}; they are judged by "
                         "their pixels alone")
        else:
            models.append({"name": "initial", "run": path, "trial": t.name, "initial": True})
            desc["initial_sha256"] = sha256_file(init)
        fit = frozenset(rel for rel, _ in run.split("train", fold=t.fold))
        folds = _fold_models(run, t, notes)
        if folds is not None:
            models += [{"name": name, "run": path, "trial": trial_name, "output": "probs"}
                       for name, trial_name in folds["trials"].items()]
            desc["fold_trials"] = sorted(folds["trials"].values())
        return FeatureSource(models, t.image_size, recipe, desc, fit, notes, folds)
    if backbone is None:
        raise ConfigError("the audit needs features: give a run (and trial) or a backbone and its weights",
                          option="run")

    spec = get_backbone(backbone)
    side = int(image_size or spec.default_size)
    w = str(weights or "imagenet")
    desc = {"backbone": backbone, "weights": w, "image_size": side}
    if Path(w).is_file():
        desc["weights_sha256"] = sha256_file(w)
    # a chosen backbone is not tied to a run: today's pixel recipe, as `transfer train` would use
    return FeatureSource([{"name": "source", "backbone": backbone,
                           "weights": None if weights is None else str(weights), "image_size": side}],
                         (side, side), None, desc)


def _fold_models(run, t, notes: list) -> dict | None:
    """With a k-fold run (``transfer train --kfold K``): the fold trials of ``t``'s group, one per
    fold, and for each image of a fold's val split the model that did not train on it --
    ``{"trials": {name: trial}, "held_out": {path: name}, "classes": [...]}``; ``None`` otherwise
    (with a note when the folds are not all finished)."""
    if not t.fold:
        return None
    k = int(run.config().get("kfold") or 0)
    mine = {x.fold: x for x in run.finished_trials() if x.meta.get("group") == t.meta.get("group") and x.fold}
    if k < 2 or sorted(mine) != list(range(1, k + 1)):
        notes.append(f"label issues: {len(mine)} of the {k} fold trials of {t.meta.get('group')} are finished; the "
                     "k-fold models are used once all are")
        return None
    trials = {f"fold{f}": mine[f].name for f in sorted(mine)}
    held_out = {rel: f"fold{f}" for f in sorted(mine) for rel, _ in run.split("val", fold=f)}
    return {"trials": trials, "held_out": held_out, "classes": run.class_names}


class FeatureEngine:
    """Runs the audit's models on batches: ``run(x) -> {name: features}``.

    A child process converts the models to ONNX (:mod:`transfer.analysis.audit_model`; only it
    imports TensorFlow; or, asked to, a thread of this process: :data:`CONVERT_IN`) while the audit
    reads the files; :meth:`ready` waits for it, opens an ONNX Runtime session per model on ``threads`` threads (it releases the GIL: the decoding
    threads keep working beside it) and compares each session's features of the pass's own
    pixels of the first audited images (``parity.x``) with Keras's features of the same images as
    the model's loader decodes them (:data:`~transfer.analysis.audit_pass.PARITY_IMAGES`): a
    difference in the conversion or in the pixels shows. A difference above :data:`PARITY_TOLERANCE`
    of their largest magnitude, or a model the child could not convert, falls back to Keras in
    this process for that model,
    saying why (a model that cannot be loaded at all then raises its error here). ``describe``
    records, per model, which ran and the measured difference (``audit.json``: ``feature_engine``).

    A model converted by an earlier audit, with Keras's reference of the same parity images
    (``digests``: their SHA-256, in order; hashed here when not given), comes from the cache
    (:mod:`transfer.analysis.audit_cache`, checked before use) and needs no child; what the child
    makes is kept there. ``describe`` says where each came from (``conversion``,
    ``keras_reference``: ``cache``, ``child process`` or ``in process``) and the model's ``cache`` folder.
    """

    def __init__(self, src: FeatureSource, folder: Path, parity: Parity, *, threads: int, p,
                 digests: list[str] | None = None):
        import json
        import subprocess
        import sys

        convert_in = check("audit_engine.CONVERT_IN", CONVERT_IN, _CONVERT_SPEC)
        self.src, self.p, self.threads, self.parity = src, p, threads, parity
        self.names = [m["name"] for m in src.models]
        self.outputs = {m["name"]: OUTPUTS.index(m.get("output", "features")) for m in src.models}
        self.folder = folder
        self.sessions: dict = {}
        self.keras: dict = {}
        self.dims: dict[str, int] = {}
        self.done, self.waited = False, 0.0
        self.describe: dict = {}
        self.spec = {"models": [{**m, "onnx": str(folder / f"{m['name']}.onnx"),
                                 "reference": str(folder / f"{m['name']}.npz")} for m in src.models],
                     "parity": [str(x) for x in parity.paths], "size": list(src.size), "limit": len(parity.paths),
                     "recipe": src.recipe}
        #: per model: {"dim", "classes"} and Keras's reference of the parity images, and where each came from
        self.results: dict[str, dict] = {}
        self.refs: dict[str, dict] = {}
        self.entries = self._cache_entries(digests)
        self.origin = {name: {"cache": str(entry.folder)} for name, entry in self.entries.items()}
        todo = [spec for spec in self.spec["models"] if not self._from_cache(spec)]
        self.child = None
        self.where = "cache"
        if not todo:
            p.say(f"audit: the model{'s' if len(self.names) > 1 else ''} as ONNX and Keras's features of the first "
                  f"images from the cache ({self.entries[self.names[0]].folder.parent})")
            return
        self.where, how = "child", "child process"
        if convert_in != "child":
            why_not = in_process_blocker(loaded=convert_in == "auto")
            if why_not is None:
                self.where, how = "process", "in this process"
            else:
                how = f"child process: {why_not}"
        converting = [m["name"] for m in todo if m.get("convert", True)]
        p.say(f"audit: converting the model{'s' if len(converting) > 1 else ''} to ONNX ({how})" if converting
              else f"audit: Keras's features of the first images ({how}; the ONNX conversion is cached)")
        spec = {**self.spec, "models": todo}
        if self.where == "process":
            self.child = InProcess(spec)
            return
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parents[2])  # the folder holding this ``transfer`` package
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self.child = subprocess.Popen([sys.executable, "-m", "transfer.analysis.audit_model", json.dumps(spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def _cache_entries(self, digests: list[str] | None) -> dict[str, CacheEntry]:
        """Each model's cache entry (none when a model's files cannot be read: the child says why)."""
        if digests is None:
            try:
                digests = [sha256_file(q) for q in self.parity.paths]
            except OSError:
                return {}
        if len(digests) != len(self.parity.paths) or not all(_SHA256.fullmatch(str(d)) for d in digests):
            return {}  # a parity image that could not be hashed: nothing to key its reference by
        try:
            return {m["name"]: CacheEntry.of(m, digests, self.src.size, self.src.recipe) for m in self.src.models}
        except (TransferError, OSError) as exc:
            _log.info("audit cache not used: %s", exc)
            return {}

    def _from_cache(self, spec: dict) -> bool:
        """Take ``spec``'s model from the cache: True when both its conversion and Keras's reference
        are there; with only the conversion, the child is told not to convert (``"convert": false``)."""
        name, entry = spec["name"], self.entries.get(spec["name"])
        if entry is None:
            return False
        info, why = entry.conversion(Path(spec["onnx"]))
        if why:
            self.p.say(f"audit: the cached ONNX conversion of {name} is not used ({why}); converting again")
        if info is None:
            return False
        spec["convert"] = False
        self.origin[name]["conversion"] = "cache"
        ref, why = entry.reference()
        if why:
            self.p.say(f"audit: the cached Keras features of {name} are not used ({why}); computing them again")
        if ref is None:
            return False
        self.results[name] = info
        self.refs[name] = {**ref, "paths": [str(q) for q in self.parity.paths]}
        self.origin[name]["keras_reference"] = "cache"
        return True

    def ready(self, wait: bool = True) -> bool:
        """Whether the models can run: with ``wait``, waits for the conversion (the seconds waited
        add to ``waited``); then opens the ONNX Runtime sessions (parity-checked) or Keras."""
        if self.done:
            return True
        if not wait and self.child is not None and self.child.poll() is None:
            return False
        t = time.perf_counter()
        self._open()
        self.done = True
        self.waited += time.perf_counter() - t
        return True

    def _open(self) -> None:
        lines, tail = [], []
        if self.child is not None:
            out, err = self.child.communicate()
            lines = out.splitlines()
            tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:]
        for m in self.src.models:
            name = m["name"]
            if name not in self.results:
                result = [ln.split(" ", 2)[2] for ln in lines if ln.startswith(f"RESULT {name} ")]
                if not result:
                    said = [ln.split(" ", 2)[2] for ln in lines if ln.startswith(f"ERROR {name} ")]
                    self._keras_because(m, "the model was not converted to ONNX ("
                                        + ((said or tail or [f"exit status {self.child.returncode}"])[0]) + ")")
                    continue
                self._child_result(name, result[0])
            res = self.results[name]
            self.dims[name] = int(res["classes"] if m.get("output") == "probs" else res["dim"])
            spec = self.spec["models"][self.names.index(name)]
            try:
                self.sessions[name], _ = make_session(spec["onnx"], "cpu", threads=self.threads)
            except Exception as exc:  # noqa: BLE001 -- ONNX Runtime raises its own kinds; Keras still runs the model
                self._keras_because(m, f"ONNX Runtime cannot open the converted model ({type(exc).__name__}: {exc})")
                continue
            entry = self.entries.get(name)
            if entry is not None and self.origin[name].get("conversion") != "cache":
                entry.store_conversion(Path(spec["onnx"]), res)
            self._check(m)

    def _child_result(self, name: str, line: str) -> None:
        """The child's ``RESULT`` of model ``name`` and its Keras reference (kept in the cache when
        it is of the very files the reference is keyed by)."""
        import json

        spec = self.spec["models"][self.names.index(name)]
        self.results[name] = json.loads(line)
        with np.load(spec["reference"]) as z:
            ref = {k: np.asarray(z[k], np.float32) for k in OUTPUTS}
            ref["paths"], digests = [str(q) for q in z["paths"]], [str(q) for q in z["sha256"]]
        self.refs[name] = ref
        origin = self.origin.setdefault(name, {})
        origin.setdefault("conversion", ORIGIN[self.where])
        origin["keras_reference"] = ORIGIN[self.where]
        entry = self.entries.get(name)
        if entry is not None and digests == entry.images:
            entry.store_reference(ref["features"], ref["probs"])

    def _check(self, m: dict) -> None:
        """ONNX Runtime's features of the pass's pixels against Keras's of the loader's pixels."""
        name = m["name"]
        ref = self.refs[name]
        k = len(ref["features"])
        same_images = ref["paths"] == [str(q) for q in self.parity.paths]
        out = OUTPUTS[self.outputs[name]]
        if not same_images:
            self.describe[name] = {"parity_images": 0, **self.origin.get(name, {})}
            return self._keras_because(m, "the conversion checked other images than the pass's first ones")
        diff, scale = 0.0, 1.0
        if k:
            f = self.sessions[name].run([out], {"image": self.parity.x})[0]
            diff = float(np.abs(f - ref[out]).max())
            scale = float(max(np.abs(ref[out]).max(), 1e-6))
        self.describe[name] = {"engine": "onnxruntime", "threads": self.threads, "parity_images": k,
                               "parity_max_abs_diff": diff, "parity_relative": diff / scale, **self.origin.get(name, {})}
        if diff > PARITY_TOLERANCE * scale:
            self._keras_because(m, f"ONNX Runtime's {out} of the audit's pixels differ from Keras's of the model "
                                   f"loader's pixels by {diff:.3g} (largest magnitude {scale:.3g}) on {k} of the "
                                   f"audited images")

    def _keras_because(self, m: dict, why: str) -> None:

        name = m["name"]
        self.sessions.pop(name, None)
        parity = {k: v for k, v in self.describe.get(name, {}).items()
                  if k.startswith("parity") or k in ("conversion", "keras_reference", "cache")}
        self.describe[name] = {"engine": "keras", "why": why, **parity}
        self.p.say(f"audit: {name} features by Keras: {why}")
        self.keras[name] = two_output_model(load_source_model(m))
        self.dims[name] = int(self.keras[name].outputs[self.outputs[name]].shape[-1])

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Each model's features (its softmax for a model whose spec says ``"output": "probs"``)."""
        out = {}
        for name in self.names:
            if name in self.sessions:
                out[name] = np.asarray(self.sessions[name].run([OUTPUTS[self.outputs[name]]], {"image": x})[0])
            else:
                out[name] = np.asarray(self.keras[name].predict_on_batch(x)[self.outputs[name]])
        return out

    def release(self) -> None:
        """Free the models (the pass is over)."""
        self.sessions, self.keras = {}, {}

    def close(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.communicate()


__all__ = ["CONVERT_CHOICES", "CONVERT_IN", "ORIGIN", "ORT_THREADS", "OUTPUTS", "PARITY_TOLERANCE", "FeatureEngine",
           "FeatureSource", "feature_source"]
