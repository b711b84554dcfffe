"""Options declared once: one spec per option, from which the flag, the check and the config field come.

A capability's configuration (training, export, prediction, benchmarking, serving, audit) is
one frozen dataclass whose fields are declared with :func:`option`: the default, a
constraint (what values are accepted, in words a user can read) and the help text. From that
one declaration

* :func:`validate` checks every value with one wording everywhere
  (``invalid batch_size: 0; accepted: an integer >= 1``; the CLI prefixes the flag that fed
  the field, ``--batch-size``), called by the config's ``__post_init__``;
* :func:`click_options` adds the command's flags (type, ``[default: ...]`` in the help);
* :func:`from_cli` builds the config from the flags the user actually gave, on top of a
  YAML file's values or another base;
* :func:`coerce` reads text (a comma list, a number written in YAML as text) into the
  field's type, so Python callers, YAML files and flags all end in the same value.

This follows scikit-learn's ``_parameter_constraints`` + ``validate_params``: the library
takes the config object, validated once, instead of a dozen keyword arguments re-checked in
every layer.

Example::

    @dataclass(frozen=True)
    class BenchConfig:
        batch: tuple[int, ...] = option((1, 8, 32), ListOf(Interval(int, 1)), "Batch sizes to time.")
        seconds: float = option(3.0, Interval(float, 0, closed="neither"), "Seconds per measurement.")

        def __post_init__(self):
            validate(self)

    BenchConfig(batch="1,4")          # ConfigError? no: coerced to (1, 4) by validate
    BenchConfig(seconds=0)            # ConfigError: invalid seconds: 0; accepted: a number > 0
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import ConfigError

# -- constraints --------------------------------------------------------------------------------


class Constraint:
    """What values an option accepts. ``describe()`` says it in words (``an integer >= 1``)."""

    def accepts(self, value: Any) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def coerce(self, value: Any) -> Any:
        """``value`` read into this constraint's type where text stands for it; otherwise as given."""
        return value

    def click_type(self):
        """The click parameter type of a flag of this constraint (text by default)."""
        import click

        return click.STRING


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))


@dataclass(frozen=True)
class Interval(Constraint):
    """A number of ``kind`` (int or float) between ``left`` and ``right`` (None: unbounded).

    ``closed``: which ends are included, ``"both"``, ``"left"``, ``"right"`` or ``"neither"``.
    An int is accepted where a float is asked for (and stored as a float).
    """

    kind: type
    left: float | None = None
    right: float | None = None
    closed: str = "both"

    def accepts(self, value: Any) -> bool:
        if not (_is_int(value) if self.kind is int else _is_real(value)):
            return False
        lo_ok = self.left is None or (value >= self.left if self.closed in ("both", "left") else value > self.left)
        hi_ok = self.right is None or (value <= self.right if self.closed in ("both", "right") else value < self.right)
        return bool(lo_ok and hi_ok)

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        lo = None if self.left is None else (">=" if self.closed in ("both", "left") else ">")
        hi = None if self.right is None else ("<=" if self.closed in ("both", "right") else "<")
        if lo and hi:
            return f"{what} {lo} {self.left:g} and {hi} {self.right:g}"
        if lo:
            return f"{what} {lo} {self.left:g}"
        if hi:
            return f"{what} {hi} {self.right:g}"
        return what

    def coerce(self, value: Any) -> Any:
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                return value
            if self.kind is int:
                return int(number) if number.is_integer() else value
            return number
        if self.kind is float and _is_int(value):
            return float(value)
        return value

    def click_type(self):
        import click

        return click.INT if self.kind is int else click.FLOAT


@dataclass(frozen=True)
class OneOf(Constraint):
    """One of a few named values (case-insensitive for text, stored in the spelling listed)."""

    values: tuple

    def __init__(self, *values):
        object.__setattr__(self, "values", tuple(values))

    def accepts(self, value: Any) -> bool:
        return value in self.values

    def describe(self) -> str:
        return "one of " + ", ".join(str(v) for v in self.values)

    def coerce(self, value: Any) -> Any:
        if isinstance(value, str):
            for v in self.values:
                if isinstance(v, str) and v.lower() == value.strip().lower():
                    return v
        return value

    def click_type(self):
        import click

        if all(isinstance(v, str) for v in self.values):
            return click.Choice(list(self.values), case_sensitive=False)
        return click.STRING


@dataclass(frozen=True)
class Text(Constraint):
    """Non-empty text (a name, a path, a URI); ``describe`` says what it is for."""

    what: str = "non-empty text"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def describe(self) -> str:
        return self.what

    def coerce(self, value: Any) -> Any:
        import os

        return os.fspath(value) if hasattr(value, "__fspath__") else value


@dataclass(frozen=True)
class Flag(Constraint):
    """True or False."""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"

    def coerce(self, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        return value


@dataclass(frozen=True)
class ListOf(Constraint):
    """A list of items that each satisfy ``item`` (a text is one comma list); stored as a tuple.

    ``min_items``: how many at least; ``duplicates``: ``"drop"`` (order kept) or ``"refuse"``
    (a list where an item twice is a mistake, e.g. batch sizes to time).
    """

    item: Constraint
    min_items: int = 1
    duplicates: str = "drop"

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, tuple) and len(value) >= self.min_items
                and all(self.item.accepts(v) for v in value) and len(set(map(repr, value))) == len(value))

    def describe(self) -> str:
        many = "one or more" if self.min_items == 1 else (f"{self.min_items} or more" if self.min_items else "any number of")
        twice = ", none twice" if self.duplicates == "refuse" else ""
        return f"a comma list of {many} items, each {self.item.describe()}{twice}"

    def coerce(self, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, str):
            value = [s for s in (v.strip() for v in value.split(",")) if s]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        out: list = []
        for v in value:
            v = self.item.coerce(v)
            if self.duplicates == "refuse" or v not in out:
                out.append(v)
        return tuple(out)


@dataclass(frozen=True)
class Check(Constraint):
    """A rule no other constraint spells: ``test(value) -> bool``, described by ``what``;
    ``read(value)`` turns other spellings into the stored value (e.g. ``os.fspath``)."""

    test: Callable[[Any], bool]
    what: str
    read: Callable[[Any], Any] | None = None

    def accepts(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False

    def describe(self) -> str:
        return self.what

    def coerce(self, value: Any) -> Any:
        if self.read is None:
            return value
        try:
            return self.read(value)
        except (TypeError, ValueError):
            return value


# -- the spec of one option ----------------------------------------------------------------------


@dataclass(frozen=True)
class OptionSpec:
    """One option: its constraint, help and flag (the name and default are the dataclass field's).

    ``none``: None is accepted too (the option is unset: what None means goes in ``help``).
    ``flag``: the command-line spelling (default ``--<name with dashes>``), or several
    (``("--recursive", "-r")``); ``negative``: for a True-by-default flag, the flag that turns it
    off (``--no-cache``). ``repeat``: a list option given by repeating its flag (``--trust A
    --trust B``) instead of one comma list. ``cli``: False for a field set in code only.
    ``metavar``: what the flag's value looks like in ``--help``.
    """

    constraint: Constraint
    help: str
    none: bool = False
    flag: str | tuple[str, ...] | None = None
    negative: str | None = None
    repeat: bool = False
    cli: bool = True
    metavar: str | None = None


def option(default: Any, constraint: Constraint, help: str, **kw) -> Any:
    """A dataclass field declared as an option (see :class:`OptionSpec` for ``kw``).

    A mutable or tuple default is fine: tuples are immutable, and lists are turned into tuples.
    """
    spec = OptionSpec(constraint, help, **kw)
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"option": spec})


def group(config_type: type, help: str = "") -> Any:
    """A field holding another options dataclass (an option group shared by capabilities, e.g.
    the model options of ``infer`` and ``serve``); its flags join the command's."""
    return field(default_factory=config_type, metadata={"group": config_type, "help": help})


def specs(config_type: type) -> list[tuple[dataclasses.Field, OptionSpec]]:
    """The declared options of a config class, in field order (groups not included)."""
    return [(f, f.metadata["option"]) for f in fields(config_type) if "option" in f.metadata]


def groups(config_type: type) -> list[dataclasses.Field]:
    return [f for f in fields(config_type) if "group" in f.metadata]


def flag_of(f: dataclasses.Field, spec: OptionSpec) -> tuple[str, ...]:
    """The command-line spelling(s) of an option."""
    if spec.flag is None:
        return ("--" + f.name.replace("_", "-"),)
    return (spec.flag,) if isinstance(spec.flag, str) else tuple(spec.flag)


# -- checking ------------------------------------------------------------------------------------


def coerce(config_type: type, name: str, value: Any) -> Any:
    """``value`` for the option ``name`` read into its type (a comma list, a number as text)."""
    spec = next((s for f, s in specs(config_type) if f.name == name), None)
    if spec is None or value is None:
        return value
    return spec.constraint.coerce(value)


def check(name: str, value: Any, spec: OptionSpec) -> Any:
    """``value`` coerced and checked against ``spec``; returns the value to store.

    Raises:
        ConfigError: ``invalid <name>: <value>; accepted: <constraint>`` (``option`` = name).
    """
    if value is None and spec.none:
        return None
    got = spec.constraint.coerce(value)
    if not spec.constraint.accepts(got):
        accepted = spec.constraint.describe() + (" (or unset)" if spec.none else "")
        raise ConfigError(f"invalid {name}: {value!r}; accepted: {accepted}", option=name)
    return got


def validate(config: Any) -> None:
    """Coerce and check every declared option of a frozen dataclass instance, in place.

    Call it from the config's ``__post_init__``; cross-field rules follow it there.

    Raises:
        ConfigError: the first invalid value (:func:`check`).
    """
    for f, spec in specs(type(config)):
        value = check(f.name, getattr(config, f.name), spec)
        if value is not getattr(config, f.name):
            object.__setattr__(config, f.name, value)
    for f in groups(type(config)):
        value = getattr(config, f.name)
        if isinstance(value, Mapping):
            value = make(f.metadata["group"], value)
            object.__setattr__(config, f.name, value)
        if isinstance(value, f.metadata["group"]):
            validate(value)  # a group built without its own check (idempotent for one that has it)
        else:
            raise ConfigError(f"invalid {f.name}: {value!r}; accepted: {f.metadata['group'].__name__} options",
                              option=f.name)


def make(config_type: type, values: Mapping[str, Any], *, aliases: Mapping[str, str] | None = None) -> Any:
    """A config from a mapping (a YAML file, a saved ``config.yaml``), refusing unknown keys.

    Keys may use dashes (``batch-size``) and ``aliases``; the keys of a group's options may be
    given flat (``head: rf`` for the model group) or as a nested mapping.

    Raises:
        ConfigError: an unknown key (the accepted ones are listed) or an invalid value.
    """
    own = {f.name for f, _ in specs(config_type)}
    nested = {f.name: f.metadata["group"] for f in groups(config_type)}
    flat_of = {n: g for g, t in nested.items() for n in _all_names(t)}
    clean: dict[str, Any] = {}
    inner: dict[str, dict] = {g: {} for g in nested}
    for k, v in values.items():
        key = (aliases or {}).get(k, k)
        key = key.replace("-", "_") if isinstance(key, str) else key
        if key in own:
            clean[key] = v
        elif key in nested and isinstance(v, Mapping):
            inner[key].update(v)
        elif key in flat_of:
            inner[flat_of[key]][key] = v
        else:
            accepted = sorted(own | set(flat_of))
            raise ConfigError(f"unknown option {k!r}", hint=f"accepted keys: {', '.join(accepted)}")
    for g, vals in inner.items():
        if vals:
            clean[g] = make(nested[g], vals)
    return config_type(**clean)


def _all_names(config_type: type) -> set[str]:
    return {f.name for f, _ in specs(config_type)} | {n for g in groups(config_type)
                                                      for n in _all_names(g.metadata["group"])}


def to_dict(config: Any) -> dict[str, Any]:
    """Plain values (tuples as lists, groups as mappings), ready for YAML or JSON."""
    out: dict[str, Any] = {}
    for f in fields(config):
        v = getattr(config, f.name)
        if is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


# -- the command line ----------------------------------------------------------------------------


def _default_text(value: Any) -> str | None:
    if value is None or value is False:
        return None
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or None
    if value is True:
        return None
    return str(value)


def click_options(config_type: type, *, only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                  defaults: Mapping[str, str] | None = None) -> Callable:
    """A decorator adding one click option per declared option of ``config_type`` (and its groups).

    Every flag defaults to "not given" (None), so :func:`from_cli` can tell a flag the user
    typed from the config's default; the help shows the default (``defaults`` overrides its
    text for defaults that depend on other options).
    """
    import click

    only = set(only) if only is not None else None
    exclude = set(exclude)
    decorators = []
    for f, spec in _flat_specs(config_type):
        if not spec.cli or f.name in exclude or (only is not None and f.name not in only):
            continue
        shown = (defaults or {}).get(f.name, _default_text(f.default if f.default is not MISSING else None))
        text = spec.help + (f" [default: {shown}]" if shown else "")
        flags = flag_of(f, spec)
        if isinstance(spec.constraint, Flag):
            if spec.negative and spec.flag:  # both spellings: --calibrate/--no-calibrate
                decorators.append(click.option(f"{flags[0]}/{spec.negative}", f.name, default=None, help=text))
            elif spec.negative:
                decorators.append(click.option(spec.negative, f.name, flag_value=False, default=None, help=text))
            else:
                decorators.append(click.option(*flags, f.name, flag_value=True, default=None, help=text))
            continue
        if spec.repeat:
            item = spec.constraint.item if isinstance(spec.constraint, ListOf) else spec.constraint
            decorators.append(click.option(*flags, f.name, type=item.click_type(), multiple=True,
                                           metavar=spec.metavar, help=text))
            continue
        decorators.append(click.option(*flags, f.name, type=spec.constraint.click_type(), default=None,
                                       metavar=spec.metavar, help=text))

    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


def _flat_specs(config_type: type) -> list[tuple[dataclasses.Field, OptionSpec]]:
    out = list(specs(config_type))
    for g in groups(config_type):
        out += _flat_specs(g.metadata["group"])
    return out


def given(values: Mapping[str, Any]) -> dict[str, Any]:
    """The flags the user gave: :func:`click_options` flags default to None (a repeatable one to
    an empty tuple) when not given."""
    return {k: v for k, v in values.items() if v is not None and v != ()}


def from_cli(config_type: type, values: Mapping[str, Any], *, base: Mapping[str, Any] | None = None,
             **fixed: Any) -> Any:
    """The config of a command: ``base`` (a YAML file's values), then the flags given, then ``fixed``.

    ``values``: the command's keyword arguments; entries that are not options of
    ``config_type`` (``quiet``, arguments handled by the command) are ignored.
    """
    names = _all_names(config_type)
    merged: dict[str, Any] = dict(base or {})
    merged.update({k: v for k, v in given(values).items() if k in names})
    merged.update(fixed)
    return make(config_type, merged)


def replace(config: Any, **changes: Any) -> Any:
    """A copy of ``config`` with ``changes`` (validated again): timm's overlay of a frozen config."""
    return dataclasses.replace(config, **changes)


# -- lists of names a library function takes (a list, or one comma-separated string from Python),
# checked here so every "unknown X; accepted: ..." message reads the same -----------------------


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
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum} (got {value!r})", option=option)
    return int(value)


def one_of(value: Any, accepted: Sequence[str], what: str, *, option: str | None = None) -> str:
    """One name of ``accepted`` (a comma list is refused)."""
    got = check_choices([value] if isinstance(value, str) and "," not in value else value, accepted, what,
                        option=option)
    if len(got) != 1:
        raise ConfigError(f"one {what} is needed here, got {value!r}", option=option)
    return got[0]

__all__ = ["Constraint", "Interval", "OneOf", "Text", "Flag", "ListOf", "Check", "OptionSpec", "option", "group",
           "specs", "groups", "validate", "check", "coerce", "make", "to_dict", "click_options", "from_cli", "given",
           "replace", "flag_of", "items", "check_list", "check_choices", "check_int",
           "positive_int", "one_of"]
