"""The options of prediction, declared once (:mod:`transfer.options`): what runs a bundle
(:class:`ModelOptions`), which bundles are trusted (:class:`TrustOptions`) and ``transfer
infer``'s own (:class:`InferConfig`). ``transfer serve``'s :class:`~transfer.serve.serve_config.ServeConfig`
holds the same two groups, so the flags, their checks and their wording are the same in both
commands.

Light imports only: the command line imports this module when it starts.

Example::

    cfg = make(InferConfig, {"head": "rf", "batch": 16})
    cfg.model.head, cfg.batch            # ('rf', 16)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any, Mapping

from ..data.image import is_image_path
from ..errors import ConfigError
from ..options import Check, Flag, Interval, ListOf, OneOf, Text, check, group, make, option, specs, to_dict, validate
from ..unknown_scores import SCORES

#: what ``--backend`` accepts: ONNX Runtime on the bundle's fp32 / int8 / fp16 model, or a TensorRT engine
#: (``tensorrt``: the bundle's first engine)
BACKENDS = ("onnxruntime", "onnxruntime-fp32", "onnxruntime-int8", "onnxruntime-fp16", "tensorrt", "tensorrt-fp32",
            "tensorrt-fp16", "tensorrt-int8")
HEAD_FORMATS = ("onnx", "pickle")


def _provider_list(value) -> bool:
    items = value.split(",") if isinstance(value, str) else list(value)
    return bool(items) and all(isinstance(p, str) and p.strip() for p in items)


#: ``--providers``: ONNX Runtime execution providers in order (whether this build offers them is
#: checked when a session is made: a Ray worker may offer providers its driver lacks)
PROVIDERS = Check(_provider_list, "a comma list of execution providers in order (cpu, cuda, tensorrt), "
                                  "no empty name")


#: row files by suffix; any other output is written in the asked format (default csv)
ROW_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def is_folder(out: str) -> bool:
    """An output that names a folder: written with a slash at the end, or an existing directory."""
    return out.endswith(("/", os.sep)) or os.path.isdir(out)


def _rows_target(out) -> bool:
    """Not a file rows would destroy: an image or a Parquet file would be overwritten with CSV / JSON lines."""
    return isinstance(out, str) and bool(out.strip()) and (
        out == "-" or is_folder(out) or not (is_image_path(out) or out.lower().endswith(".parquet")))


#: ``--out``: where rows go
OUT = Check(_rows_target, "a .csv or .jsonl file, a FOLDER/, or - for standard output (not an image or a Parquet "
                          "file: it would be overwritten)", read=os.fspath)


def refuse(name: str, value, accepted: str, *, hint: str | None = None) -> ConfigError:
    """The error of a value a rule between options refuses, in :func:`transfer.options.check`'s words."""
    return ConfigError(f"invalid {name}: {value!r}; accepted: {accepted}", option=name, hint=hint)


def trust_field():
    """The ``--trust`` option (one declaration; ``transfer bench`` and ``verify`` take it alone)."""
    return option(None, ListOf(Text("a public key file or folder of them"), min_items=0),
                  "Trusted public key (KEY.pub) or folder of them; repeatable. Only bundles signed by a trusted key "
                  "load. [default: $TRANSFER_TRUST, else no signature required]", none=True, repeat=True,
                  metavar="PATH")


@dataclass(frozen=True)
class ModelOptions:
    """What runs a bundle: its model for ``backend`` on ``providers`` with ``threads``, a
    ``head``, and whether images the bundle's unknown-input score rejects are answered
    ``unknown`` (``reject``; ``unknown_score``: which score, default the bundle's).

    Example::

        ModelOptions(backend="onnxruntime-int8", head="rf").reject_rule    # False
    """

    backend: str = option("onnxruntime", OneOf(*BACKENDS), "onnxruntime, onnxruntime-int8, "
                          "onnxruntime-fp16, tensorrt[-fp32|-fp16|-int8].", metavar="NAME")
    providers: str | None = option(None, PROVIDERS, "ONNX Runtime providers in order: cpu, cuda, tensorrt. "
                                   "[default: best available]", none=True)
    threads: int | None = option(None, Interval(int, 1), "ONNX Runtime intra-op threads (per worker with --ray). "
                                 "[default: the physical cores this process may use, less one left to decoding "
                                 "and HTTP; 1 per Ray inference worker]", none=True)
    head: str = option("network", Text("network, or the name of a bundled classical head"),
                       "network, or a bundled classical head (e.g. rf).")
    head_format: str = option("onnx", OneOf(*HEAD_FORMATS), "Run the classical head as ONNX (no scikit-learn "
                              "needed) or as its verified pickle.")
    reject: bool = option(False, Flag(), "Answer 'unknown' for images the bundle's unknown-input score rejects "
                          "(a calibrated bundle: the export default; the rule and score go in every answer).")
    unknown_score: str | None = option(None, OneOf(*SCORES), "Score --reject uses, one the bundle offers: msp, "
                                       "energy, mahalanobis, knn or vim (its manifest's unknown.scores). [default: "
                                       "the bundle's, chosen at export without test images]", none=True,
                                       metavar="NAME")

    def __post_init__(self) -> None:
        validate(self)
        if self.unknown_score is not None and not self.reject:
            raise refuse("unknown_score", self.unknown_score, "a score only together with reject",
                         hint="add --reject (the score decides which images are answered 'unknown')")

    @property
    def reject_rule(self) -> bool | str:
        """``False`` (no rejecting), ``True`` (the bundle's default score) or the score's name."""
        return (self.unknown_score or True) if self.reject else False


@dataclass(frozen=True)
class TrustOptions:
    """Which bundles load: ``trust`` public keys (``None``: ``TRANSFER_TRUST``; ``()``: no
    signature required, e.g. when a Ray driver checked it already), and whether a pickled
    head of a bundle that no trusted key signed may be unpickled (``trust_pickle``)."""

    trust: tuple[str, ...] | None = trust_field()
    trust_pickle: bool = option(False, Flag(), "Allow unpickling a classical head from a bundle that is not signed "
                                "by a trusted key (a pickle runs code: only for bundles whose origin you know).")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def store(self):
        """``trust=`` of :func:`transfer.bundle.load_bundle`: the keys, ``None`` (the environment
        decides) or ``False`` (no signature required whatever the environment says)."""
        if self.trust is None:
            return None
        return list(self.trust) or False


@dataclass(frozen=True)
class InferConfig:
    """Every option of ``transfer infer`` (and of :func:`transfer.runtime.infer.infer` /
    :func:`~transfer.runtime.ray_infer.infer_ray`): where rows go, batching, Ray, and the
    model and trust groups shared with ``transfer serve``."""

    out: str | None = option(None, OUT,
                             "Output file, or a folder (FOLDER/ or an existing one) for predictions.csv|jsonl there; "
                             "'-' for stdout. [default: stdout]", none=True, metavar="PATH")
    fmt: str | None = option(None, OneOf("csv", "jsonl"), "Row format. [default: from the --out suffix (.jsonl -> "
                             "jsonl), else csv]", none=True, flag="--format")
    recursive: bool = option(False, Flag(), "Walk sub-folders of folder inputs.", flag=("--recursive", "-r"))
    batch: int = option(32, Interval(int, 1), "Images per model call.")
    topk: int = option(1, Interval(int, 1), "Classes per row.")
    workers: int = option(2, Interval(int, 1), "Decode threads (with --ray: inference actors).")
    strict: bool = option(False, Flag(), "Exit 1 if any file failed.")
    ray: bool = option(False, Flag(), "Run on Ray Data: an actor pool of --workers sessions (needs --out; also "
                       "writes OUT.parquet; --threads per worker, default 1).")
    address: str | None = option(None, Text("a Ray cluster's HOST:PORT"), "Ray cluster to join with --ray. "
                                 "[default: a local Ray]", none=True, metavar="HOST:PORT")
    gpus_per_worker: float = option(0.0, Interval(float, 0), "GPUs each Ray inference worker reserves (with --ray; "
                                    "e.g. 1, or 0.5 to share one).")
    cam: str | None = option(None, Text("a folder for the maps"), "Also write a class activation map per image "
                             "into this folder: <k>_<stem>.npy (the map, H x W in [0, 1]), an overlay (see "
                             "--cam-overlay) and maps.csv; the network head's map of the predicted class (or --cam-class). Needs a "
                             "bundle exported with maps.", none=True, metavar="FOLDER")
    cam_class: str | None = option(None, Text("a class name or index"), "Class the maps explain (name or index). "
                                   "[default: each image's predicted class]", none=True, metavar="CLASS")
    cam_overlay: str = option("jpg", OneOf("jpg", "png", "none"), "The overlay written beside each map: jpg "
                              "(quality 90, 4:4:4), png (lossless, about 3x the time) or none (maps only).")
    model: ModelOptions = group(ModelOptions)
    security: TrustOptions = group(TrustOptions)

    def __post_init__(self) -> None:
        validate(self)
        for name, unset in (("cam_class", None), ("cam_overlay", "jpg")):
            if getattr(self, name) != unset and self.cam is None:
                raise refuse(name, getattr(self, name), "a value only together with cam",
                             hint="add --cam FOLDER (the maps are written there)")
        if self.cam is not None and self.ray:
            raise refuse("cam", self.cam, "no maps with ray", hint="run without --ray to write maps")
        implied = None if self.out is None or is_folder(self.out) else ROW_SUFFIXES.get(Path(self.out).suffix.lower())
        if self.fmt is not None and implied is not None and self.fmt != implied:
            raise refuse("fmt", self.fmt, f"{implied}, the format the output {self.out} names (or none: the suffix "
                         "decides)", hint=f"let the suffix decide, or write to a .{self.fmt} file")
        if not self.ray:
            for name, unset in (("address", None), ("gpus_per_worker", 0.0)):
                if getattr(self, name) != unset:
                    raise refuse(name, getattr(self, name), f"--{name.replace('_', '-')} needs --ray (without it: "
                                 f"{'none' if unset is None else unset})", hint="add --ray to run on Ray Data")
        elif self.out is None or self.out == "-":
            raise refuse("out", self.out, "a file or FOLDER/ with ray (rows are streamed back and written there)")


def configure(config_type: type, config: Any = None, changes: Mapping[str, Any] | None = None) -> Any:
    """``config`` (default: the defaults) with ``changes`` laid over it, checked again; the keys of
    a group's options may be given flat (``head="rf"`` for the model group), as the library
    functions take them (``infer(bundle, inputs, head="rf")``).

    Raises:
        ConfigError: an unknown key or an invalid value.
    """
    if not changes:
        return config if config is not None else config_type()
    base = to_dict(config) if config is not None else {}
    return make(config_type, {**base, **{k: to_dict(v) if is_dataclass(v) else v for k, v in changes.items()}})


def check_value(config_type: type, name: str, value):
    """``value`` checked against the declared option ``name`` of ``config_type`` (a library
    function that takes one option alone, e.g. a backend, checks it in the same words)."""
    spec = next(s for f, s in specs(config_type) if f.name == name)
    return check(name, value, spec)


__all__ = ["BACKENDS", "HEAD_FORMATS", "PROVIDERS", "ModelOptions", "TrustOptions", "InferConfig", "trust_field",
           "refuse", "configure", "check_value"]
