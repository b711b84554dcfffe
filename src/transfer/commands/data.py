"""``transfer data``: make image folders from real datasets, check a folder and audit it (duplicates,
leakage across splits, label errors, outliers and image quality, before training)."""

from __future__ import annotations

from dataclasses import dataclass

import click

from ..analysis.audit_config import AuditConfig
from ..errors import DataError
from ..options import Check, Flag, Interval, click_options, from_cli, items, option, validate
from ._options import quiet_option


@click.group("data")
def data() -> None:
    """Make image-folder datasets and check them.

    \b
    transfer data digits data/digits
    transfer data shapes data/shapes --images 6000 --size 64
    transfer data idx train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz data/fmnist --classes fashion-mnist
    transfer data check data/digits
    """


@data.command("digits")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
def digits_cmd(out: str, force: bool) -> None:
    """Write scikit-learn's 1,797 handwritten digits (8x8 PNG) as OUT/<digit>/*.png."""
    from ..data.datasets import write_digits

    info = write_digits(out, overwrite=force)
    click.echo(f"wrote {info['images']} images in {info['classes']} classes to {info['out']}")


@data.command("shapes")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--images", type=click.IntRange(min=8), default=6000, show_default=True, help="Number of images.")
@click.option("--size", type=click.IntRange(min=16), default=64, show_default=True, help="Side of each image in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shapes, places and colours.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
def shapes_cmd(out: str, images: int, size: int, seed: int, force: bool) -> None:
    """Write synthetic images of one shape each (circle, square, triangle, cross) as OUT/<shape>/*.png.

    Each shape has a random colour, place and size on a noisy background; where it is goes
    to OUT/.boxes.csv (path,y0,x0,y1,x1), so where a model looks can be checked.
    """
    from ..data.datasets import write_shapes

    info = write_shapes(out, images=images, size=size, seed=seed, overwrite=force)
    click.echo(f"wrote {info['images']} images in {info['classes']} classes to {info['out']} "
               f"(shape boxes: {info['boxes']})")


def _class_names(value) -> tuple:
    """``--classes``: a preset's names, or the comma-separated names as given."""
    from ..data.datasets import FASHION_MNIST_CLASSES, MNIST_CLASSES

    presets = {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES}
    if isinstance(value, str) and value.strip().lower() in presets:
        return tuple(presets[value.strip().lower()])
    return tuple(items(value))


@dataclass(frozen=True)
class IdxOptions:
    """``transfer data idx``'s options (the folder names are checked further by
    :func:`transfer.data.datasets.write_idx`: no hidden or split names)."""

    classes: tuple | None = option(
        None, Check(lambda v: isinstance(v, tuple) and len(v) >= 2 and len(set(v)) == len(v),
                    "a preset (fashion-mnist, mnist) or two or more different comma-separated names, one per "
                    "label value", read=_class_names),
        "Folder name per label: 'fashion-mnist', 'mnist' or 'a,b,c,...' [default: the label number].", none=True)
    limit: int | None = option(None, Interval(int, 1), "Convert only the first N images.", none=True)
    force: bool = option(False, Flag(), "Replace OUT if it exists and is not empty.")

    def __post_init__(self) -> None:
        validate(self)


@data.command("idx")
@click.argument("images", type=click.Path(dir_okay=False))
@click.argument("labels", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click_options(IdxOptions)
def idx_cmd(images: str, labels: str, out: str, **options) -> None:
    """Convert an MNIST-format idx pair (plain or .gz) into OUT/<class>/*.png."""
    from ..data.datasets import write_idx

    o = from_cli(IdxOptions, options)
    info = write_idx(images, labels, out, class_names=None if o.classes is None else list(o.classes), limit=o.limit,
                     overwrite=o.force)
    click.echo(f"wrote {info['images']} images in {info['classes']} classes to {info['out']}")


@data.command("check")
@click.argument("folder", type=click.Path())
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Decoding threads.")
@click.option("--bad-csv", type=click.Path(dir_okay=False), default=None,
              help="Also write the bad files (path,reason) to this CSV.")
@click.option("--allow-nested", is_flag=True,
              help="Accept images in sub-folders of a class folder as that class (else listed as a problem).")
@click.option("--allow-case-clash", is_flag=True,
              help="Accept class folders whose names differ only in case as different classes.")
@quiet_option
def check_cmd(folder: str, workers: int | None, bad_csv: str | None, allow_nested: bool, allow_case_clash: bool,
              quiet: bool) -> None:
    """Index FOLDER, decode every image, print per-class counts and the bad files.

    Exits non-zero when the folder cannot be trained as is (e.g. a class without a usable
    image, images in sub-folders of a class, class names differing only in case), after
    listing what is wrong.
    """
    from ..data.folder import index_folder, write_bad_files_csv
    from ..progress import Progress

    idx = index_folder(folder, workers=workers, strict=False, allow_nested=allow_nested,
                       allow_case_clash=allow_case_clash, progress=Progress(quiet=quiet))
    width = max([len("class"), *(len(c) for c in idx.class_names)])
    if idx.given_splits is not None:
        splits = [s for s in ("train", "val", "test")]
        per = {s: [0] * len(idx.class_names) for s in splits}
        for s in splits:
            for smp in idx.given_splits[s]:
                per[s][smp.label] += 1
        click.echo(f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in splits) + f"  {'total':>7}")
        for i, c in enumerate(idx.class_names):
            row = [per[s][i] for s in splits]
            click.echo(f"{c:<{width}}  " + "  ".join(f"{n:>7}" for n in row) + f"  {sum(row):>7}")
    else:
        click.echo(f"{'class':<{width}}  {'images':>7}")
        for c in idx.class_names:
            click.echo(f"{c:<{width}}  {idx.counts[c]:>7}")
    if idx.bad:
        click.echo("bad files:")
        for b in idx.bad:
            click.echo(f"  {b.path}: {b.reason}")
        click.secho(f"warning: {len(idx.bad)} bad file(s) excluded", fg="yellow", err=True)
    if idx.ignored:
        groups: dict[tuple[str, bool], list[str]] = {}
        for b in idx.ignored:
            groups.setdefault((b.reason, "/" not in b.path), []).append(b.path)
        for (reason, in_root), paths in groups.items():
            where = "in the data root " if in_root else ""
            more = f", ... ({len(paths) - 3} more)" if len(paths) > 3 else ""
            click.echo(f"note: {len(paths)} file(s) {where}ignored ({reason}): {', '.join(paths[:3])}{more}")
    for w in idx.warnings:
        click.secho(f"warning: {w}", fg="yellow", err=True)
    if bad_csv:
        write_bad_files_csv(bad_csv, idx.bad)
    layout = "given train/val/test split" if idx.given_splits is not None else "one folder per class"
    ignored = f", {len(idx.ignored)} ignored" if idx.ignored else ""
    click.echo(f"{idx.root}: {len(idx.samples)} images in {len(idx.class_names)} classes "
               f"({layout}), {len(idx.bad)} bad{ignored}")
    if idx.problems:
        raise DataError(f"{idx.root} cannot be trained as is:\n  " + "\n  ".join(idx.problems),
                        hint="fix the folders named above (the bad files are listed"
                             + (f" and in {bad_csv}" if bad_csv else "; --bad-csv writes them to a file") + ")")


@data.command("audit")
@click.argument("folder", type=click.Path(file_okay=False))
@click_options(AuditConfig)
@quiet_option
def audit_cmd(folder, quiet, **options) -> None:
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

    res = audit_folder(folder, from_cli(AuditConfig, options), progress=Progress(quiet=quiet))
    s = res.summary
    click.echo(f"{s['images']} images ({s['readable']} readable); {len(s['groups'])} duplicate group(s), "
               f"{s['leaking_groups']} across splits" + (" (unchanged since the last audit)" if res.reused else ""))
    click.echo(res.table.rstrip())
    if quiet:  # said while auditing otherwise
        for note in s.get("notes", []):
            click.echo(f"note: {note}")
    click.echo(f"-> {res.out / 'audit.html'}  (audit.csv, audit.json)")


COMMANDS = [data]
