"""Writing a bundle folder safely: where it may go, staging and the atomic swap, tool versions.

A bundle is assembled in a hidden sibling folder (``.NAME.partial-PID``) and renamed into
place only when complete, so a kill never leaves a half bundle that looks valid;
:func:`transfer.bundle_write.write_bundle` hashes every file into ``manifest.json``. An export
holds the lock of its output (:mod:`transfer.locks`) and clears what killed exports left
(:func:`remove_stale_staging`); replacing a bundle keeps its hidden files.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from .. import __version__
from ..bundle_format import BUNDLE_FORMAT, MANIFEST, MAX_JSON_BYTES, MAX_JSON_DEPTH, hidden_entries, unlisted_files
from ..errors import BundleError
from ..fsutil import read_json
from ..locks import pid_alive
from ..progress import as_progress
from ..runfolder import RunLayout

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
    lists, plus hidden files, which are kept) is replaced only with ``force``; any other
    non-empty folder, the run folder, a folder holding it, or a place inside it where the
    run keeps its own files is never replaced.

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
        _check_not_in_run(out, Path(run_path))
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
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


def _check_not_in_run(out: Path, run: Path) -> None:
    """The run folder, a folder holding it, or a place inside it the run uses itself (its
    trials, splits, analysis folders ...) is never an export's output; ``RUN/bundle`` or any
    other new name directly in the run is."""
    o, r = out.resolve(), run.resolve()
    if o == r or o in r.parents:
        raise BundleError(f"output {out} is the run folder or holds it; the export would replace the run",
                          option="out", hint=f"use the default {run / 'bundle'} or another folder")
    if r not in o.parents:
        return
    layout = RunLayout(r)
    own = {p.name for p in (layout.run_json, layout.config_yaml, layout.dataset_json, layout.bad_files_csv,
                            layout.splits_dir, layout.trials_dir, layout.init_dir, layout.sweep_csv, layout.sweep_md,
                            layout.best_json, layout.report_html, layout.report_md, layout.resolution_dir,
                            layout.features_dir("t").parent, layout.heads_dir("t").parent,
                            layout.evaluate_dir("t").parent, layout.plots_dir("t").parent,
                            layout.gradcam_dir("t").parent)}
    rel = o.relative_to(r)
    if len(rel.parts) > 1 or rel.parts[0] in own:
        raise BundleError(f"output {out} is inside the run's own {rel.parts[0]}; the export would write into "
                          "the run it reads", option="out",
                          hint=f"use the default {run / 'bundle'}, another new folder directly in the run, or one "
                               "outside it")


def _not_bundle_files(folder: Path) -> str | None:
    """``None`` if ``folder`` holds a transfer bundle and nothing else; else what is foreign.

    Replacing deletes the folder's bundle files, so anything the bundle's manifest does not
    list (hidden files aside: they are moved into the new bundle) keeps it from being
    replaced: a web app's ``manifest.json``, a user's notes.
    """
    try:  # not read_manifest: a bundle of an older format or a damaged one may still be replaced
        m = read_json(folder / MANIFEST, max_depth=MAX_JSON_DEPTH, max_bytes=MAX_JSON_BYTES)
    except (OSError, ValueError):
        m = None
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT or not isinstance(m.get("files"), dict):
        return f"no transfer {MANIFEST}"
    extra = unlisted_files(folder, m)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        return f"not listed in its manifest: {', '.join(extra[:3])}{more}"
    return None


def _staging_names(out: Path) -> dict[str, str]:
    """The hidden siblings an export of ``out`` uses, by kind: ``.NAME.partial-PID`` (the new
    bundle), ``.NAME.old-PID`` (the replaced one), ``.NAME.trt-PID`` (engine work)."""
    return {kind: f".{out.name}.{kind}-" for kind in ("partial", "old", "trt")}


def _move_hidden(src: Path, dst: Path) -> None:
    """Move the hidden top-level entries of ``src`` (``.git``, ``.DS_Store``) into ``dst``, unless
    ``dst`` has one of that name already."""
    for name in hidden_entries(src):
        if not (dst / name).exists():
            os.replace(src / name, dst / name)


def remove_stale_staging(out: Path, progress=None) -> list[str]:
    """Clear what killed exports of ``out`` left beside it (PIDs no longer running): an old bundle
    moved aside is put back when ``out`` is gone, hidden files a staging folder carried are
    returned to ``out``, the rest is deleted. Call it holding ``out``'s lock. Returns the
    names removed."""

    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    order = {"old": 0, "partial": 1, "trt": 2}  # restore an old bundle before anything else
    found = []
    for p in out.parent.iterdir():
        for kind, prefix in _staging_names(out).items():
            pid = p.name[len(prefix):] if p.name.startswith(prefix) else ""
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) and p.is_dir():
                found.append((order[kind], kind, p))
    for _, kind, p in sorted(found):
        if kind == "old" and not out.exists():
            os.replace(p, out)  # killed between moving the old bundle aside and putting the new one in
            as_progress(progress).say(f"restored {out} from {p.name}, left by an export that was killed")
            continue
        if kind != "trt" and out.is_dir():
            _move_hidden(p, out)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    if removed:
        as_progress(progress).say(f"removed {', '.join(removed)}, left by export(s) that were killed")
    return removed


@contextmanager
def staged_bundle(out: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling folder; on success swap it in as ``out``.

    On any exception (including KeyboardInterrupt) the staging folder is removed and
    ``out`` is left as it was. An existing ``out`` is moved aside first and deleted after
    the new bundle is in place; its hidden entries (``.git`` ...) move into the new bundle
    first, so they are never deleted.

    Example::

        with staged_bundle(Path("runs/digits/bundle")) as tmp:
            (tmp / "model.onnx").write_bytes(data)
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = _staging_names(out)
    tmp = out.parent / f"{names['partial']}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    old = out.parent / f"{names['old']}{os.getpid()}"
    if old.exists():  # our own PID's leftover (a reused PID): the same rule as for stale ones
        os.replace(old, out) if not out.exists() else shutil.rmtree(old)
    try:
        yield tmp
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            _move_hidden(out, tmp)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if not out.exists() and old.exists():
            os.replace(old, out)  # put the old bundle back
        if out.is_dir() and tmp.is_dir():
            _move_hidden(tmp, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
