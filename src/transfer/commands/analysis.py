"""``transfer heads``, ``transfer evaluate``, ``transfer features``: looking inside a run."""

from __future__ import annotations

import click

from ..analysis.inspect_config import EvaluateConfig, FeaturesConfig, HeadsConfig
from ..options import click_options, from_cli
from ._options import quiet_option, run_lock


def _open(run_dir: str):
    from ..runfolder import RunFolder

    return RunFolder(run_dir)


def _progress(quiet: bool):
    from ..progress import Progress

    return Progress(quiet=quiet)


@click.command("heads")
@click.argument("run", type=click.Path())
@click_options(HeadsConfig)
@quiet_option
def heads(run, quiet, **options) -> None:
    """Fit scikit-learn heads on the pooled features of trained model(s) of RUN and compare
    them with the network's own softmax head (accuracy per split, fit and predict time).

    Features are extracted once (streamed to RUN/features/<trial>/) and reused; heads
    are saved as RUN/heads/<trial>/<head>.pkl with a .json record (SHA-256,
    scikit-learn version, feature dimension, class order); the table goes to
    RUN/heads/<trial>/heads.md and heads.csv.

    \b
    transfer heads runs/digits --head rf,svm,logreg --rf-trees 500 --svm-c 10
    """
    from ..analysis.head_study import fit_heads, render_table

    cfg = from_cli(HeadsConfig, options)
    run_folder = _open(run)
    with run_lock(run, "heads"):
        rows = fit_heads(run_folder, cfg.trial, cfg.heads, cfg.params(), progress=_progress(quiet))
    for name in dict.fromkeys(r["trial"] for r in rows):
        click.echo(f"\n{name}  ->  {run_folder.heads_dir(name) / 'heads.md'}")
        click.echo(render_table([r for r in rows if r["trial"] == name]).rstrip())


@click.command("evaluate")
@click.argument("run", type=click.Path())
@click_options(EvaluateConfig)
@quiet_option
def evaluate(run, quiet, **options) -> None:
    """Per-class accuracy, precision, recall and F1 (macro and weighted averages), confusion
    matrix, a grid of random images and the most confidently wrong ones, into
    RUN/evaluate/<trial>/.

    With --unknown DIR: how well the run's calibrated bundle tells its test images from
    images of none of its classes -- for every unknown-input score the AUROC, the FPR at 95 %
    TPR, and at the bundle's threshold the share of unknown images it accepts, overall and per
    DIR (RUN/evaluate/<trial>/unknown.json).

    \b
    transfer evaluate runs/digits --trial all --split test --samples 16
    transfer evaluate runs/digits --unknown left_out/ --unknown noise/
    """
    from ..analysis.evaluate import evaluate as run_evaluate

    cfg = from_cli(EvaluateConfig, options)
    trial, split, bundle = cfg.trial, cfg.split, cfg.bundle
    run_folder = _open(run)
    if cfg.unknown:
        from ..analysis.unknown_study import evaluate_unknown_run, group_table, unknown_table
        from ..tables import markdown

        with run_lock(run, "evaluate"):
            res = evaluate_unknown_run(run_folder, cfg.unknown, bundle=bundle, progress=_progress(quiet))
        click.echo(f"\n{res['trial']}: {res['known']} known test image(s) vs {res['unknown']} unknown image(s)"
                   + (f" ({res['unreadable']} unreadable skipped)" if res["unreadable"] else ""))
        click.echo(markdown(*unknown_table(res)).rstrip())
        per_input = group_table(res)
        if per_input:
            click.echo("\n" + markdown(*per_input).rstrip())
        click.echo(f"default score: {res['default']} (chosen at export without test images); highest AUROC on these "
                   f"images: {res['highest_auroc']} (reported only) -> {res['out']}")
        return
    if bundle:
        from ..errors import ConfigError

        raise ConfigError("--bundle needs --unknown")
    with run_lock(run, "evaluate"):
        res = run_evaluate(run_folder, trial, split, samples=cfg.samples, seed=cfg.seed, progress=_progress(quiet))
    for name, r in res.items():
        click.echo(f"\n{name}  {split}: {r['images']} images, accuracy {r['accuracy']:.4f}, "
                   f"macro F1 {r['macro']['f1']:.4f}, weighted F1 {r['weighted']['f1']:.4f}")
        click.echo(r["per_class_md"].rstrip())
        click.echo(f"-> {run_folder.evaluate_dir(name)}  (metrics.json, per_class.csv/.md, confusion.csv/.png, "
                   "samples.png, wrong.png)")


@click.command("features")
@click.argument("run", type=click.Path())
@click_options(FeaturesConfig)
@quiet_option
def features(run, quiet, **options) -> None:
    """Extract (or reuse) the pooled features of trained model(s) of RUN into
    RUN/features/<trial>/ and optionally plot them coloured by class
    (RUN/plots/<trial>/features_<method>.png).

    \b
    transfer features runs/digits --plot tsne
    transfer features runs/digits --trial all --plot pca,tsne --split val
    """
    from ..analysis.features import SPLITS, extract_features, features_meta, plot_features, resolve_trials

    cfg = from_cli(FeaturesConfig, options)
    plots, split = cfg.plot or (), cfg.split
    progress = _progress(quiet)
    run_folder = _open(run)
    with run_lock(run, "features"):
        for t in resolve_trials(run_folder, cfg.trial):
            extract_features(run_folder, t.name, SPLITS, batch_size=cfg.batch_size, workers=cfg.workers,
                             force=cfg.force, progress=progress)
            meta = features_meta(run_folder, t.name)
            counts = ", ".join(f"{s} {meta['counts'].get(s, 0)}" for s in SPLITS)
            bad = sum(len(v) for v in meta.get("bad_files", {}).values())
            click.echo(f"{t.name}: {meta['feature_dim']}-d features ({counts}"
                       f"{f'; {bad} unreadable file(s) skipped' if bad else ''}) -> {run_folder.features_dir(t.name)}")
            for m in plots:
                out = plot_features(run_folder, t.name, m, split, cfg.max_points, progress=progress)
                click.echo(f"{t.name}: {m} plot of the {split} features -> {out}")


COMMANDS = [heads, evaluate, features]
