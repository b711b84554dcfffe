"""``transfer infer`` and ``transfer bench``: the TensorFlow-free runtime."""

from __future__ import annotations

import sys

import click

from ..options import click_options, from_cli
from ..runtime.bench_config import BenchConfig
from ._options import quiet_option
from .keys import trust_options, trust_value


@click.command("infer")
@click.argument("bundle", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--recursive", "-r", is_flag=True, help="Walk sub-folders of folder inputs.")
@click.option("--batch", default=32, show_default=True, help="Images per model call.")
@click.option("--out", type=click.Path(),
              help="Output file, or a folder (FOLDER/ or an existing one) for predictions.csv|jsonl there; "
                   "'-' for stdout. [default: stdout]")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]),
              help="Row format. [default: from the --out suffix (.jsonl -> jsonl), else csv]")
@click.option("--topk", default=1, show_default=True, help="Classes per row.")
@click.option("--head", default="network", show_default=True, help="network, or a bundled classical head (e.g. rf).")
@click.option("--head-format", type=click.Choice(["onnx", "pickle"]), default="onnx", show_default=True,
              help="Run the classical head as ONNX (no scikit-learn needed) or as its verified pickle.")
@click.option("--backend", help="onnxruntime (default), onnxruntime-int8, tensorrt[-fp16|-int8].")
@click.option("--providers", help="ONNX Runtime providers in order: cpu, cuda, tensorrt. [default: best available]")
@click.option("--workers", default=2, show_default=True, help="Decode threads (with --ray: inference actors).")
@click.option("--threads", type=int,
              help="ONNX Runtime intra-op threads (per worker with --ray). [default: the physical cores; 1 with --ray]")
@click.option("--strict", is_flag=True, help="Exit 1 if any file failed.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run on Ray Data: an actor pool of --workers sessions (needs --out; also writes OUT.parquet).")
@click.option("--address", metavar="HOST:PORT", help="Ray cluster to join with --ray. [default: a local Ray]")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True,
              help="GPUs each Ray inference worker reserves (with --ray; e.g. 1, or 0.5 to share one).")
@click.option("--reject", is_flag=True,
              help="Mark images the bundle's unknown-input score rejects as status 'unknown' (the score, its "
                   "name and the threshold go in every row). Needs a calibrated bundle (the export default).")
@click.option("--unknown-score", metavar="NAME",
              help="Score --reject uses, one the bundle offers: msp, energy, mahalanobis, knn or vim (its "
                   "manifest's unknown.scores). [default: the bundle's, chosen at export without test images]")
@trust_options
@quiet_option
def infer_cmd(bundle, inputs, recursive, batch, out, fmt, topk, head, head_format, backend, providers, workers,
              threads, strict, use_ray, address, gpus_per_worker, reject, unknown_score, trust, trust_pickle,
              quiet) -> None:
    """Predict image files and folders with a bundle: one row per file (path, top-k classes
    and probabilities, or the error for that file). No TensorFlow needed.

    \b
    transfer infer runs/digits/bundle images/ --recursive --out preds.csv
    transfer infer runs/digits/bundle a.jpg b.png --head rf --topk 3 --format jsonl
    transfer infer runs/digits/bundle s3://bucket/shots/ -r --ray --workers 4 --out p.csv

    INPUTS are files, folders or URIs (s3://, gs://, file://; needs transfer[distributed]).

    Bad files (empty, truncated, not an image, unreadable, too large, directories) get an
    error row and are counted; the run goes on. Exit code: 0, or 1 when no file succeeded
    or, with --strict, when any file failed (or another process writes the same --out).

    With --trust (or TRANSFER_TRUST) only a bundle signed by a trusted key loads; a pickled
    head (--head-format pickle) runs only from such a bundle, or with --trust-pickle.

    With --reject an image whose unknown-input score (the bundle's default, chosen at export
    without test images, or --unknown-score) is below the bundle's threshold (chosen at export
    to accept 95 % of known validation images) gets status 'unknown': it belongs to none of
    the bundle's classes, as far as the bundle can tell.
    """
    from ..errors import ConfigError
    from ..progress import Progress
    from ..runtime.infer import exit_code, infer

    progress = Progress(quiet=quiet)
    common = dict(out=out, fmt=fmt, batch=batch, topk=topk, head=head, head_format=head_format, backend=backend,
                  providers=providers, recursive=recursive, workers=workers, progress=progress,
                  trust=trust_value(trust), trust_pickle=trust_pickle, reject=unknown_score or reject)
    if unknown_score and not reject:
        raise ConfigError("--unknown-score needs --reject")
    if use_ray:
        from ..runtime.ray_infer import infer_ray

        s = infer_ray(bundle, inputs, address=address, threads_per_worker=threads or 1,
                      gpus_per_worker=gpus_per_worker, **common)
    else:
        if address or gpus_per_worker:
            raise ConfigError(f"{'--address' if address else '--gpus-per-worker'} needs --ray")
        s = infer(bundle, inputs, threads=threads, **common)
    for line in s.lines():
        if not line.startswith("error:"):
            progress.say(line)
        else:  # nothing found: said even with --quiet
            click.echo(line, err=True)
    sys.exit(exit_code(s, strict))


@click.command("bench")
@click.argument("bundle", type=click.Path())
@click_options(BenchConfig)
@quiet_option
def bench_cmd(bundle, quiet, **options) -> None:
    """Latency p50/p90/p99, throughput, time split (decode / preprocess / model / head),
    top-1 agreement with fp32 and achieved GFLOP/s vs this machine's matmul peak, per
    backend and batch size. Backends that cannot run here are listed with the reason.

    \b
    transfer bench runs/digits/bundle --backends onnxruntime,onnxruntime-int8,keras --batch 1,8,32
    """
    from pathlib import Path

    from ..progress import Progress
    from ..runtime.bench import bench, render_table

    default_out = Path(bundle).resolve().parent / "bench"
    cfg = from_cli(BenchConfig, options, out=options.get("out") or str(default_out))
    res = bench(bundle, cfg, progress=Progress(quiet=quiet), extra_runners={"keras": _keras_runner})
    click.echo(render_table(res))
    click.echo(f"-> {cfg.out}/bench.json, bench.md" + (", bench.png" if res["rows"] else ""))
    if not res["rows"]:
        from ..errors import TensorRTUnavailableError, TransferError

        trt_only = all(be.startswith("tensorrt") for be in res["skipped"])
        cls = TensorRTUnavailableError if trt_only else TransferError
        raise cls("nothing was benchmarked: every backend was skipped (reasons above)",
                  hint="choose backends that can run here, e.g. --backends onnxruntime")


def _keras_runner(bundle):
    """bench's ``keras`` backend: the source run's model (TensorFlow is imported only when asked for)."""
    from ..export.keras_runner import keras_runner_for

    return keras_runner_for(bundle)


COMMANDS = [infer_cmd, bench_cmd]
