"""What a freeze sweep costs with the frozen-prefix cache, and what the cache does to accuracy.

    python benchmarks/bench_sweep.py [--images 2000] [--size 96] [--epochs 3] [--weights none|PATH]
                                     [--rss 20000 [--rss-only]] [--work DIR]

MobileNetV2 at 96x96 on the first ``--images`` images of Fashion-MNIST's training set
(Debian package dataset-fashion-mnist), trainable 0, 0.1, 0.3, 0.5, 0.7 and 1.0, each sweep
one ``transfer train`` process:

1. the cached sweep: its wall time and each trial's (the t100 trial trains everything, so
   it has no frozen part to cache: it is the reference "one fine-tune");
2. the same sweep with ``--no-cache`` (same seed, same batches): each trial's test
   accuracy, cached vs uncached;
3. with ``--rss N``: the peak resident memory of a cached sweep (trainable 0, 0.5; one
   epoch) over N images and over ``--images`` images, each in a fresh process.

Bars: cached sweep wall <= 2.0x its own t100 trial; each trial's test accuracy within
1.5 points cached vs uncached; peak RSS over N images <= 1.5x over ``--images``.

The sweep that decides (``--decide``), each step one ``transfer`` process:

    python benchmarks/bench_sweep.py --decide [--size 64] [--epochs 8] [--per-class 400] [--work DIR]

1. MobileNetV2 pretrained with ``transfer train`` on five Fashion-MNIST classes (T-shirt/top,
   trouser, pullover, dress, coat; 1,200 training images each, 64 px, 8 epochs, from random
   weights); the target is the five other classes (``--per-class`` training images each, val
   carved from them, and 200 test images each from Fashion-MNIST's test set);
2. ``transfer rank`` of mobilenet_v2 (from the pretrained model), arc2 and arc3 (random
   weights) on the target, into a fresh run folder;
3. the 3-backbone x 6-fraction sweep (trainable 0, 0.1, 0.3, 0.5, 0.7, 1.0) with the full
   schedule, then with ``--schedule halving`` (rungs at epochs 1, 3, 8; the best third goes on);
4. the trial halving chose, trained alone (a sweep of that one trial into a fresh folder);
5. the unchanged guard: ``transfer heads RUN --trial ... --head logreg`` on every trial of the full
   sweep and every trial halving trained to the full budget (network test accuracy >= a logistic
   regression on the trial's own features - 3 points).

Bars: halving's best trial within 0.5 points test accuracy of the full sweep's best, at <= 0.6x
the full sweep's wall time (its cost as a multiple of the chosen trial alone is printed too);
``transfer rank``'s backbone order against the full sweep's (each backbone's best trial by val
accuracy) as Kendall's tau, and its cost as a fraction of the full sweep. The machine's load
average is sampled every 5 s during each step and printed with it, and each step's CPU seconds
(user + system, ``wait4``) with its wall time: on a shared machine the ratios of CPU seconds hold
better than those of wall times taken minutes apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, logreg_guard_rows, table

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FRACTIONS = "0,0.1,0.3,0.5,0.7,1.0"


def fashion_folder(root: Path, n: int) -> Path:
    """The first ``n`` Fashion-MNIST training images as class folders (made once)."""
    from transfer.data.datasets import FASHION_MNIST_CLASSES, write_idx

    out = root / f"fmnist-{n}"
    if not (out / ".complete").is_file():
        write_idx(FMNIST / "train-images-idx3-ubyte.gz", FMNIST / "train-labels-idx1-ubyte.gz", out,
                  class_names=FASHION_MNIST_CLASSES, limit=n, overwrite=True)
        (out / ".complete").touch()
    return out


def sweep(data: Path, out: Path, *, size: int, epochs: int, weights: str, fractions: str, extra=()) -> dict:
    """Run ``transfer train`` in a fresh process; wall time, per-trial wall times and peak RSS."""
    cmd = [sys.executable, "-m", "transfer.cli", "train", str(data), "--backbone", "mobilenet_v2",
           "--trainable", fractions, "--weights", weights, "--epochs", str(epochs), "--image-size", str(size),
           "--batch-size", "32", "--patience", "0", "--workers", "2", "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    starts, ends, log = {}, {}, []
    for line in proc.stderr:
        now = time.perf_counter() - t0
        log.append(f"{now:8.1f}  {line.rstrip()}")
        words = line.split()
        if line.startswith("trial ") and len(words) >= 3 and "/" in words[1]:
            name = words[2].rstrip(":")
            if len(words) == 3:
                starts[name] = now
            elif words[3] in ("done", "FAILED:"):
                ends[name] = now
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    (out.parent / f"{out.name}.log").write_text("\n".join(log) + "\n")
    if status != 0:
        raise SystemExit(f"sweep into {out} failed; see {out.parent / (out.name + '.log')}")
    trials = {n: ends[n] - starts[n] for n in ends if n in starts}
    metrics = {n: json.loads((out / "trials" / n / "metrics.json").read_text()) for n in trials}
    return {"wall": wall, "trials": trials, "metrics": metrics, "rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=None, help="[default: 96; 64 with --decide]")
    ap.add_argument("--epochs", type=int, default=None, help="[default: 3; 8 with --decide]")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--rss", type=int, default=0, help="also measure peak RSS over this many images")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "transfer-bench" / "sweep")
    ap.add_argument("--skip-uncached", action="store_true")
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS part (needs --rss)")
    ap.add_argument("--adam", action="store_true", help="only Keras's Adam vs the fused update")
    ap.add_argument("--decide", action="store_true", help="only the sweep that decides (see the module docstring)")
    ap.add_argument("--per-class", type=int, default=400, help="--decide: target training images per class")
    ap.add_argument("--adam-steps", type=int, default=30)
    a = ap.parse_args()
    a.size = a.size or (64 if a.decide else 96)
    a.epochs = a.epochs or (8 if a.decide else 3)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.rss_only:
        return rss(a)
    if a.adam:
        return adam(a)
    if a.decide:
        return decide(a)
    data = fashion_folder(a.work, a.images)
    tag = f"{a.images}-{a.size}-e{a.epochs}-{Path(a.weights).stem}"
    kw = dict(size=a.size, epochs=a.epochs, weights=a.weights, fractions=FRACTIONS)
    cached = sweep(data, a.work / f"cached-{tag}", **kw)
    t100 = cached["trials"]["mobilenet_v2-t100"]
    print(f"cached sweep: {cached['wall']:.0f} s; its t100 trial {t100:.0f} s; ratio {cached['wall'] / t100:.2f} "
          f"(bar <= 2.0)")
    rows = []
    uncached = None if a.skip_uncached else sweep(data, a.work / f"uncached-{tag}", extra=("--no-cache",), **kw)
    for name, secs in cached["trials"].items():
        m = cached["metrics"][name]
        row = [name, round(secs, 1), m["cache"].get("mode"), round(m["cost"]["prefix_seconds"], 1),
               round(m["cost"]["train_seconds"], 1), round(m["cost"]["evaluate_seconds"], 1),
               f"{100 * m['test']['accuracy']:.1f}"]
        if uncached:
            u = uncached["metrics"][name]
            row += [round(uncached["trials"][name], 1), f"{100 * u['test']['accuracy']:.1f}",
                    f"{100 * (m['test']['accuracy'] - u['test']['accuracy']):+.1f}"]
        rows.append(row)
    header = ["trial", "cached s", "frozen part", "prefix s", "train s", "evaluate s", "test acc %"]
    if uncached:
        header += ["uncached s", "uncached test acc %", "difference (points)"]
    print(table(header, rows))
    if uncached:
        print(f"uncached sweep: {uncached['wall']:.0f} s ({uncached['wall'] / cached['wall']:.2f}x the cached one)")
    if a.rss:
        rss(a)


TARGET_CLASSES = 5  # the last five Fashion-MNIST classes are the target, the first five the pretraining source
BACKBONES = "mobilenet_v2,arc2,arc3"


class LoadSampler:
    """The machine's 1-minute load average every ``every`` seconds while a step runs (other jobs share it)."""

    def __init__(self, every: float = 5.0):
        import threading

        self.every, self.values, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.values.append(float(Path("/proc/loadavg").read_text().split()[0]))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def text(self) -> str:
        v = self.values or [float("nan")]
        return f"load {min(v):.1f}-{max(v):.1f} (mean {sum(v) / len(v):.1f})"


#: CPU seconds (user + system) of each ``transfer`` step, by its log's stem: on a shared machine the
#: wall time of a step depends on what else runs; its CPU time much less
CPU: dict[str, float] = {}


def transfer(log: Path, *args) -> tuple[float, str]:
    """Run ``transfer ARGS`` in a fresh process; (wall seconds, load text). The log keeps its output;
    its CPU seconds go to ``CPU[log.stem]``."""
    cmd = [sys.executable, "-m", "transfer.cli", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TF_CPP_MIN_LOG_LEVEL="3")
    print("$ transfer " + " ".join(map(str, args)), flush=True)
    with LoadSampler() as load, open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # each line with the seconds since the start
            fh.write(f"{time.perf_counter() - t0:8.1f}  {line}")
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}); see {log}")
    CPU[log.stem] = usage.ru_utime + usage.ru_stime
    print(f"  {wall:.0f} s, {CPU[log.stem]:.0f} CPU s, {load.text()}", flush=True)
    return wall, load.text()


def _fashion_target(work: Path, per_class: int) -> tuple[Path, Path]:
    """(pretraining source folder, target folder with train/ and test/), made once."""
    from transfer.data.datasets import FASHION_MNIST_CLASSES, write_idx

    full = work / "fmnist"
    if not (full / ".complete").is_file():
        for split, stem in (("train", "train"), ("test", "t10k")):
            write_idx(FMNIST / f"{stem}-images-idx3-ubyte.gz", FMNIST / f"{stem}-labels-idx1-ubyte.gz", full / split,
                      class_names=FASHION_MNIST_CLASSES, overwrite=True)
        (full / ".complete").touch()

    def subset(src: Path, out: Path, classes, n: int) -> None:
        for c in classes:
            (out / c).mkdir(parents=True, exist_ok=True)
            for f in sorted((src / c).iterdir())[:n]:
                shutil.copyfile(f, out / c / f.name)

    source, target = work / "fm-source", work / f"fm-target-{per_class}"
    if not source.exists():
        subset(full / "train", source, FASHION_MNIST_CLASSES[:TARGET_CLASSES], 1200)
    if not (target / ".complete").is_file():
        shutil.rmtree(target, ignore_errors=True)
        subset(full / "train", target / "train", FASHION_MNIST_CLASSES[TARGET_CLASSES:], per_class)
        subset(full / "test", target / "test", FASHION_MNIST_CLASSES[TARGET_CLASSES:], 200)
        (target / ".complete").touch()
    return source, target


def _trials(run: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "metrics.json").read_text()) for d in sorted((run / "trials").iterdir())
            if (d / "metrics.json").is_file()}


def _backbone_order(trials: dict[str, dict]) -> list[str]:
    """Backbones by the val accuracy of their best trial trained to the full budget (ties: name)."""
    best: dict[str, float] = {}
    for name, m in trials.items():
        if m.get("stopped"):
            continue
        bb = name.rsplit("-", 1)[0]
        best[bb] = max(best.get(bb, -1.0), m["val"]["accuracy"])
    return sorted(best, key=lambda b: (-best[b], b))


def decide(a) -> None:
    """Steps 1-4 of the module docstring (``--decide``)."""
    from scipy.stats import kendalltau

    work = a.work
    source, target = _fashion_target(work, a.per_class)
    pre = work / f"fm-pretrain-{a.size}"
    transfer(work / "pretrain.log", "train", source, "--backbone", "mobilenet_v2", "--weights", "none",
             "--trainable", "1.0", "--image-size", a.size, "--epochs", 8, "--out", pre)
    weights = f"mobilenet_v2={pre / 'trials' / 'mobilenet_v2-t100' / 'model.keras'}"
    common = ["--backbone", BACKBONES, "--weights", weights, "--image-size", a.size]
    sweep_args = [*common, "--trainable", FRACTIONS, "--epochs", a.epochs]
    tag = f"{a.per_class}-{a.size}-e{a.epochs}"
    runs = {k: work / f"{k}-{tag}" for k in ("rank", "full", "halving")}
    for r in runs.values():  # fresh folders: a finished run would only be resumed
        shutil.rmtree(r, ignore_errors=True)
    walls, loads = {}, {}
    walls["rank"], loads["rank"] = transfer(work / "rank.log", "rank", target, *common, "--out", runs["rank"])
    walls["full"], loads["full"] = transfer(work / "full.log", "train", target, *sweep_args, "--out", runs["full"])
    walls["halving"], loads["halving"] = transfer(work / "halving.log", "train", target, *sweep_args,
                                                  "--schedule", "halving", "--out", runs["halving"])
    full, halving = _trials(runs["full"]), _trials(runs["halving"])
    best_f = json.loads((runs["full"] / "best.json").read_text())
    best_h = json.loads((runs["halving"] / "best.json").read_text())
    chosen = halving[best_h["trial"]]
    bb, frac = best_h["trial"].rsplit("-t", 1)
    alone = work / f"alone-{best_h['trial']}-{tag}"
    shutil.rmtree(alone, ignore_errors=True)
    alone_args = ["--backbone", bb, "--trainable", f"{int(frac) / 100:g}", "--image-size", a.size,
                  "--epochs", a.epochs, "--weights", weights if bb == "mobilenet_v2" else "none"]
    walls["alone"], loads["alone"] = transfer(work / "alone.log", "train", target, *alone_args, "--out", alone)

    rows = []
    for name, m in full.items():
        h = halving.get(name, {})
        st = h.get("stopped") or {}
        rows.append([name, f"{100 * m['val']['accuracy']:.1f}", f"{100 * m['test']['accuracy']:.1f}",
                     m.get("epochs_trained"), h.get("epochs_trained"),
                     f"rung {st['rung']}, place {st['place']}/{st['of']}" if st else "-",
                     f"{100 * h['val']['accuracy']:.1f}" if h else "-", f"{100 * h['test']['accuracy']:.1f}" if h else "-"])
    print(table(["trial", "full: val %", "full: test %", "full: epochs", "halving: epochs", "halving: stopped at",
                 "halving: val %", "halving: test %"], rows))
    diff = 100 * (best_h["test_accuracy"] - best_f["test_accuracy"])
    print(f"full sweep best {best_f['trial']}: val {best_f['value']:.4f}, test {best_f['test_accuracy']:.4f}; "
          f"halving best {best_h['trial']}: val {best_h['value']:.4f}, test {best_h['test_accuracy']:.4f}; "
          f"difference {diff:+.1f} points (bar: within 0.5)")
    print(f"wall: full {walls['full']:.0f} s ({loads['full']}), halving {walls['halving']:.0f} s "
          f"({loads['halving']}): {walls['halving'] / walls['full']:.2f}x (bar <= 0.6); the chosen trial alone "
          f"{walls['alone']:.0f} s ({loads['alone']}): halving = {walls['halving'] / walls['alone']:.2f}x it, "
          f"the full sweep {walls['full'] / walls['alone']:.2f}x")
    cpu = {k: CPU[k] for k in ("full", "halving", "alone", "rank")}
    print(f"CPU seconds: full {cpu['full']:.0f}, halving {cpu['halving']:.0f} ({cpu['halving'] / cpu['full']:.2f}x), "
          f"the chosen trial alone {cpu['alone']:.0f} (halving {cpu['halving'] / cpu['alone']:.2f}x it), "
          f"rank {cpu['rank']:.0f} ({cpu['rank'] / cpu['full']:.3f} of the full sweep)")
    rank = json.loads((runs["rank"] / "rank.json").read_text())
    by_rank = [b["backbone"] for b in rank["backbones"]]
    by_sweep = _backbone_order(full)
    tau = kendalltau([by_rank.index(b) for b in by_sweep], list(range(len(by_sweep)))).statistic
    scores = ", ".join(f"{b['logme']:.3f}" for b in rank["backbones"])
    print(f"transfer rank: {' > '.join(by_rank)} (LogME {scores})"
          f"; the full sweep: {' > '.join(by_sweep)}; Kendall tau {tau:+.2f}; rank {walls['rank']:.0f} s "
          f"({loads['rank']}) = {walls['rank'] / walls['full']:.3f} of the full sweep")
    print(f"chosen trial: {best_h['trial']} ({chosen.get('epochs_trained')} epochs)")
    # the unchanged guard: each completed trial's network vs a logistic regression on its own features
    done_h = [n for n, m in halving.items() if not m.get("stopped")]
    walls["heads"], _ = transfer(work / "heads-full.log", "heads", runs["full"], "--trial", "all", "--head", "logreg")
    transfer(work / "heads-halving.log", "heads", runs["halving"], "--trial", ",".join(done_h), "--head", "logreg")
    rows = [[k, *r] for k in ("full", "halving") for r in logreg_guard_rows(runs[k])]
    print(table(["sweep", "trial", "network test acc %", "logreg test acc %", "difference (points)",
                 "bar (>= -3)"], rows))
    short = sum(r[-1] != "met" for r in rows)
    print(f"guard: network >= logreg on its own features - 3 points in {len(rows) - short} of {len(rows)} "
          f"completed trials")



def adam(a) -> None:
    """Keras's Adam vs one ``ResourceApplyAdam`` kernel per variable (``transfer.trainer.optim``):
    the trainer's compiled train step of MobileNetV2 at ``--size`` px, 70 % trainable, batch 32;
    trace time, step time (the two alternated step by step, so both see the same load) and the
    weights after the same ``--adam-steps`` steps from the same start on the same batches."""
    import numpy as np

    from transfer.models.build import build_classifier
    from transfer.models.freeze import apply_freeze
    from transfer.trainer import loop
    from transfer.trainer.config import TrainConfig
    from transfer.trainer.optim import make_optimizer

    cfg = TrainConfig(data="d", out="r")
    rng = np.random.default_rng(0)
    batches = [(rng.uniform(0, 255, (32, a.size, a.size, 3)).astype(np.float32),
                rng.integers(0, 10, 32).astype(np.int64)) for _ in range(4)]
    runs = {}
    for name, fused in (("keras Adam", False), ("fused Adam", True)):
        model, info = build_classifier("mobilenet_v2", input_shape=(a.size, a.size, 3), weights="none",
                                       num_classes=10, dropout=0.2, seed=0)
        apply_freeze(model, info, 0.7)
        loss = __import__("keras").losses.SparseCategoricalCrossentropy()
        opt = make_optimizer(cfg, 1e-3, fused=fused)
        model.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
        opt.build(model.trainable_variables)
        step = loop.StepFunction(model, "train_step")
        t0 = time.perf_counter()
        step(*batches[0])
        runs[name] = {"model": model, "step": step, "trace": time.perf_counter() - t0, "times": [], "losses": []}
    for i in range(1, a.adam_steps):
        for r in runs.values():
            t0 = time.perf_counter()
            out = r["step"](*batches[i % len(batches)])
            r["losses"].append(float(out["loss"]))
            r["times"].append(time.perf_counter() - t0)
    kr, fr = runs["keras Adam"], runs["fused Adam"]
    wk, wf = kr["model"].get_weights(), fr["model"].get_weights()
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(wk, wf))
    scale = max(float(np.max(np.abs(x))) for x in wk)
    rows = [[name, round(r["trace"], 1), round(1000 * float(np.median(r["times"])), 1), f"{r['losses'][-1]:.6f}"]
            for name, r in runs.items()]
    print(table(["optimizer", "trace s (first step)", "median step ms", f"loss at step {a.adam_steps}"], rows))
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(kr["losses"], fr["losses"])]
    print(f"after {a.adam_steps} steps: max |weight difference| {diff:.3g} (largest weight {scale:.3g}); "
          f"largest relative loss difference over the steps {max(rel):.3g}; step time fused / keras "
          f"{np.median(fr['times']) / np.median(kr['times']):.3f}, trace {fr['trace'] / kr['trace']:.3f}")


def rss(a) -> None:
    """Peak RSS of a cached sweep (trainable 0, 0.5; one epoch) over ``--images`` and ``--rss`` images."""
    small = fashion_folder(a.work, a.images)
    large = fashion_folder(a.work, a.rss)
    rk = dict(size=a.size, epochs=1, weights=a.weights, fractions="0,0.5")
    for n in (a.images, a.rss):  # fresh run folders: a finished one would only be resumed
        shutil.rmtree(a.work / f"rss-{n}", ignore_errors=True)
    r_small = sweep(small, a.work / f"rss-{a.images}", **rk)["rss_mb"]
    r_large = sweep(large, a.work / f"rss-{a.rss}", **rk)["rss_mb"]
    print(f"peak RSS, cached sweep (trainable 0,0.5; 1 epoch): {a.images} images {r_small:.0f} MB, "
          f"{a.rss} images {r_large:.0f} MB: {r_large / r_small:.2f}x (bar <= 1.5)")


if __name__ == "__main__":
    main()
