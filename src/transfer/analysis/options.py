"""Validating the values analysis functions take: lists of names, sizes, counts.

Commands split comma lists with :func:`transfer.commands._options.parse_csv`; library
functions take lists and check them here, so every "unknown X; accepted: ..." message
reads the same. A plain string is read as one comma list, for callers in Python.

Errors are :class:`~transfer.errors.ConfigError` naming the library parameter
(``option=``); the CLI prefixes the flag that feeds it.

Example::

    check_choices(["rf", "svm"], ("rf", "svm", "logreg"), "head", option="heads")   # ['rf', 'svm']
    check_list("32,16,8", "size", convert=positive_int)                           # [32, 16, 8]
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError


def items(values: str | Iterable[Any] | None) -> list[str]:
    """The non-empty, stripped items of a list (a string is one comma list)."""
    if values is None:
        return []
    raw = values.split(",") if isinstance(values, str) else list(values)
    return [s for s in (str(v).strip() for v in raw) if s]


def check_list(values: str | Iterable[Any] | None, what: str, *, convert: Callable[[str], Any],
               option: str | None = None, hint: str | None = None, accepted: str | None = None) -> list:
    """``convert`` every item (order kept, duplicates dropped); at least one item.

    ``convert`` raises :class:`ValueError` (its text becomes the reason) or :class:`ConfigError`;
    ``accepted`` (text) is added to the message when no item is given.

    Raises:
        ConfigError: an item ``convert`` refuses, or no item at all.
    """
    out: list = []
    for s in items(values):
        try:
            v = convert(s)
        except ConfigError as exc:
            raise ConfigError(exc.message, hint=exc.hint or hint, option=exc.option or option) from None
        except (TypeError, ValueError) as exc:
            reason = f" ({exc})" if str(exc) else ""
            raise ConfigError(f"cannot read {s!r} as a {what}{reason}", hint=hint, option=option) from None
        if v not in out:
            out.append(v)
    if not out:
        raise ConfigError(f"no {what} given" + (f"; accepted: {accepted}" if accepted else ""), hint=hint,
                          option=option)
    return out


def check_choices(values: str | Iterable[Any] | None, accepted: Iterable[str], what: str, *,
                  option: str | None = None, aliases: Mapping[str, str] | None = None,
                  every: str | None = None) -> list[str]:
    """Names checked against ``accepted`` (case-insensitive; order kept, duplicates dropped).

    Args:
        values: a list of names (or one comma-separated string).
        accepted: the valid names, in the order the error lists them.
        what: what a name is, for messages ("head", "CAM method").
        option: the library parameter the values came from.
        aliases: other spellings mapped to accepted names.
        every: a word that means all accepted names (``"all"``) when it is the only item.

    Raises:
        ConfigError: ``unknown <what> 'x'; accepted: a, b, c`` or ``no <what> given``.
    """
    accepted = list(accepted)
    listing = ", ".join(accepted) + (f" or {every}" if every else "")
    alias = {k.lower(): v for k, v in (aliases or {}).items()}
    if every and [s.lower() for s in items(values)] == [every]:
        return accepted

    def choose(s: str) -> str:
        name = alias.get(s.lower(), s.lower())
        if name not in accepted:
            raise ConfigError(f"unknown {what} {s.lower()!r}; accepted: {listing}", option=option)
        return name

    return check_list(values, what, convert=choose, option=option, accepted=listing)


def positive_int(text: str) -> int:
    """An integer >= 1 from text (for :func:`check_list`)."""
    k = int(text)
    if k < 1:
        raise ValueError("not a positive number")
    return k


def check_int(value: Any, what: str, *, minimum: int = 1, option: str | None = None) -> int:
    """``value`` as an int >= ``minimum`` (bools and floats refused).

    Raises:
        ConfigError: ``<what> must be an integer >= <minimum> (got <value>)``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum} (got {value!r})", option=option)
    return int(value)


def one_of(value: Any, accepted: Sequence[str], what: str, *, option: str | None = None) -> str:
    """One name of ``accepted`` (a comma list is refused)."""
    got = check_choices([value] if isinstance(value, str) and "," not in value else value, accepted, what,
                        option=option)
    if len(got) != 1:
        raise ConfigError(f"one {what} is needed here, got {value!r}", option=option)
    return got[0]


__all__ = ["items", "check_list", "check_choices", "check_int", "positive_int", "one_of"]
