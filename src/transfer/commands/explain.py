"""``transfer gradcam``, ``transfer resolution`` and ``transfer report``: looking inside a run."""

from __future__ import annotations

import click

from ..maps import BASELINES
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
@click.option("--samples", type=int, default=16, show_default=True,
              help="Without --images: how many random test images to explain (the faithfulness verdict "
                   "needs about 10 or more).")
@click.option("--method", default="gradcam", show_default=True, metavar="M[,M]",
              help="gradcam, gradcam++, scorecam (comma-separated) or all; with several, the report leads "
                   "with the one whose maps beat their control.")
@click.option("--layer", default=None,
              help="Target layer (any layer with a spatial output). [default: the trial's gradcam_layer, or the "
                   "last layer with a map of at least 6x6 cells when that one is coarser]")
@click.option("--class", "class_", default=None, metavar="C", help="Class to explain (name or index). [default: the predicted class]")
@click.option("--save-maps", is_flag=True, help="Also write each raw heatmap (input resolution) as <stem>.npy next to its overlay.")
@click.option("--steps", type=int, default=10, show_default=True, metavar="N",
              help="Points of the deletion / insertion curves minus one (0, 1/N, .., 100 % of the pixels); "
                   "ROAD removes 1/N .. (N-1)/N.")
@click.option("--baseline", type=click.Choice(BASELINES), default="median", show_default=True,
              help="What removed pixels become in the deletion / insertion curves: the image's median colour "
                   "(its background where one colour dominates), its mean colour, black, or the image blurred "
                   "(ROAD imputes them from their neighbours instead).")
@click.option("--control", type=click.Choice(["other", "shifted"]), default="other", show_default=True,
              help="Each map is tested against another image's map (other) or itself rolled by half the image "
                   "(shifted: rewards any map that lights the centre of centred images).")
@click.option("--controls", type=int, default=3, show_default=True, metavar="K",
              help="Control maps per image (other images' maps); the control's number is their median.")
@click.option("--control-class", type=click.Choice(["other", "any"]), default="other", show_default=True,
              help="Controls are maps of images explained as another class (other: on centred data a same-class "
                   "image's map is nearly this one's) or of any other image.")
@click.option("--road", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="ROAD (removal by imputation): auto = on for inputs up to 128x128 pixels (one sparse solve "
                   "per step and map, ~2 s at 224x224).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the sample choice, the controls and the ROAD noise.")
@click.option("--scorecam-channels", type=int, default=None, metavar="N",
              help="Score-CAM: score only the N most active channels (one forward pass each). [default: all]")
@quiet_option
def gradcam(run, image_args, trial, images, samples, method, layer, class_, save_maps, steps, baseline, control,
            controls, control_class, road, seed, scorecam_channels, quiet) -> None:
    """Grad-CAM heatmaps of a trained trial, flagged and tested for faithfulness.

    Writes overlays, a captioned grid.png, maps.csv and faithfulness.json into
    RUN/gradcam/<trial>/<method>/. For each map it measures the deletion and
    insertion areas (the explained class's probability as pixels are removed /
    put back in the map's order) and ROAD (removal by imputation from neighbouring
    pixels), each against a control: another image's map. It prints, per method,
    the numbers for the map and the control and the share of images where the map
    beats it, flags empty maps and maps that sit on the image border, and says
    which method's maps to trust on this model.

    \b
    transfer gradcam runs/digits --samples 16 --method all
    transfer gradcam runs/digits img1.png img2.png --class 3 --save-maps
    """
    from ..runfolder import RunFolder
    from ..analysis.gradcam import TABLE_LEGEND, explain_run, parse_methods

    methods = parse_methods(parse_csv(method, str, name="--method"))
    progress = _progress(quiet)
    names = [t.name for t in RunFolder(run).select(trial)] if trial != "best" else ["best"]
    for name in names:
        with run_lock(run, "gradcam"):
            res = explain_run(run, trial=name, images=list(images) + list(image_args) or None, samples=samples,
                              methods=methods, layer=layer, class_=class_, save_maps=save_maps, steps=steps,
                              baseline=baseline, control=control, controls=controls, control_class=control_class,
                              road=road, seed=seed,
                              scorecam_channels=scorecam_channels, progress=progress)
        click.echo(f"\n{res.trial}: faithfulness of the maps ({len(res.images)} images, layer {res.layer}); "
                   f"{TABLE_LEGEND}")
        if res.layer_note:
            click.echo(res.layer_note)
        click.echo(res.table)
        for line in res.verdict:
            click.echo(line)
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
