"""Progress for people: status lines and bars with rate and ETA (``logging`` is for diagnostics).

Commands make one :class:`Progress` (``--quiet`` silences it); library functions take a
``progress`` argument that may be a :class:`Progress`, any callable that receives lines
(e.g. ``print`` or ``lines.append`` in a test), or ``None`` (silent), and turn it into a
:class:`Progress` with :func:`as_progress`.

A long step (a sweep, feature extraction, export verification, inference over a folder)
opens a :meth:`Progress.bar`: on a terminal a live tqdm bar with rate and ETA; elsewhere
(a log file, CI, a callable) a plain line now and then and one at the end, so logs stay
readable.

Example::

    progress = as_progress(print)
    progress.say("extracting features")
    with progress.bar(1797, "train", unit="img") as bar:
        for batch in batches:
            bar.update(len(batch))
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO, Union

#: seconds between plain progress lines when output is not a terminal
LINE_INTERVAL = 10.0


class Progress:
    """Where progress goes.

    Args:
        quiet: say nothing (results and errors are the commands' own output).
        lines: a callable receiving each line instead of ``stream`` (bars become plain lines).
        stream: the text stream of lines and bars (default: standard error, so standard
            output stays for results, e.g. ``transfer infer`` rows).
    """

    def __init__(self, *, quiet: bool = False, lines: Callable[[str], None] | None = None,
                 stream: TextIO | None = None):
        self.quiet = quiet
        self._lines = lines
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def say(self, message: str) -> None:
        """One status line."""
        if self.quiet:
            return
        if self._lines is not None:
            self._lines(message)
        else:
            print(message, file=self.stream, flush=True)

    __call__ = say  # a Progress can be passed where a line callable is expected

    def bar(self, total: int | None, desc: str, *, unit: str = "img") -> "Bar":
        """A context manager counting ``total`` units of work (``None``: unknown total)."""
        if self.quiet:
            return Bar(None, desc, unit)
        live = self._lines is None and _isatty(self.stream)
        return Bar(self, desc, unit, total=total, live=live)


class Bar:
    """A progress bar: ``update(n)`` as work is done; ``set(text)`` for a short live status."""

    def __init__(self, owner: Progress | None, desc: str, unit: str, *, total: int | None = None, live: bool = False):
        self.owner, self.desc, self.unit, self.total = owner, desc, unit, total
        self.n = 0
        self.status = ""
        self._t0 = time.perf_counter()
        self._last_line = self._t0
        self._tqdm = None
        if owner is not None and live:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit=unit, file=owner.stream, dynamic_ncols=True, leave=False)

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(done=exc_type is None)

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self._t0
        return self.n / dt if dt > 0 else 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        elif self.owner is not None and time.perf_counter() - self._last_line >= LINE_INTERVAL:
            self._last_line = time.perf_counter()
            self.owner.say(self._line())

    def set(self, status: str) -> None:
        """A short status shown beside the bar (``3 errors``); plain lines carry it too."""
        self.status = status
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(status, refresh=False)

    def _line(self, done: bool = False) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        secs = time.perf_counter() - self._t0
        eta = ""
        if not done and self.total and self.n and self.rate > 0:
            eta = f", ETA {clock((self.total - self.n) / self.rate)}"
        extra = f", {self.status}" if self.status else ""
        return (f"{self.desc}: {self.n}{of} {self.unit} in {clock(secs)} "
                f"({self.rate:.1f} {self.unit}/s{eta}{extra})")

    def close(self, done: bool = True) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        if self.owner is not None and done:
            self.owner.say(self._line(done=True))
        self.owner = None


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss`` (elapsed times and ETAs): ``clock(75) == "1:15"``."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


ProgressLike = Union[Progress, Callable[[str], None], None]

SILENT = Progress(quiet=True)


def as_progress(progress: ProgressLike) -> Progress:
    """A :class:`Progress` from what a caller passed: itself, a line callable, or ``None`` (silent)."""
    if progress is None:
        return SILENT
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return Progress(lines=progress)
    raise TypeError(f"progress must be a Progress, a callable or None, not {type(progress).__name__}")

