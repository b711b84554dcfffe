"""The ``transfer`` command line: a thin click group.

Each area defines its commands in ``transfer.commands.<area>`` (a ``COMMANDS`` list);
command bodies parse options, build a config and make one library call. Heavy
dependencies (TensorFlow, TensorRT, Ray) are imported inside the command bodies, so
``transfer infer`` starts without TensorFlow.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import click

from . import __version__
from .errors import TransferError

#: the module of each top-level command: a command's module (and what it imports to declare its
#: options, e.g. the training config) is imported only when that command runs or help lists it, so
#: `transfer infer` on the TensorFlow-free base install never imports the trainer or the exporter
_COMMAND_OF = {"data": ("data",), "backbones": ("models",), "train": ("train",), "rank": ("train",),
               "heads": ("analysis",), "evaluate": ("analysis",), "features": ("analysis",),
               "gradcam": ("explain",), "resolution": ("explain",), "report": ("explain",),
               "export": ("export",), "verify": ("export",), "infer": ("runtime",), "bench": ("runtime",),
               "keygen": ("keys",), "sign": ("keys",), "serve": ("serve",)}


class TransferGroup(click.Group):
    """Click group that turns :class:`TransferError` into ``error: ...`` and an exit code, and
    imports a command's module only when the command is looked up (click's lazy subcommands)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(_COMMAND_OF) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str):
        if name not in self.commands:
            for module in _COMMAND_OF.get(name, ()):
                _load(module)
        return self.commands.get(name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TransferError as exc:
            if _debug(ctx):
                traceback.print_exc()
            flag = _flag_of(self, ctx, exc.option) if exc.option else None
            message = exc.message
            if flag and message.startswith(f"invalid {exc.option}: "):  # transfer.options' wording: the flag names it
                message = "invalid value " + message[len(f"invalid {exc.option}: "):]
            click.secho(f"error: {flag + ': ' if flag else ''}{message}", err=True, fg="red")
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(f"interrupted; {_INTERRUPTED.get(ctx.invoked_subcommand, 'nothing half-written is left')}",
                       err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `transfer infer ... | head`: the reader left; not an error of ours
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(1)
        except OSError as exc:  # a disk, permission or path problem outside the checked places
            if _debug(ctx):
                traceback.print_exc()
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            click.secho(f"error: {exc.strerror or exc}{where}", err=True, fg="red")
            click.echo("hint: check the path, free disk space and permissions; --debug shows where it happened",
                       err=True)
            ctx.exit(1)


def _flag_of(group: click.Group, ctx: click.Context, option: str) -> str | None:
    """The command-line flag (``--batch``) of the invoked command whose parameter is ``option``."""
    cmd = group.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
    todo = [cmd] if cmd is not None else []
    while todo:
        c = todo.pop()
        for p in c.params:
            if p.name == option and isinstance(p, click.Option):
                return max(p.opts, key=len)
            if p.name == option and isinstance(p, click.Argument):
                return p.human_readable_name
        if isinstance(c, click.Group):
            todo += [c.get_command(ctx, n) for n in c.list_commands(ctx)]
    return None


def _debug(ctx: click.Context) -> bool:
    return bool((ctx.obj or {}).get("debug")) or os.environ.get("TRANSFER_DEBUG") == "1"


#: what an interrupted command keeps (Ctrl-C)
_INTERRUPTED = {
    "train": "finished trials and epochs are kept (re-run the same command to resume)",
    "features": "finished work is kept (re-run the same command to resume)",
    "heads": "finished work is kept (re-run the same command to resume)",
    "export": "no bundle was written; an existing one is unchanged",
    "infer": "the rows predicted so far are kept in OUT.incomplete (with --out)",
}


@click.group(cls=TransferGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="transfer")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Transfer learning for image classification: train freeze sweeps, look inside,
    export verified ONNX / TensorRT bundles, infer and benchmark without TensorFlow.

    \b
    transfer data digits data/digits
    transfer train data/digits --backbone arc2,mobilenet_v2 --trainable 0,0.3,1 --out runs/digits
    transfer export runs/digits
    transfer infer runs/digits/bundle images/ --out preds.csv
    transfer bench runs/digits/bundle
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if debug and os.environ.get("TRANSFER_DEBUG") != "1":
        # lets lazily imported libraries log loudly; undone when the command ends so
        # in-process callers (tests, notebooks) do not inherit it
        os.environ["TRANSFER_DEBUG"] = "1"
        ctx.call_on_close(lambda: os.environ.pop("TRANSFER_DEBUG", None))


def _load(module: str) -> None:
    """Import ``transfer.commands.<module>`` and add its commands to the group (once)."""
    try:
        mod = importlib.import_module(f"{__package__}.commands.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.commands.{module}":
            return  # area not present in this build
        raise
    for cmd in getattr(mod, "COMMANDS", ()):
        if cmd.name not in cli.commands:
            cli.add_command(cmd)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="transfer")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
