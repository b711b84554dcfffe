"""``transfer heads``, ``transfer evaluate``, ``transfer features``: looking inside a run."""

from __future__ import annotations

import click

from ._options import parse_csv, quiet_option


def _echo(quiet: bool):
    return None if quiet else click.echo


def _open(run_dir: str):
    from ..runfolder import RunFolder

    return RunFolder(run_dir)


@click.command("heads")
@click.argument("run", type=click.Path())
@click.option("--trial", default="best", show_default=True, help="best | all | a trial name (comma-separated names).")
@click.option("--head", "heads", default="rf,svm,logreg", show_default=True, metavar="H,..",
              help="Classical heads to fit: rf, svm, logreg, knn.")
@click.option("--rf-trees", type=int, help="RandomForest: number of trees. [default: 200]")
@click.option("--rf-depth", type=int, help="RandomForest: maximum depth. [default: unlimited]")
@click.option("--rf-jobs", type=int, help="RandomForest: parallel jobs (-1 = all cores). [default: -1]")
@click.option("--svm-c", type=float, help="SVM: regularization C. [default: 1.0]")
@click.option("--svm-kernel", type=click.Choice(["rbf", "linear", "poly", "sigmoid"]), help="SVM kernel. [default: rbf]")
@click.option("--logreg-c", type=float, help="Logistic regression: inverse regularization C. [default: 1.0]")
@click.option("--logreg-max-iter", type=int, help="Logistic regression: iterations. [default: 1000]")
@click.option("--knn-k", type=int, help="k-NN: neighbours. [default: 5]")
@click.option("--seed", type=int, help="random_state of rf / svm / logreg. [default: 0]")
@quiet_option
def heads(run, trial, heads, rf_trees, rf_depth, rf_jobs, svm_c, svm_kernel, logreg_c, logreg_max_iter, knn_k,
          seed, quiet) -> None:
    """Fit scikit-learn heads on the pooled features of trained model(s) of RUN and compare
    them with the network's own softmax head (accuracy per split, fit and predict time).

    Features are extracted once (streamed to RUN/features/<trial>/) and reused; heads
    are saved as RUN/heads/<trial>/<head>.pkl with a .json record (SHA-256,
    scikit-learn version, feature dimension, class order); the table goes to
    RUN/heads/<trial>/heads.md and heads.csv.

    \b
    transfer heads runs/digits --head rf,svm,logreg --rf-trees 500 --svm-c 10
    """
    from ..analysis.heads import check_kinds, fit_heads, render_table

    kinds = check_kinds(parse_csv(heads, str, name="--head"))
    params: dict[str, dict] = {}

    def put(kind, key, value):
        if value is not None:
            params.setdefault(kind, {})[key] = value

    put("rf", "n_estimators", rf_trees)
    put("rf", "max_depth", rf_depth)
    put("rf", "n_jobs", rf_jobs)
    put("svm", "C", svm_c)
    put("svm", "kernel", svm_kernel)
    put("logreg", "C", logreg_c)
    put("logreg", "max_iter", logreg_max_iter)
    put("knn", "n_neighbors", knn_k)
    if seed is not None:
        for k in ("rf", "svm", "logreg"):
            put(k, "random_state", seed)
    params = {k: v for k, v in params.items() if k in kinds}
    rf = _open(run)
    rows = fit_heads(rf, trial, kinds, params, progress=_echo(quiet))
    for name in dict.fromkeys(r["trial"] for r in rows):
        click.echo(f"\n{name}  ->  {rf.path / 'heads' / name / 'heads.md'}")
        click.echo(render_table([r for r in rows if r["trial"] == name]).rstrip())


@click.command("evaluate")
@click.argument("run", type=click.Path())
@click.option("--trial", default="best", show_default=True, help="best | all | a trial name (comma-separated names).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--samples", default=16, show_default=True, type=int,
              help="Images in the random grid (and at most as many most confidently wrong images).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random image pick.")
@quiet_option
def evaluate(run, trial, split, samples, seed, quiet) -> None:
    """Per-class accuracy, precision, recall and F1 (macro and weighted averages), confusion
    matrix, a grid of random images and the most confidently wrong ones, into
    RUN/evaluate/<trial>/.

    \b
    transfer evaluate runs/digits --trial all --split test --samples 16
    """
    from ..analysis.evaluate import evaluate as run_evaluate

    rf = _open(run)
    res = run_evaluate(rf, trial, split, samples=samples, seed=seed, progress=_echo(quiet))
    for name, r in res.items():
        click.echo(f"\n{name}  {split}: {r['images']} images, accuracy {r['accuracy']:.4f}, "
                   f"macro F1 {r['macro']['f1']:.4f}, weighted F1 {r['weighted']['f1']:.4f}")
        click.echo(r["per_class_md"].rstrip())
        click.echo(f"-> {rf.path / 'evaluate' / name}  (metrics.json, per_class.csv/.md, confusion.csv/.png, "
                   "samples.png, wrong.png)")


@click.command("features")
@click.argument("run", type=click.Path())
@click.option("--trial", default="best", show_default=True, help="best | all | a trial name (comma-separated names).")
@click.option("--plot", "methods", metavar="pca|tsne", help="Also write a 2-D scatter of the features (pca, tsne or both: pca,tsne).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="Split whose features are plotted.")
@click.option("--max-points", default=2000, show_default=True, type=int, help="At most this many points in the plot.")
@click.option("--force", is_flag=True, help="Re-extract even when the cache matches the model.")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="Image decode threads.")
@quiet_option
def features(run, trial, methods, split, max_points, force, batch_size, workers, quiet) -> None:
    """Extract (or reuse) the pooled features of trained model(s) of RUN into
    RUN/features/<trial>/ and optionally plot them coloured by class
    (RUN/plots/<trial>/features_<method>.png).

    \b
    transfer features runs/digits --plot tsne
    transfer features runs/digits --trial all --plot pca,tsne --split val
    """
    from ..errors import ConfigError
    from ..analysis.features import PLOT_METHODS, SPLITS, extract_features, features_meta, plot_features, resolve_trials

    plots = parse_csv(methods, str, name="--plot") if methods else []
    for m in plots:
        if m.lower() not in PLOT_METHODS:
            raise ConfigError(f"--plot: unknown method {m!r}; accepted: {', '.join(PLOT_METHODS)}")
    rf = _open(run)
    for t in resolve_trials(rf, trial):
        extract_features(rf, t.name, SPLITS, batch_size=batch_size, workers=workers, force=force,
                         progress=_echo(quiet))
        meta = features_meta(rf, t.name)
        counts = ", ".join(f"{s} {meta['counts'].get(s, 0)}" for s in SPLITS)
        bad = sum(len(v) for v in meta.get("bad_files", {}).values())
        click.echo(f"{t.name}: {meta['feature_dim']}-d features ({counts}"
                   f"{f'; {bad} unreadable file(s) skipped' if bad else ''}) -> {rf.path / 'features' / t.name}")
        for m in plots:
            out = plot_features(rf, t.name, m.lower(), split, max_points)
            click.echo(f"{t.name}: {m.lower()} plot of the {split} features -> {out}")


COMMANDS = [heads, evaluate, features]
