"""The options of ``transfer gradcam``, declared once (:mod:`transfer.options`): which trial,
images, CAM methods, layer and class, and how faithfulness is measured
(:class:`~transfer.maps_config.FaithOptions`). Light imports: the CLI reads it at startup."""

from __future__ import annotations

from dataclasses import dataclass

from ..maps_config import FaithOptions
from ..options import Check, Flag, Interval, ListOf, OneOf, Text, group, items, make, option, to_dict, validate

#: CAM methods.
METHODS = ("gradcam", "gradcam++", "scorecam")
#: other spellings of the methods
ALIASES = {"gradcampp": "gradcam++", "grad-cam": "gradcam", "grad-cam++": "gradcam++", "score-cam": "scorecam"}


def read_methods(value) -> tuple[str, ...]:
    """Method names (a list or one comma list; ``all`` = every method; aliases read), order kept."""
    names = [ALIASES.get(s.lower(), s.lower()) for s in items(value)]
    if names == ["all"]:
        return METHODS
    return tuple(dict.fromkeys(names))


def _methods_ok(value) -> bool:
    return isinstance(value, tuple) and bool(value) and all(m in METHODS for m in value)


def _class_ok(value) -> bool:
    return (isinstance(value, str) and bool(value.strip())) or (isinstance(value, int) and not isinstance(value, bool))


@dataclass(frozen=True)
class CamOptions:
    """How one set of maps is computed (:func:`transfer.analysis.gradcam.compute_maps`)."""

    method: str = option("gradcam", OneOf(*METHODS), "The CAM method.", cli=False)
    layer: str | None = option(None, Text("a layer name"), "Target layer (any layer with a spatial output). "
                               "[default: the trial's gradcam_layer, or the last layer with a map of at least 6x6 "
                               "cells when that one is coarser]", none=True)
    default_layer: str | None = option(None, Text("a layer name"), "The layer used when no layer is given (the "
                                       "registry's / trial.json's).", none=True, cli=False)
    batch_size: int = option(16, Interval(int, 1), "Images per gradient batch.", cli=False)
    scorecam_channels: int | None = option(None, Interval(int, 1), "Score-CAM: score only the N most active "
                                           "channels (one forward pass each). [default: all]", none=True,
                                           metavar="N")

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class GradcamConfig:
    """Every option of ``transfer gradcam`` (the faithfulness options in ``faith``).

    Example::

        GradcamConfig(methods="all").methods         # ('gradcam', 'gradcam++', 'scorecam')
        GradcamConfig(methods="lime")   # ConfigError: invalid methods: 'lime'; accepted: gradcam, ...
    """

    trial: str = option("best", Text("best, all or a trial name"), "Trial name(s), 'best' or 'all'.")
    images: tuple[str, ...] = option((), ListOf(Text("an image file or folder"), min_items=0), "Image file or "
                                     "folder to explain (repeatable; extra paths after RUN work too).", repeat=True,
                                     metavar="PATH")
    samples: int = option(16, Interval(int, 1), "Without --images: how many random test images to explain (the "
                          "faithfulness verdict needs about 10 or more).")
    methods: tuple[str, ...] = option(("gradcam",), Check(_methods_ok, "gradcam, gradcam++, scorecam (a comma "
                                      "list) or all", read=read_methods), "gradcam, gradcam++, scorecam "
                                      "(comma-separated) or all; with several, the report leads with the one whose "
                                      "maps beat their control.", flag="--method", metavar="M[,M]")
    class_: str | int | None = option(None, Check(_class_ok, "a class name or index"), "Class to explain (name or "
                                      "index). [default: the predicted class]", none=True, flag="--class",
                                      metavar="C")
    save_maps: bool = option(False, Flag(), "Also write each raw heatmap (input resolution) as <stem>.npy next to "
                             "its overlay.")
    cam: CamOptions = group(CamOptions, "how the maps are computed")
    faith: FaithOptions = group(FaithOptions, "how faithfulness is measured")
    def __post_init__(self) -> None:
        validate(self)


def with_options(config: GradcamConfig | None, options: dict) -> GradcamConfig:
    """``config`` (or the defaults) with ``options`` laid over it by name (faithfulness options flat)."""
    return make(GradcamConfig, {**to_dict(config or GradcamConfig()), **options})


__all__ = ["GradcamConfig", "CamOptions", "METHODS", "ALIASES", "read_methods", "with_options"]
