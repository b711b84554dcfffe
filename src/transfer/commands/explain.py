"""``transfer gradcam``, ``transfer resolution`` and ``transfer report``: looking inside a run."""

from __future__ import annotations

import click

from ._options import parse_csv, quiet_option, run_lock


def _progress(quiet: bool):
    from ..progress import Progress

    return Progress(quiet=quiet)


@click.command("gradcam")
@click.argument("run", type=click.Path(file_okay=False))
@click.argument("image_args", metavar="[IMAGES]...", nargs=-1, type=click.Path())
@click.option("--trial", default="best", show_default=True, help="Trial name(s), 'best' or 'all'.")
@click.option("--images", "images", multiple=True, type=click.Path(), metavar="PATH",
              help="Image file or folder to explain (repeatable; extra paths after RUN work too).")
@click.option("--samples", type=int, default=8, show_default=True,
              help="Without --images: how many random test images to explain.")
@click.option("--method", default="gradcam", show_default=True, metavar="M[,M]",
              help="gradcam, gradcam++, scorecam (comma-separated) or all.")
@click.option("--layer", default=None, help="Target layer (any layer with a spatial output). [default: the trial's gradcam_layer]")
@click.option("--class", "class_", default=None, metavar="C", help="Class to explain (name or index). [default: the predicted class]")
@click.option("--save-maps", is_flag=True, help="Also write each raw heatmap (input resolution) as <stem>.npy next to its overlay.")
@click.option("--fractions", default="0.1,0.2,0.5", show_default=True, metavar="F,..",
              help="Shares of the pixels masked by the faithfulness metric.")
@click.option("--baseline", type=click.Choice(["mean", "zero"]), default="mean", show_default=True,
              help="Value masked pixels get: the image's mean colour or black.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample choice and random masks.")
@click.option("--scorecam-channels", type=int, default=None, metavar="N",
              help="Score-CAM: score only the N most active channels (one forward pass each). [default: all]")
@quiet_option
def gradcam(run, image_args, trial, images, samples, method, layer, class_, save_maps, fractions, baseline,
            seed, scorecam_channels, quiet) -> None:
    """Grad-CAM heatmaps of a trained trial, with a faithfulness number.

    Writes overlays, a captioned grid.png and faithfulness.json into
    RUN/gradcam/<trial>/<method>/, and prints the confidence drop of the explained
    class when the most highlighted 10/20/50 % of the pixels are masked, against
    masking the same share at random.

    \b
    transfer gradcam runs/digits --samples 8 --method gradcam,gradcam++,scorecam
    transfer gradcam runs/digits img1.png img2.png --class 3 --save-maps
    """
    from ..runfolder import RunFolder
    from ..analysis.gradcam import explain_run, parse_methods

    methods = parse_methods(parse_csv(method, str, name="--method"))
    fractions = parse_csv(fractions, float, name="--fractions")
    progress = _progress(quiet)
    names = [t.name for t in RunFolder(run).select(trial)] if trial != "best" else ["best"]
    for name in names:
        with run_lock(run, "gradcam"):
            res = explain_run(run, trial=name, images=list(images) + list(image_args) or None, samples=samples,
                              methods=methods, layer=layer, class_=class_, save_maps=save_maps, fractions=fractions,
                              baseline=baseline, seed=seed, scorecam_channels=scorecam_channels, progress=progress)
        click.echo(f"\n{res.trial}: faithfulness ({len(res.images)} images, layer {res.layer}): "
                   "confidence drop of the explained class, cam / random")
        click.echo(res.table)
        click.echo(f"written to {res.out_dir}")


@click.command("resolution")
@click.argument("run", type=click.Path(file_okay=False))
@click.option("--sizes", default="32,16,8", show_default=True, metavar="K,..", help="Image sides in pixels.")
@click.option("--mode", type=click.Choice(["totv", "tvtv"]), default="totv", show_default=True,
              help="totv: the trained model on test images reduced to each size; tvtv: train and test at each size.")
@click.option("--trial", default="best", show_default=True, help="Trial name or 'best'.")
@quiet_option
def resolution(run, sizes, mode, trial, quiet) -> None:
    """Accuracy, precision and F1 per input resolution: train once and test on images reduced
    to each size (totv), or train and test at each size (tvtv).

    Writes RUN/resolution/<mode>.{csv,md,json,png} and <mode>_per_class.csv. TVTV
    trains one model per size into RUN/resolution/tvtv/size<k>/ (re-run to resume).

    \b
    transfer resolution runs/fashion --sizes 32,16,8 --mode totv
    transfer resolution runs/fashion --sizes 32,16,8 --mode tvtv
    """
    from ..analysis.resolution import parse_sizes, resolution_study

    with run_lock(run, "resolution"):
        res = resolution_study(run, sizes=parse_sizes(parse_csv(sizes, str, name="--sizes")), mode=mode,
                               trial=trial, progress=_progress(quiet))
    click.echo("")
    click.echo(res.table_md.rstrip())
    click.echo(f"\nwritten to {res.files[0].parent}")


@click.command("report")
@click.argument("run", type=click.Path(file_okay=False))
def report(run) -> None:
    """One self-contained HTML page (and Markdown) gathering everything about a run.

    Reads what train, heads, evaluate, gradcam, features and resolution wrote; a
    missing section names the command that makes it. Writes RUN/report.html and
    RUN/report.md.

    \b
    transfer report runs/digits && xdg-open runs/digits/report.html
    """
    from ..analysis.report import write_report

    out = write_report(run)
    click.echo(f"wrote {out['html']} and {out['md']}")
    click.echo(f"sections: {', '.join(out['present']) or '(none)'}")
    if out["missing"]:
        click.echo(f"missing: {', '.join(out['missing'])} (the report names the command for each)")


COMMANDS = [gradcam, resolution, report]
