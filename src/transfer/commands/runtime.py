"""``transfer infer`` and ``transfer bench``: the TensorFlow-free runtime."""

from __future__ import annotations

import sys

import click

from ..options import click_options, from_cli
from ..runtime.bench_config import BenchConfig
from ..runtime.predict_config import InferConfig
from ._options import quiet_option


@click.command("infer")
@click.argument("bundle", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click_options(InferConfig)
@quiet_option
def infer_cmd(bundle, inputs, quiet, **options) -> None:
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
    from ..progress import Progress
    from ..runtime.infer import exit_code, infer

    cfg = from_cli(InferConfig, options)
    progress = Progress(quiet=quiet)
    if cfg.ray:
        from ..runtime.ray_infer import infer_ray

        s = infer_ray(bundle, inputs, cfg, progress=progress)
    else:
        s = infer(bundle, inputs, cfg, progress=progress)
    for line in s.lines():
        if not line.startswith("error:"):
            progress.say(line)
        else:  # nothing found: said even with --quiet
            click.echo(line, err=True)
    sys.exit(exit_code(s, cfg.strict))


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
