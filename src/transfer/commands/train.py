"""``transfer train``: a freeze sweep over backbones x trainable fractions."""

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
    from ..trainer.config import load_config
    from ..trainer.sweep import run_sweep

    ray_given = {k: kwargs.pop(k) for k in ("address", "cpus_per_trial", "gpus_per_trial")}
    overrides = given(kwargs)
    if data is not None:
        overrides["data"] = data
    cfg = load_config(config_file, overrides)
    if not cfg.data:
        raise ConfigError("no dataset folder given", hint="transfer train DATA --out RUN (or `data:` in --config)")
    if not cfg.out:
        raise ConfigError("no run folder given", hint="add --out RUN (or `out:` in --config)")
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


COMMANDS = [train]
