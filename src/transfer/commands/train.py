"""``transfer train``: a freeze sweep over backbones x trainable fractions."""

from __future__ import annotations

import click

from ._options import parse_csv, quiet_option

# Every option named like a TrainConfig field feeds that field; only the comma lists need a cast.
_CASTS = {
    "backbones": lambda v: parse_csv(v, str, name="--backbone"),
    "trainable": lambda v: parse_csv(v, float, name="--trainable"),
    "augment": lambda v: parse_csv(v, str, name="--augment"),
}


def _overrides(ctx: click.Context, values: dict) -> dict:
    """The TrainConfig values the user gave on the command line (defaults come from the config)."""
    from ..trainer.config import ACCEPTED_KEYS

    out = {}
    for param, value in values.items():
        src = ctx.get_parameter_source(param)
        if param in ACCEPTED_KEYS and src is not None and src.name != "DEFAULT":
            out[param] = _CASTS.get(param, lambda v: v)(value)
    return out


@click.command("train")
@click.argument("data", type=click.Path(file_okay=False), required=False)
@click.option("--backbone", "backbones", metavar="A,B", help="Backbone name(s), comma-separated (see `transfer backbones`). [default: mobilenet_v2]")
@click.option("--trainable", metavar="F,..", help="Trainable fraction(s) of the backbone: 0 = frozen feature extractor, 1 = full fine-tuning. [default: 0]")
@click.option("--random-init", is_flag=True, help="Also train each backbone from random weights (everything trainable).")
@click.option("--freeze-by", type=click.Choice(["layers", "params", "blocks"]), help="What the fraction counts. [default: layers]")
@click.option("--weights", metavar="imagenet|none|PATH", help="Initial weights: ImageNet, none (random), or a Keras weights/model file. [default: imagenet]")
@click.option("--epochs", type=int, help="Epochs per trial (fine-tuning epochs with --two-stage). [default: 10]")
@click.option("--batch-size", type=int, help="[default: 32]")
@click.option("--image-size", type=int, help="Input size in pixels. [default: each backbone's own size]")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), help="[default: adam]")
@click.option("--lr", type=float, help="Learning rate. [default: 1e-3; 1e-4 when fine-tuning pretrained weights]")
@click.option("--fine-tune-lr", type=float, help="Learning rate of the unfreeze stage of --two-stage. [default: lr/10]")
@click.option("--loss", type=click.Choice(["crossentropy", "l1"]), help="[default: crossentropy]")
@click.option("--dropout", type=float, help="Dropout before the classifier. [default: 0.2]")
@click.option("--augment", metavar="A,B", help="Augmentations in the input pipeline, e.g. flip,translate.")
@click.option("--seed", type=int, help="Seed of splits, initial weights and training. [default: 0]")
@click.option("--split", type=click.Choice(["stratified", "random"]), help="[default: stratified]")
@click.option("--val", type=float, help="Validation fraction. [default: 0.2]")
@click.option("--test", type=float, help="Test fraction. [default: 0.1]")
@click.option("--kfold", type=int, help="Run every trial K times on K folds; the table shows mean ± std.")
@click.option("--patience", type=int, help="Early stopping on val_loss after this many epochs without improvement (0 = off). [default: 3]")
@click.option("--two-stage", is_flag=True, help="Train the head first, then unfreeze to the fraction with a lower learning rate.")
@click.option("--head-epochs", type=int, help="Head-only epochs of --two-stage. [default: 2]")
@click.option("--tensorboard", is_flag=True, help="Write TensorBoard logs into each trial folder.")
@click.option("--workers", type=int, help="Image decode threads. [default: 2]")
@click.option("--train-bn", is_flag=True, help="Let BatchNormalization layers of the trainable part update their statistics.")
@click.option("--no-cache", "cache", is_flag=True, flag_value=False, default=True,
              help="Run the frozen layers on every image in every epoch instead of caching their output once.")
@click.option("--no-lp-ft", "lp_ft", is_flag=True, flag_value=False, default=True,
              help="Start fine-tuning trials from a random head instead of the linear probe of the frozen backbone.")
@click.option("--augment-views", type=int,
              help="With --augment: cache this many augmented views of each training image (0: train uncached). "
                   "[default: 0]")
@click.option("--dedupe", is_flag=True,
              help="Keep every group of duplicate images (same pixels, or resized / re-compressed / slightly cropped "
                   "copies) on one side of train / val / test; a given split's val/test copies of train images are "
                   "left out. Without it, duplicates across the split are listed in RUN/duplicates.csv and warned about.")
@click.option("--allow-nested", is_flag=True,
              help="Accept images in sub-folders of a class folder as that class (refused by default).")
@click.option("--allow-case-clash", is_flag=True,
              help="Accept class folders whose names differ only in case (Cat/ and cat/) as two classes.")
@click.option("--strategy", type=click.Choice(["default", "mirrored"]),
              help="mirrored: each trial over all GPUs of the machine (tf.distribute.MirroredStrategy; "
                   "--batch-size stays global). [default: default]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of options; flags given on the command line win.")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (re-run the same command to resume).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run the trials as Ray tasks (pip install \"transfer[distributed]\"); see docs/distributed.md.")
@click.option("--address", metavar="HOST:PORT", help="Ray cluster to join with --ray. [default: start a local Ray]")
@click.option("--cpus-per-trial", type=float, default=1.0, show_default=True, help="Ray CPUs reserved per trial.")
@click.option("--gpus-per-trial", type=float, default=0.0, show_default=True, help="Ray GPUs reserved per trial.")
@quiet_option
@click.pass_context
def train(ctx: click.Context, data, config_file, use_ray, address, cpus_per_trial, gpus_per_trial, quiet,
          **kwargs) -> None:
    """Train a freeze sweep on the image folder DATA into the run folder --out.

    Every backbone x trainable fraction is one trial (plus --random-init); finished
    trials are skipped when the same command is run again, an interrupted one resumes
    from its last finished epoch.

    \b
    transfer data digits data/digits
    transfer train data/digits --backbone mobilenet_v2,arc2 --trainable 0,0.3,1 \\
        --random-init --weights none --epochs 5 --image-size 32 --out runs/digits
    """
    from ..errors import ConfigError
    from ..progress import Progress
    from ..trainer.config import load_config
    from ..trainer.sweep import run_sweep

    overrides = _overrides(ctx, kwargs)
    if data is not None:
        overrides["data"] = data
    cfg = load_config(config_file, overrides)
    if not cfg.data:
        raise ConfigError("no dataset folder given", hint="transfer train DATA --out RUN (or `data:` in --config)")
    if not cfg.out:
        raise ConfigError("no run folder given", hint="add --out RUN (or `out:` in --config)")
    ray_opts = None
    if use_ray:
        from ..trainer.distributed import RayOptions

        ray_opts = RayOptions(address=address, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
    else:
        for opt, param in (("--address", "address"), ("--cpus-per-trial", "cpus_per_trial"),
                           ("--gpus-per-trial", "gpus_per_trial")):
            src = ctx.get_parameter_source(param)
            if src is not None and src.name != "DEFAULT":
                raise ConfigError(f"{opt} needs --ray", hint="add --ray to run the trials as Ray tasks")
    res = run_sweep(cfg, progress=Progress(quiet=quiet), ray=ray_opts)
    click.echo("")
    click.echo(res.table_md.rstrip())
    if res.best:
        metric = res.best.get("metric", "val_accuracy").replace("_", " ")
        from ..runfolder import RunLayout

        click.echo(f"\nbest trial: {res.best['trial']} ({metric} {res.best['value']:.4f}) -> "
                   f"{RunLayout(res.run_dir).trial_paths(res.best['trial']).dir}")
    if res.failed:
        for name, err in res.failed.items():
            click.echo(f"failed trial {name}: {err}", err=True)
        from ..errors import TransferError

        raise TransferError(
            f"{len(res.failed)} trial(s) failed: {', '.join(res.failed)}",
            hint=f"see trials/<name>/status.json in {res.run_dir}; fix the cause and re-run the same command "
                 "(finished trials are kept)",
        )


COMMANDS = [train]
