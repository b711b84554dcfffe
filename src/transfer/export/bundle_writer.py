"""Writing a bundle folder safely: where it may go, staging and the atomic swap, tool versions.

A bundle is assembled in a hidden sibling folder (``.NAME.partial-PID``) and renamed into
place only when complete, so a kill never leaves a half bundle that looks valid;
:func:`transfer.bundle.finalize_manifest` hashes every file into ``manifest.json``.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from .. import __version__
from ..bundle import MANIFEST
from ..errors import BundleError
from ..fsutil import read_json

TOOLS = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "scikit-learn", "skl2onnx")


def tool_versions() -> dict:
    """Versions of transfer and the tools that made the bundle (installed distributions only)."""
    out = {"transfer": __version__}
    for dist in TOOLS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_out(out: Path, force: bool, run_path: Path | None = None) -> None:
    """Refuse an ``out`` that would overwrite something that is not a bundle.

    An existing bundle (a folder holding a transfer ``manifest.json`` and only the files it
    lists) is replaced only with ``force``; any other non-empty folder, the run folder, or
    any folder holding the run is never replaced (replacing deletes the old folder).

    Raises:
        BundleError: what is in the way and what to do.

    Example::

        check_out(Path("runs/digits/bundle"), force=False)
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"output {out} exists and is not a folder", hint="choose another output folder",
                          option="out")
    if run_path is not None:
        o, r = out.resolve(), Path(run_path).resolve()
        if o == r or o in r.parents:
            raise BundleError(f"output {out} is the run folder or holds it; the export would replace the run",
                              option="out",
                              hint=f"use the default {Path(run_path) / 'bundle'} or another folder")
    if out.is_dir() and any(out.iterdir()):
        foreign = _not_bundle_files(out)
        if foreign is not None:
            raise BundleError(f"output folder {out} holds files that are not part of a transfer bundle "
                              f"({foreign})",
                              option="out",
                              hint="choose an empty or new output folder (force only replaces a folder that holds "
                                   "nothing but a bundle)")
        if not force:
            raise BundleError(f"output folder {out} already holds a bundle",
                              hint="replace it (`transfer export RUN --out OUT --force`), or choose another "
                                   "output folder", option="out")


def _not_bundle_files(folder: Path) -> str | None:
    """``None`` if ``folder`` holds a transfer bundle and nothing else; else what is foreign.

    Replacing deletes the folder, so anything the bundle's manifest does not list (besides
    hidden files) keeps it from being replaced: a web app's ``manifest.json``, a user's notes.
    """
    from ..bundle import BUNDLE_FORMAT, unlisted_files

    try:  # not read_manifest: a bundle of an older format or a damaged one may still be replaced
        m = read_json(folder / MANIFEST)
    except (OSError, ValueError):
        m = None
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT or not isinstance(m.get("files"), dict):
        return f"no transfer {MANIFEST}"
    extra = unlisted_files(folder, m)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        return f"not listed in its manifest: {', '.join(extra[:3])}{more}"
    return None


@contextmanager
def staged_bundle(out: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling folder; on success swap it in as ``out``.

    On any exception (including KeyboardInterrupt) the staging folder is removed and
    ``out`` is left as it was. An existing ``out`` is moved aside first and deleted after
    the new bundle is in place.

    Example::

        with staged_bundle(Path("runs/digits/bundle")) as tmp:
            (tmp / "model.onnx").write_bytes(data)
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
