"""``transfer gradcam``, ``transfer resolution`` and ``transfer report``: looking inside a run."""

from __future__ import annotations

import click

from ..analysis.gradcam_config import GradcamConfig
from ..options import click_options, from_cli, replace
from ._options import parse_csv, quiet_option, run_lock


def _progress(quiet: bool):
    from ..progress import Progress

    return Progress(quiet=quiet)


@click.command("gradcam")
@click.argument("run", type=click.Path(file_okay=False))
@click.argument("image_args", metavar="[IMAGES]...", nargs=-1, type=click.Path())
@click_options(GradcamConfig)
@quiet_option
def gradcam(run, image_args, quiet, **options) -> None:
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
    from ..analysis.cam_verdict import TABLE_LEGEND
    from ..analysis.gradcam_run import explain_run
    from ..runfolder import RunFolder

    cfg = from_cli(GradcamConfig, options)
    if image_args:
        cfg = replace(cfg, images=cfg.images + tuple(image_args))
    progress = _progress(quiet)
    names = [t.name for t in RunFolder(run).select(cfg.trial)] if cfg.trial != "best" else ["best"]
    for name in names:
        with run_lock(run, "gradcam"):
            res = explain_run(run, replace(cfg, trial=name), progress=progress)
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
