"""``transfer heads``, ``transfer evaluate``, ``transfer features``: looking inside a run."""

from __future__ import annotations

import click

from ._options import parse_csv, quiet_option, run_lock


def _open(run_dir: str):
    from ..runfolder import RunFolder

    return RunFolder(run_dir)


def _progress(quiet: bool):
    from ..progress import Progress

    return Progress(quiet=quiet)


@click.command("heads")
@click.argument("run", type=click.Path())
@click.option("--trial", default="best", show_default=True, help="best | all | a trial name (comma-separated names).")
@click.option("--head", "heads", default="rf,svm,logreg", show_default=True, metavar="H,..",
              help="Classical heads to fit: rf, svm, logreg, knn.")
# each flag's parameter is named <kind>_<estimator parameter> (classical_heads.param_option), so an error
# about that parameter is shown with its flag
@click.option("--rf-trees", "rf_n_estimators", type=int, help="RandomForest: number of trees. [default: 200]")
@click.option("--rf-depth", "rf_max_depth", type=int, help="RandomForest: maximum depth. [default: unlimited]")
@click.option("--rf-jobs", "rf_n_jobs", type=int, help="RandomForest: parallel jobs (-1 = all cores). [default: -1]")
@click.option("--svm-c", "svm_c", type=float, help="SVM: regularization C. [default: 1.0]")
@click.option("--svm-kernel", type=click.Choice(["rbf", "linear", "poly", "sigmoid"]), help="SVM kernel. [default: rbf]")
@click.option("--logreg-c", "logreg_c", type=float, help="Logistic regression: inverse regularization C. [default: 1.0]")
@click.option("--logreg-max-iter", type=int, help="Logistic regression: iterations. [default: 1000]")
@click.option("--knn-k", "knn_n_neighbors", type=int, help="k-NN: neighbours. [default: 5]")
@click.option("--seed", type=int, help="random_state of rf / svm / logreg. [default: 0]")
@quiet_option
def heads(run, trial, heads, rf_n_estimators, rf_max_depth, rf_n_jobs, svm_c, svm_kernel, logreg_c, logreg_max_iter,
          knn_n_neighbors, seed, quiet) -> None:
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
    from ..classical_heads import check_kinds

    kinds = check_kinds(parse_csv(heads, str, name="--head"))
    given = {("rf", "n_estimators"): rf_n_estimators, ("rf", "max_depth"): rf_max_depth, ("rf", "n_jobs"): rf_n_jobs,
             ("svm", "C"): svm_c, ("svm", "kernel"): svm_kernel, ("logreg", "C"): logreg_c,
             ("logreg", "max_iter"): logreg_max_iter, ("knn", "n_neighbors"): knn_n_neighbors}
    if seed is not None:
        given.update({(k, "random_state"): seed for k in ("rf", "svm", "logreg")})
    params: dict[str, dict] = {}
    for (kind, key), value in given.items():
        if value is not None and kind in kinds:
            params.setdefault(kind, {})[key] = value
    run_folder = _open(run)
    with run_lock(run, "heads"):
        rows = fit_heads(run_folder, trial, kinds, params, progress=_progress(quiet))
    for name in dict.fromkeys(r["trial"] for r in rows):
        click.echo(f"\n{name}  ->  {run_folder.heads_dir(name) / 'heads.md'}")
        click.echo(render_table([r for r in rows if r["trial"] == name]).rstrip())


@click.command("evaluate")
@click.argument("run", type=click.Path())
@click.option("--trial", default="best", show_default=True, help="best | all | a trial name (comma-separated names).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--samples", default=16, show_default=True, type=int,
              help="Images in the random grid (and at most as many most confidently wrong images).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random image pick.")
@click.option("--unknown", "unknown", multiple=True, type=click.Path(exists=True), metavar="DIR",
              help="Images of none of the classes (repeatable): score the bundle's unknown-input detection "
                   "against the test split instead (AUROC, false accepts at its threshold).")
@click.option("--bundle", type=click.Path(), help="With --unknown: the bundle. [default: RUN/bundle]")
@quiet_option
def evaluate(run, trial, split, samples, seed, unknown, bundle, quiet) -> None:
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

    run_folder = _open(run)
    if unknown:
        from ..analysis.unknown_study import evaluate_unknown_run, group_table, unknown_table
        from ..tables import markdown

        with run_lock(run, "evaluate"):
            res = evaluate_unknown_run(run_folder, unknown, bundle=bundle, progress=_progress(quiet))
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
        res = run_evaluate(run_folder, trial, split, samples=samples, seed=seed, progress=_progress(quiet))
    for name, r in res.items():
        click.echo(f"\n{name}  {split}: {r['images']} images, accuracy {r['accuracy']:.4f}, "
                   f"macro F1 {r['macro']['f1']:.4f}, weighted F1 {r['weighted']['f1']:.4f}")
        click.echo(r["per_class_md"].rstrip())
        click.echo(f"-> {run_folder.evaluate_dir(name)}  (metrics.json, per_class.csv/.md, confusion.csv/.png, "
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
    from ..analysis.features import (SPLITS, check_plot_methods, extract_features, features_meta, plot_features,
                                     resolve_trials)

    plots = check_plot_methods(parse_csv(methods, str, name="--plot")) if methods else []
    progress = _progress(quiet)
    run_folder = _open(run)
    with run_lock(run, "features"):
        for t in resolve_trials(run_folder, trial):
            extract_features(run_folder, t.name, SPLITS, batch_size=batch_size, workers=workers, force=force,
                             progress=progress)
            meta = features_meta(run_folder, t.name)
            counts = ", ".join(f"{s} {meta['counts'].get(s, 0)}" for s in SPLITS)
            bad = sum(len(v) for v in meta.get("bad_files", {}).values())
            click.echo(f"{t.name}: {meta['feature_dim']}-d features ({counts}"
                       f"{f'; {bad} unreadable file(s) skipped' if bad else ''}) -> {run_folder.features_dir(t.name)}")
            for m in plots:
                out = plot_features(run_folder, t.name, m, split, max_points, progress=progress)
                click.echo(f"{t.name}: {m} plot of the {split} features -> {out}")


COMMANDS = [heads, evaluate, features]
