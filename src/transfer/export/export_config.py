"""The options of ``transfer export``, declared once (:mod:`transfer.options`): what a bundle
holds (head, int8 / fp16 models, a TensorRT engine), how each model is verified, and the
TensorRT optimization profile's batch sizes. Light imports: the CLI reads it at startup."""

from __future__ import annotations

from dataclasses import dataclass

from ..bundle_format import PRECISIONS
from ..classical_heads import HEAD_KINDS
from ..errors import ConfigError
from ..options import Check, Flag, Interval, ListOf, OneOf, Text, option, validate
from ..unknown_scores import SCORES


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile's batch sizes: min <= opt <= max."""

    min: int
    opt: int
    max: int

    def shapes(self, h: int, w: int, c: int = 3) -> tuple[tuple, tuple, tuple]:
        return (self.min, h, w, c), (self.opt, h, w, c), (self.max, h, w, c)

    def as_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


_PROFILE_WORDS = "MIN:OPT:MAX positive integers with MIN <= OPT <= MAX (e.g. 1:8:32), or one batch size"


def parse_batch_profile(text: str) -> BatchProfile:
    """``"1:8:32"`` -> BatchProfile(1, 8, 32); ``"8"`` -> (8, 8, 8).

    Raises:
        ConfigError: not 1 or 3 positive integers with min <= opt <= max.

    Example::

        parse_batch_profile("1:8:32")
        # BatchProfile(min=1, opt=8, max=32)
    """
    parts = [p.strip() for p in str(text).split(":")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3 or min(nums) < 1 or not nums[0] <= nums[1] <= nums[2]:
        raise ConfigError(f"invalid batch: {text!r}; accepted: {_PROFILE_WORDS}", option="batch")
    return BatchProfile(*nums)


def _is_profile(text) -> bool:
    try:
        return isinstance(text, str) and parse_batch_profile(text) is not None
    except ConfigError:
        return False


#: at most this many training features form the kNN bank (a seeded random subset; stored float16)
BANK_ROWS = 5000


@dataclass(frozen=True)
class UnknownFitOptions:
    """How a bundle's unknown-input scores are fitted (:func:`transfer.export.calibrate.fit_unknown`)."""

    accept: float = option(0.95, Interval(float, 0, 1, closed="neither"),
                           "Share of known (val) images each score's threshold accepts.")
    default: str = option("auto", OneOf("auto", *SCORES), "The bundle's default score, or auto (chosen by the "
                          "rule on synthetic outliers).")
    bank_rows: int = option(BANK_ROWS, Interval(int, 1), "Most training images in the kNN bank.")
    seed: int = option(0, Interval(int), "Seed of the bank's sample.")

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class ExportConfig:
    """Every option of ``transfer export``: the trial, what the bundle holds and its limits.

    Example::

        ExportConfig(head="rf", quantize="int8,fp16").quantize      # ('int8', 'fp16')
        ExportConfig(verify_images=16)   # ConfigError: invalid verify_images: 16; accepted: an integer >= 64
    """

    trial: str = option("best", Text("best or a trial name"), "best or a trial name.")
    out: str | None = option(None, Text("a folder"), "Bundle folder. [default: RUN/bundle]", none=True)
    head: str | None = option(None, OneOf(*HEAD_KINDS), "Also ship this classical head (pickle + ONNX); fitted "
                              "from cached features if absent.", none=True)
    quantize: tuple[str, ...] | None = option(
        None, ListOf(OneOf("int8", "fp16"), duplicates="refuse"), "Add a static int8 ONNX model (CPUs) and/or an "
        "fp16 ONNX model (GPUs); --trt fp16 adds fp16.", none=True, metavar="int8|fp16|int8,fp16")
    trt: str | None = option(None, OneOf(*PRECISIONS), "Add a TensorRT engine (NVIDIA GPU only).", none=True)
    batch: str = option("1:8:32", Check(_is_profile, _PROFILE_WORDS, read=lambda v: str(v).strip()),
                        "TensorRT optimization profile of the batch dimension.", metavar="MIN:OPT:MAX")
    calib_images: int = option(512, Interval(int, 1), "Training images that calibrate int8.")
    verify_images: int = option(256, Interval(int, 64), "Validation images Keras and ONNX are compared on (>= 64; "
                                "all of them when the run has fewer).")
    atol: float = option(1e-4, Interval(float, 0, 1), "fp32: max |probability difference| allowed.")
    min_agreement: float = option(0.999, Interval(float, 0, 1), "fp32: minimum top-1 agreement.")
    max_accuracy_drop: float = option(0.01, Interval(float, 0, 1),
                                      "int8 / fp16: maximum validation accuracy drop (0.01 = 1 point).")
    opset: int = option(17, Interval(int, 1), "ONNX opset.")
    workspace_mb: int = option(2048, Interval(int, 1), "TensorRT builder workspace limit.")
    calibrate: bool = option(True, Flag(), "Temperature-scale the probabilities (fitted on the val split and "
                             "written into the graph only when it holds on val folds it was not fitted on; never "
                             "fitted on test) and fit the unknown-input scores that infer/serve --reject use.",
                             flag="--calibrate", negative="--no-calibrate")
    unknown_accept: float = option(0.95, Interval(float, 0, 1, closed="neither"),
                                   "Share of known (val) images the unknown-input thresholds accept.")
    unknown_default: str = option("auto", OneOf("auto", *SCORES), "The bundle's default unknown-input score: auto "
                                  "(the one that best separates val images from synthetic outliers made of training "
                                  "images; no test image is read) or msp, energy, mahalanobis, knn, vim.",
                                  metavar="auto|NAME")
    cam_layer: str | None = option(None, Text("a layer name"), "Explain this (spatial) layer in the bundle's maps "
                                   "with a Grad-CAM graph (cam.onnx) instead of the default: the exact CAM of the "
                                   "last feature map for global-pooling heads, a Grad-CAM graph at the layer "
                                   "`transfer gradcam` picks otherwise. Refused, with the reason in the manifest, "
                                   "where the layer's gradient does not convert to ONNX.", none=True,
                                   metavar="LAYER")
    force: bool = option(False, Flag(), "Replace an existing bundle at --out (only a folder holding nothing but a "
                         "bundle; its hidden files are kept).")
    sign: str | None = option(None, Text("a private key file"), "Sign the bundle with this private key (`transfer "
                              "keygen KEY`); machines that trust KEY.pub load it.", none=True)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def profile(self) -> BatchProfile:
        return parse_batch_profile(self.batch)

    @property
    def reduced(self) -> tuple[str, ...]:
        """The reduced-precision ONNX models: ``quantize``, and fp16 for a TensorRT fp16 engine (built
        from the fp16 ONNX model: strong typing, the graph decides)."""
        kinds = tuple(self.quantize or ())
        return kinds + ("fp16",) if self.trt == "fp16" and "fp16" not in kinds else kinds


__all__ = ["ExportConfig", "UnknownFitOptions", "BANK_ROWS", "BatchProfile", "parse_batch_profile", "PRECISIONS"]
