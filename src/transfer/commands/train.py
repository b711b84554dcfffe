"""``transfer train``: a freeze sweep over backbones x trainable fractions; ``transfer rank``: the
candidate backbones ranked before any training (LogME + linear probe)."""

from __future__ import annotations

import click

from ..options import click_options, from_cli, given
from ..trainer.config import TrainConfig
from ..trainer.distributed import RayOptions
from ._options import quiet_option


@click.command("train")
@click.argument("data", type=click.Path(file_okay=False), required=False)
@click_options(TrainConfig)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of options; flags given on the command line win.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run the trials as Ray tasks (pip install \"transfer[distributed]\"); see docs/distributed.md.")
@click_options(RayOptions)
@quiet_option
def train(data, config_file, use_ray, quiet, **kwargs) -> None:
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
    from ..trainer.sweep import run_sweep

    ray_given = {k: kwargs.pop(k) for k in ("address", "cpus_per_trial", "gpus_per_trial")}
    cfg = _config(data, config_file, given(kwargs), data_hint="transfer train DATA --out RUN (or `data:` in --config)",
                  out_hint="add --out RUN (or `out:` in --config)")
    ray_opts = from_cli(RayOptions, ray_given) if use_ray else None
    if not use_ray and given(ray_given):
        flag = "--" + next(iter(given(ray_given))).replace("_", "-")
        raise ConfigError(f"{flag} needs --ray", hint="add --ray to run the trials as Ray tasks")
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


#: the options of ``transfer train`` that decide what ``transfer rank`` scores (the run folder, the
#: split, the backbones and their initial weights, the input size, the data pipeline)
RANK_OPTIONS = ("out", "backbones", "weights", "image_size", "batch_size", "seed", "split", "val", "test", "kfold",
                "dedupe", "workers", "cache", "allow_nested", "allow_case_clash")


@click.command("rank")
@click.argument("data", type=click.Path(file_okay=False), required=False)
@click_options(TrainConfig, only=RANK_OPTIONS)
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML file of `transfer train` options (those above are read; flags given on the command line win).")
@quiet_option
def rank(data, config_file, quiet, **kwargs) -> None:
    """Rank candidate backbones for the image folder DATA before training any of them.

    Each backbone's pooled features at its initial weights (the frozen-prefix cache a sweep
    builds anyway) get a LogME score (You et al., ICML 2021: how well a Bayesian linear model
    explains the labels from them; higher is better) on the training images, and a converged
    linear probe, whose validation accuracy is printed beside it. The run folder --out is
    prepared as `transfer train` prepares it (the same split and initial weights); a sweep
    trained into it afterwards reuses the caches and probes.

    \b
    transfer rank data/target --backbone mobilenet_v2,arc2,arc3 \\
        --weights mobilenet_v2=runs/pre/trials/mobilenet_v2-t100/model.keras --image-size 64 --out runs/target
    transfer train data/target --backbone mobilenet_v2 ... --schedule halving --out runs/target
    """
    from ..progress import Progress
    from ..trainer.rank import rank_backbones

    cfg = _config(data, config_file, given(kwargs), data_hint="transfer rank DATA --backbone A,B --out RUN",
                  out_hint="add --out RUN (the folder a later `transfer train` uses)")
    res = rank_backbones(cfg, progress=Progress(quiet=quiet))
    click.echo("")
    click.echo(res.table_md.rstrip())
    if res.backbones:
        from ..runfolder import RunLayout

        best = res.backbones[0]
        click.echo(f"\nbest by LogME: {best.backbone} ({best.logme:.4f}); {res.seconds:.0f} s -> "
                   f"{RunLayout(res.run_dir).rank_md}")


COMMANDS = [train, rank]


def _config(data, config_file, overrides: dict, *, data_hint: str, out_hint: str):
    """The training config of ``--config`` with the flags the user typed (and DATA) laid over it;
    a dataset and a run folder are required."""
    from ..errors import ConfigError
    from ..trainer.config import load_config

    if data is not None:
        overrides["data"] = data
    cfg = load_config(config_file, overrides)
    if not cfg.data:
        raise ConfigError("no dataset folder given", hint=data_hint)
    if not cfg.out:
        raise ConfigError("no run folder given", hint=out_hint)
    return cfg
