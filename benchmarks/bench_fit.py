"""Training throughput of the trainer vs plain Keras ``model.fit`` on numpy arrays.

    python benchmarks/bench_fit.py [--images 60000] [--epochs 3] [--work DIR]
    python benchmarks/bench_fit.py --backbone mobilenet_v2 --size 96 --images 2000

arc2 on Fashion-MNIST's training images (Debian package dataset-fashion-mnist) at 28x28,
batch 32, Adam 1e-3, trained twice in one process, alternating:

* the trainer: ``run_trial`` of an ``arc2-t100`` trial, as a sweep trains it (everything
  trains and there is no augmentation, so the PNG files are decoded once into the run's
  pixel cache before the first epoch and every epoch reads batches from it; ``--no-cache``
  measures decoding every epoch instead);
* the baseline: the same model (same initial weights), compiled the same way, ``fit`` on
  the same images decoded once into one float32 array.

Throughput = training images per second of the epochs after the first (the first traces
the graph). Both skip validation. Bar: trainer >= 0.95x the baseline. A backbone with
BatchNormalization layers (``--backbone mobilenet_v2``) also pays the trainer's population
statistics pass every epoch, which ``model.fit`` does not do: the table shows the trainer's
throughput with and without it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_sweep import fashion_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transfer-bench" / "fit")
    ap.add_argument("--backbone", default="arc2")
    ap.add_argument("--size", type=int, default=28, help="image side (pixels)")
    ap.add_argument("--no-cache", action="store_true", help="the trainer decodes the PNG files every epoch")
    a = ap.parse_args()
    import keras

    from transfer.data.folder import index_folder
    from transfer.data.image import load_image
    from transfer.trainer.config import load_config
    from transfer.trainer.fit import TrialData, TrialSpec, _compile, build_trial_model, run_trial

    data = fashion_folder(a.work, a.images)
    index = index_folder(data)
    samples = index.samples
    cfg = load_config(None, {"data": str(data), "out": str(a.work / "run"), "backbones": a.backbone, "trainable": "1",
                             "weights": "none", "epochs": a.epochs, "image_size": a.size, "batch_size": 32, "lr": 1e-3,
                             "patience": 0, "val": 0.0, "test": 0.0, "workers": 2,
                             "cache": not a.no_cache})
    name = f"{a.backbone}-t100"
    spec = TrialSpec(name=name, group=name, fold=None, backbone=a.backbone, init="scratch",
                     weights="none", trainable=1.0, freeze_by="layers", image_size=(a.size, a.size))
    x = np.stack([load_image(data / s.path, (a.size, a.size)) for s in samples]).astype(np.float32)
    y = np.array([s.label for s in samples], dtype=np.int64)
    results = {"trainer": [], "trainer without the statistics pass": [], "model.fit": []}
    for rep in range(2):
        # the trainer: a fresh run folder each time
        run = a.work / f"run{rep}"
        import shutil

        shutil.rmtree(run, ignore_errors=True)
        lines: list[str] = []
        run_trial(run, cfg, spec, TrialData.of(data, index.class_names, train=samples), progress=lines.append)
        from transfer.runfolder import TrialPaths

        paths = TrialPaths(run / "trials" / spec.name)
        hist = paths.history()
        bn = float(paths.metrics().get("batchnorm", {}).get("seconds_per_pass") or 0.0)
        results["trainer"] += [len(samples) / r["seconds"] for r in hist[1:]]
        results["trainer without the statistics pass"] += [len(samples) / (r["seconds"] - bn) for r in hist[1:]]
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
        print(f"round {rep + 1}: " + ", ".join(f"{k} {np.mean(v[-(a.epochs - 1):]):.0f} img/s"
                                                 for k, v in results.items()), flush=True)
    base = np.median(results["model.fit"])
    print(f"\n{a.backbone} at {a.size}x{a.size} on {len(samples)} Fashion-MNIST images, batch 32 (medians):\n")
    print("| run | img/s | vs model.fit |\n|---|---:|---:|")
    for k, v in results.items():
        print(f"| {k} | {np.median(v):.0f} | {np.median(v) / base:.2f}x |")
    print("\nbar: trainer >= 0.95x model.fit")


if __name__ == "__main__":
    main()
