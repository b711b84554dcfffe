"""How the faithfulness of class-activation maps is measured, declared once
(:mod:`transfer.options`): the deletion / insertion curves, the controls, ROAD. Used by
:func:`transfer.faithfulness.faithfulness`, ``transfer gradcam`` and the benchmarks. Light imports."""

from __future__ import annotations

from dataclasses import dataclass

from .options import Check, Interval, OneOf, option, validate

#: fill values of removed pixels in the deletion / insertion curves
BASELINES = ("median", "mean", "zero", "blur")
#: controls: another image's map, or the map rolled by half the image
CONTROLS = ("other", "shifted")
#: points of the deletion / insertion curves minus one (ROAD removes 1/steps .. (steps-1)/steps)
DEFAULT_STEPS = 10
#: control maps per image (the control's number is their median)
DEFAULT_CONTROLS = 3
#: where ``other`` controls come from: images explained as another class (default) or any other image
CONTROL_CLASSES = ("other", "any")
#: ROAD: ``auto`` runs it on inputs of at most ROAD_AUTO_PIXELS pixels (one sparse solve per step,
#: ~0.07 s per solve at 224 x 224: docs/benchmarks.md), ``on`` always, ``off`` never
ROAD_CHOICES = ("auto", "on", "off")
ROAD_AUTO_PIXELS = 128 * 128


def _road(v):
    """``True`` / ``False`` (Python callers) read as ``on`` / ``off``."""
    return ("on" if v else "off") if isinstance(v, bool) else str(v).strip().lower()


def _noise(v) -> bool:
    return v == "auto" or (not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0)


@dataclass(frozen=True)
class FaithOptions:
    """How faithfulness is measured (:func:`transfer.faithfulness.faithfulness`).

    Example::

        FaithOptions(steps=8).road_runs(28 * 28)     # True (auto: small inputs)
        FaithOptions(steps=1)    # ConfigError: invalid steps: 1; accepted: an integer >= 2
    """

    steps: int = option(DEFAULT_STEPS, Interval(int, 2), "Points of the deletion / insertion curves minus one "
                        "(0, 1/N, .., 100 % of the pixels); ROAD removes 1/N .. (N-1)/N.", metavar="N")
    baseline: str = option("median", OneOf(*BASELINES), "What removed pixels become in the deletion / insertion "
                           "curves: the image's median colour (its background where one colour dominates), its mean "
                           "colour, black, or the image blurred (ROAD imputes them from their neighbours instead).")
    control: str = option("other", OneOf(*CONTROLS), "Each map is tested against another image's map (other) or "
                          "itself rolled by half the image (shifted: rewards any map that lights the centre of "
                          "centred images).")
    controls: int = option(DEFAULT_CONTROLS, Interval(int, 1), "Control maps per image (other images' maps); the "
                           "control's number is their median.", metavar="K")
    control_class: str = option("other", OneOf(*CONTROL_CLASSES), "Controls are maps of images explained as another "
                                "class (other: on centred data a same-class image's map is nearly this one's) or of "
                                "any other image.")
    road: str = option("auto", Check(lambda v: v in ROAD_CHOICES, "auto, on or off", read=_road), "ROAD (removal by imputation): auto = on for inputs up to "
                       "128x128 pixels (one sparse solve per step and map, ~2 s at 224x224).",
                       metavar="auto|on|off")
    road_noise: float | str = option("auto", Check(_noise, "auto or a number >= 0"), "Grey levels of the ROAD "
                                     "noise, or auto: each image's own noise level.", cli=False)
    seed: int = option(0, Interval(int), "Seed of the sample choice, the controls and the ROAD noise.")

    def __post_init__(self) -> None:
        validate(self)

    def checked(self) -> "FaithOptions":
        """The options (validated when made)."""
        return self

    @property
    def control_other_class(self) -> bool:
        """Whether ``other`` controls are drawn from images of another class."""
        return self.control_class == "other"

    def road_runs(self, pixels: int) -> bool:
        """Whether ROAD is computed for inputs of ``pixels`` pixels."""
        return self.road == "on" or (self.road == "auto" and pixels <= ROAD_AUTO_PIXELS)


__all__ = ["FaithOptions", "BASELINES", "CONTROLS", "CONTROL_CLASSES", "DEFAULT_STEPS", "DEFAULT_CONTROLS", "ROAD_CHOICES",
           "ROAD_AUTO_PIXELS"]
