"""Shared click option helpers."""

from __future__ import annotations

import click

from ..errors import ConfigError


def parse_csv(value: str | None, cast=str, *, name: str = "value") -> list:
    """Split ``"a,b,c"`` into a list, casting each item; a clear error for bad items."""
    if value is None:
        return []
    out = []
    for item in str(value).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(cast(item))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: cannot read {item!r} as {cast.__name__}") from exc
    return out


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="Print only results and errors.")(f)


def run_lock(run: str, purpose: str):
    """Hold the run folder's lock while a command writes into it (:mod:`transfer.locks`): a
    second writer (a resumed ``transfer train``, another analysis command) exits 1 naming it."""
    from ..locks import locked

    return locked(run, purpose=purpose)
