"""Training throughput of the trainer vs plain Keras ``model.fit`` on numpy arrays.

    python benchmarks/bench_fit.py [--images 60000] [--epochs 3] [--work DIR]

arc2 on Fashion-MNIST's training images (Debian package dataset-fashion-mnist) at 28x28,
batch 32, Adam 1e-3, trained twice in one process, alternating:

* the trainer: ``run_trial`` of an ``arc2-t100`` trial, as a sweep trains it (everything
  trains and there is no augmentation, so the PNG files are decoded once into the run's
  pixel cache before the first epoch and every epoch reads batches from it; ``--no-cache``
  measures decoding every epoch instead);
* the baseline: the same model (same initial weights), compiled the same way, ``fit`` on
  the same images decoded once into one float32 array.

Throughput = training images per second of the epochs after the first (the first traces
the graph). Both skip validation. Bar: trainer >= 0.95x the baseline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT
from bench_sweep import fashion_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transfer-bench" / "fit")
    ap.add_argument("--no-cache", action="store_true", help="the trainer decodes the PNG files every epoch")
    a = ap.parse_args()
    import keras

    from transfer.data.folder import index_folder
    from transfer.data.image import load_image
    from transfer.trainer.config import load_config
    from transfer.trainer.fit import TrialSpec, _compile, build_trial_model, run_trial

    data = fashion_folder(a.work, a.images)
    index = index_folder(data)
    samples = index.samples
    cfg = load_config(None, {"data": str(data), "out": str(a.work / "run"), "backbones": "arc2", "trainable": "1",
                             "weights": "none", "epochs": a.epochs, "image_size": 28, "batch_size": 32, "lr": 1e-3,
                             "patience": 0, "val": 0.0, "test": 0.0, "workers": 2,
                             "cache": not a.no_cache})
    spec = TrialSpec(name="arc2-t100", group="arc2-t100", fold=None, backbone="arc2", init="scratch",
                     weights="none", trainable=1.0, freeze_by="layers", image_size=(28, 28))
    x = np.stack([load_image(data / s.path, (28, 28)) for s in samples]).astype(np.float32)
    y = np.array([s.label for s in samples], dtype=np.int64)
    results = {"trainer": [], "model.fit": []}
    for rep in range(2):
        # the trainer: a fresh run folder each time
        run = a.work / f"run{rep}"
        import shutil

        shutil.rmtree(run, ignore_errors=True)
        lines: list[str] = []
        run_trial(run, cfg, spec, data_root=data, class_names=index.class_names, train=samples, val=[], test=[],
                  progress=lines.append)
        from transfer.runfolder import TrialPaths

        hist = TrialPaths(run / "trials" / spec.name).history()
        results["trainer"] += [len(samples) / r["seconds"] for r in hist[1:]]
        # the baseline: the same initial weights, compile and batches of 32 from numpy
        model, _ = build_trial_model(run, cfg, spec, len(index.class_names))
        _compile(model, cfg, 1e-3)
        times = []

        class Clock(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                times.append(time.perf_counter() - self.t0)

        model.fit(x, y, batch_size=32, epochs=a.epochs, shuffle=True, verbose=0, callbacks=[Clock()])
        results["model.fit"] += [len(samples) / t for t in times[1:]]
        print(f"round {rep + 1}: trainer {np.mean(results['trainer'][-(a.epochs - 1):]):.0f} img/s, "
              f"model.fit {np.mean(results['model.fit'][-(a.epochs - 1):]):.0f} img/s", flush=True)
    ours, base = np.median(results["trainer"]), np.median(results["model.fit"])
    print(f"arc2 on {len(samples)} Fashion-MNIST images, batch 32: trainer {ours:.0f} img/s, "
          f"model.fit on numpy {base:.0f} img/s: {ours / base:.2f}x (bar >= 0.95)")


if __name__ == "__main__":
    main()
