"""ROAD's imputation: banded Cholesky against sparse LU, the two solvers of ``impute_linear``.

    python benchmarks/bench_road.py [--sizes 16,32,64,128,224] [--seconds 1]

For each square image size and two hole shapes -- one blob (the top fraction of a smooth map, as a
CAM removes it) and scattered pixels (a noise map) -- at removed fractions 0.1, 0.3, 0.5, 0.7 and
0.9, :func:`transfer.map_removal.impute_linear` runs with each solver in turn in this process
(``BANDED_WORK`` raised to force the banded Cholesky, lowered to force sparse LU), on one BLAS
thread. The table gives CPU milliseconds per image (mean over the fractions), banded / LU, which
solver the default picks, and the largest difference between the two outputs (float32 pixels).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from _common import table  # noqa: E402

FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


def cpu_ms(fn, seconds: float) -> float:
    """CPU milliseconds of one call of ``fn``, the mean over calls for about ``seconds``."""
    fn()
    n, t0 = 0, time.process_time()
    while True:
        fn()
        n += 1
        spent = time.process_time() - t0
        if spent >= seconds or n >= 1000:
            return 1000 * spent / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16,32,64,128,224")
    ap.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per measurement")
    args = ap.parse_args()
    from transfer import map_removal

    default_work = map_removal.BANDED_WORK
    rng = np.random.default_rng(0)
    rows = []
    for side in (int(s) for s in args.sizes.split(",")):
        x = rng.uniform(0, 255, (side, side, 3))
        noise = rng.standard_normal((side, side, 3))
        yy, xx = np.mgrid[:side, :side]
        for shape, m in (("blob", -((yy - side / 3) ** 2) - (xx - side / 2) ** 2), ("scattered", rng.random((side, side)))):
            ms = {"lu": [], "banded": [], "default": []}
            worst = 0.0
            for frac in FRACTIONS:
                removed = m >= np.quantile(m, 1 - frac)
                outs = {}
                for name, work in (("lu", -1.0), ("banded", float("inf")), ("default", default_work)):
                    map_removal.BANDED_WORK = work

                    def one(name=name, removed=removed):
                        outs[name] = map_removal.impute_linear(x, removed, noise=map_removal.ROAD_NOISE,
                                                               noise_field=noise)

                    ms[name].append(cpu_ms(one, args.seconds / len(FRACTIONS)))
                map_removal.BANDED_WORK = default_work
                worst = max(worst, float(np.abs(outs["banded"] - outs["lu"]).max()))
            lu, banded, default = (float(np.mean(ms[k])) for k in ("lu", "banded", "default"))
            rows.append([f"{side}x{side}", shape, lu, banded, default, default / lu, f"{worst:.1e}"])
            print(rows[-1], flush=True)
    print()
    print(table(["image", "hole", "sparse LU ms", "banded ms", "default ms", "default / LU", "max |banded - LU|"],
                rows))


if __name__ == "__main__":
    main()
