"""``transfer data audit``: duplicates, leakage across splits, label errors, outliers and image
quality of a folder, before training."""

from __future__ import annotations

import click

from ._options import quiet_option
from .data import data


@click.command("audit")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--run", type=click.Path(file_okay=False), default=None,
              help="A run of this folder: its trial gives the features, its splits the leakage check.")
@click.option("--trial", default="best", show_default=True, help="The run's trial (best or a name).")
@click.option("--backbone", default=None, help="Without --run: the backbone whose pooled features are used.")
@click.option("--weights", default=None, help="With --backbone: imagenet or a weights file. [default: imagenet]")
@click.option("--image-size", type=int, default=None, help="With --backbone: input side. [default: the backbone's]")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder. [default: RUN/audit, or FOLDER-audit beside FOLDER]")
@click.option("--near-threshold", type=float, default=None,
              help="Verification score (band-passed detail correlation, 0-1) from which two images are near "
                   "duplicates. [default: 0.96]")
@click.option("--folds", type=int, default=5, show_default=True,
              help="Folds of the heads cross-fitted for label issues; a class with fewer readable images is "
                   "not searched (a note says so).")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=int, default=2, show_default=True, help="Decoding threads.")
@click.option("--force", is_flag=True, help="Audit again even when no file changed.")
@quiet_option
def audit_cmd(folder, run, trial, backbone, weights, image_size, out, near_threshold, folds, batch_size, workers,
              force, quiet) -> None:
    """Audit FOLDER: exact and near duplicates (within a class, across classes, across the
    splits of --run or of FOLDER/train,val,test), likely label errors (confident learning on
    probabilities of models that never fit the judged label: for the images the run's trial
    trained on, heads cross-fitted on its initial weights' features and the pixels), outliers
    and image quality.

    Writes audit.csv, audit.json and audit.html (thumbnails per finding) into --out.

    \b
    transfer data audit data/fashion --run runs/fashion
    transfer data audit data/photos --backbone mobilenet_v2 --weights imagenet --out audit/
    """
    from ..analysis.audit import audit_folder
    from ..progress import Progress

    res = audit_folder(folder, run=run, trial=trial, backbone=backbone, weights=weights, image_size=image_size,
                       out=out, near_threshold=near_threshold, folds=folds, batch_size=batch_size, workers=workers,
                       force=force, progress=Progress(quiet=quiet))
    s = res.summary
    click.echo(f"{s['images']} images ({s['readable']} readable); {len(s['groups'])} duplicate group(s), "
               f"{s['leaking_groups']} across splits" + (" (unchanged since the last audit)" if res.reused else ""))
    click.echo(res.table.rstrip())
    if quiet:  # said while auditing otherwise
        for note in s.get("notes", []):
            click.echo(f"note: {note}")
    click.echo(f"-> {res.out / 'audit.html'}  (audit.csv, audit.json)")


data.add_command(audit_cmd)

COMMANDS: list = []  # attached to the `transfer data` group above
