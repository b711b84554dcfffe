"""The options of ``transfer bench``, declared once (:mod:`transfer.options`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import Interval, ListOf, OneOf, Text, option, validate
from .predict_config import BACKENDS, trust_field

#: backends the runtime runs itself; ``keras`` is the source run's model (the bench command adds it, needs TensorFlow)
BENCH_BACKENDS = (*(b for b in BACKENDS if b != "onnxruntime-fp32"), "keras")


@dataclass(frozen=True)
class BenchConfig:
    """Every option of ``transfer bench``: what to time, on what, for how long, where to write it.

    Example::

        BenchConfig(backends="onnxruntime", batches="1,32").batches      # (1, 32)
    """

    backends: tuple[str, ...] = option(("onnxruntime", "onnxruntime-int8"), ListOf(OneOf(*BENCH_BACKENDS), duplicates="refuse"),
                                       "Backends to time (keras needs TensorFlow).", metavar="A,B")
    batches: tuple[int, ...] = option((1, 8, 32), ListOf(Interval(int, 1), duplicates="refuse"), "Batch sizes.", flag="--batch",
                                      metavar="N,..")
    head: str | None = option(None, Text("the name of a bundled classical head"),
                              "Also time a bundled classical head (e.g. rf).", none=True)
    images: tuple[str, ...] = option((), ListOf(Text("an image file or folder"), min_items=0),
                                     "Image files/folders to time decoding on (repeatable). [default: the source "
                                     "run's val images, else synthetic pixels]", repeat=True, metavar="PATH")
    seconds: float = option(3.0, Interval(float, 0, closed="neither"), "Timed seconds per cell (at least 10 calls).")
    min_iters: int = option(10, Interval(int, 1), "Timed calls per cell at least.", cli=False)
    warmup: int = option(3, Interval(int, 0), "Untimed calls before each cell.", cli=False)
    threads: int | None = option(None, Interval(int, 1), "ONNX Runtime intra-op threads. [default: the physical "
                                 "cores this process may use, less one]", none=True)
    providers: str = option("cpu", Text("cpu, cuda, tensorrt (a comma list in order) or auto"),
                            "ONNX Runtime providers of the onnxruntime backends, in order: cpu, cuda, tensorrt, "
                            "or 'auto' (the best available).")
    out: str | None = option(None, Text("a folder"), "Folder for bench.json / bench.md / bench.png. "
                             "[default: BUNDLE/../bench]", none=True)
    trust: tuple[str, ...] | None = trust_field()

    def __post_init__(self) -> None:
        validate(self)

    @property
    def provider_list(self):
        """``providers`` as :func:`transfer.runtime.sessions` takes it (None: the best available)."""
        return None if self.providers.strip().lower() == "auto" else self.providers
