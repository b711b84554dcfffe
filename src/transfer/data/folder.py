"""Index an image folder: classes, samples, and the files that cannot be decoded.

A dataset is either ``ROOT/<class>/...`` (one sub-folder per class) or
``ROOT/train/<class>/...`` with optional ``ROOT/val/`` and ``ROOT/test/`` (a *given*
split; the split names match in any case, e.g. ``Train/``). Every image file is fully decoded once, in a thread pool, so broken files are
found before training starts; an optional JSON cache skips files unchanged since the
last indexing.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, ImageDecodeError
from ..fsutil import atomic_path
from ..progress import ProgressLike, as_progress
from ..tables import write_csv
from .image import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, decode_image, is_image_path

GIVEN_SPLITS = ("train", "val", "test")
_CACHE_FORMAT = "transfer-index-cache"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Sample:
    """One image: ``path`` relative to the dataset root (POSIX separators), class index."""

    path: str
    label: int


@dataclass(frozen=True)
class BadFile:
    """A file that could not be used, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class FileCheck:
    """How :func:`index_folder` checks each image file.

    Attributes:
        decode: decode every file once to find the bad ones; when False, list the files without
            decoding them: every image file is a sample and ``bad`` holds only what the layout
            refuses (broken links). For a caller that decodes every file anyway and lists those
            that fail itself (``transfer data audit``), so no file is decoded twice.
        max_pixels: images with more pixels are refused as absurd.
        cache: optional JSON file remembering (path, size, mtime_ns) -> verdict, so a re-index
            skips decoding unchanged files.

    Example::

        index_folder("data/digits", check=FileCheck(cache="runs/digits/index-cache.json"))
    """

    decode: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    cache: str | os.PathLike | None = None


@dataclass
class DatasetIndex:
    """The result of :func:`index_folder`.

    ``samples`` holds every usable image (all given splits together, sorted by path);
    ``given_splits`` is ``{"train": [...], "val": [...], "test": [...]}`` when the folder
    has a ``train/`` sub-folder, else ``None``.
    """

    root: Path
    class_names: list[str]
    samples: list[Sample]
    bad: list[BadFile]
    given_splits: dict[str, list[Sample]] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    #: files that are not indexed at all (not in a class folder, not an image type), and why
    ignored: list[BadFile] = field(default_factory=list)
    #: layout oddities worth a look (e.g. class folders that look like splits)
    warnings: list[str] = field(default_factory=list)
    #: why the folder cannot be trained as is; only filled with ``strict=False``
    problems: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_elsewhere(path: str, root: str, own: str, reserved: frozenset[str]) -> str | None:
    """The real target of a file link that lies in the data root or a class folder other than
    ``own``, else None (links inside their own class folder or out of the dataset are fine)."""
    target = os.path.realpath(path)
    if not os.path.exists(target) or _inside(target, own):
        return None  # a broken link is reported when decoded
    if _inside(target, root) or any(_inside(target, r) for r in reserved):
        return target
    return None


def _walk_images(folder: Path, root: Path, visited: set[str], reserved: frozenset[str] = frozenset(),
                 top: bool = True, *, own: str | None = None, bad: list[BadFile] | None = None,
                 ignored: list[BadFile] | None = None) -> list[str]:
    """Image-named paths under ``folder`` (recursive, hidden skipped, loops cut), relative to root.

    ``reserved`` holds the real paths of all class folders: a link from one class into
    another (or elsewhere in the data root) is not followed, so each image keeps the class
    of its own folder. A file link of that kind is added to ``bad``; files that are not
    image-named go to ``ignored``.
    """
    out: list[str] = []
    try:
        real = os.path.realpath(folder)
    except OSError:
        return out
    if top:
        own = real
    root_real = os.path.realpath(root)
    if real in visited or (not top and real in reserved):
        return out
    if not top and own is not None and _inside(real, root_real) and not _inside(real, own):
        return out  # a folder link into another class or split
    visited.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return out
    for entry in entries:
        if _is_hidden(entry.name):
            continue
        p = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_image_path(entry.name):
            # a directory named like an image is reported as bad by decode_image
            rel = p.relative_to(root).as_posix()
            target = _link_elsewhere(entry.path, root_real, own, reserved) if entry.is_symlink() else None
            if target is not None:
                if bad is not None:
                    shown = os.path.relpath(target, root_real) if _inside(target, root_real) else target
                    bad.append(BadFile(rel, f"link to {Path(shown).as_posix()}, outside its class folder; "
                                            "not used, so the image keeps a single label"))
                continue
            out.append(rel)
        elif is_dir:
            out.extend(_walk_images(p, root, visited, reserved, top=False, own=own, bad=bad, ignored=ignored))
        elif ignored is not None:
            ext = os.path.splitext(entry.name)[1]
            ignored.append(BadFile(p.relative_to(root).as_posix(),
                                   f"{ext.lower() + ' is' if ext else 'no extension:'} not an image type "
                                   "transfer reads"))
    return out


def _class_dirs(folder: Path, root: Path | None = None, ignored: list[BadFile] | None = None) -> list[str]:
    """Sub-folder names of ``folder``; its other (non-hidden) entries go to ``ignored``."""
    names = []
    for entry in os.scandir(folder):
        if _is_hidden(entry.name):
            continue
        try:
            if entry.is_dir(follow_symlinks=True) and not is_image_path(entry.name):
                names.append(entry.name)
                continue
        except OSError:
            pass
        if ignored is not None and root is not None:
            ignored.append(BadFile(Path(entry.path).relative_to(root).as_posix(), "not in a class folder"))
    return sorted(names)


def _nested_layout_warning(class_names: list[str], candidates: list[tuple]) -> str | None:
    """A warning when classes hold images only in sub-folders that recur across classes
    (``Training/cat``, ``Testing/cat``): those are probably splits under other names."""
    direct = {c: False for c in class_names}
    subs: dict[str, set[str]] = {c: set() for c in class_names}
    for _, c, rel in candidates:
        parts = rel.split("/")
        if len(parts) == 2:
            direct[c] = True
        else:
            subs[c].add(parts[1])
    nested = [c for c in class_names if not direct[c] and subs[c]]
    seen: dict[str, int] = {}
    for c in nested:
        for name in subs[c]:
            seen[name] = seen.get(name, 0) + 1
    shared = sorted(n for n, k in seen.items() if k >= 2)
    if not shared:
        return None
    holders = [c for c in nested if subs[c] & set(shared)]
    more = ", ..." if len(shared) > 5 else ""
    return (f"class folders {', '.join(holders)} hold images only in sub-folders with the same names "
            f"({', '.join(shared[:5])}{more}); they are read as {len(holders)} classes, not as splits. "
            f"If they are splits, name them {', '.join(s + '/' for s in GIVEN_SPLITS)} (any case)")


def _load_cache(cache: Path | None, max_pixels: int) -> dict:
    if cache is None or not Path(cache).is_file():
        return {}
    try:
        with open(cache, encoding="utf-8") as f:
            data = json.load(f)
        if (
            data.get("format") != _CACHE_FORMAT
            or data.get("version") != _CACHE_VERSION
            or data.get("max_pixels") != max_pixels
        ):
            return {}
        return dict(data.get("files", {}))
    except (OSError, ValueError, AttributeError):
        return {}  # a broken cache is only a lost speed-up


def _save_cache(cache: Path, root: Path, max_pixels: int, files: dict) -> None:
    with atomic_path(cache) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "format": _CACHE_FORMAT,
                    "version": _CACHE_VERSION,
                    "root": str(root),
                    "max_pixels": max_pixels,
                    "files": files,
                },
                f,
            )


def _stat_key(path: Path) -> list | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _check_file(path: Path, max_pixels: int) -> str | None:
    """None when the file decodes, else the reason it does not."""
    try:
        decode_image(path, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return exc.reason
    return None


@dataclass
class _Layout:
    """What the folder structure says: the given splits (if any), the classes, what is ignored."""

    root: Path
    split_dir: dict[str, str]                      # "train" -> the folder's own spelling, e.g. "Train"
    split_names: list[str | None]                  # [None] without given splits
    classes_per_split: dict[str | None, list[str]]
    class_names: list[str]
    ignored: list[BadFile]

    @property
    def given(self) -> bool:
        return "train" in self.split_dir

    def base_of(self, s: str | None) -> Path:
        return self.root / self.split_dir[s] if s else self.root

    def class_dir(self, c: str) -> Path:
        return self.root / self.split_dir["train"] / c if self.given else self.root / c


@dataclass
class _Candidate:
    split: str | None
    cls: str
    rel: str


def _read_layout(root: Path) -> _Layout:
    """Part 1: the given splits (``train/`` ``val/`` ``test/`` in any case) or one folder per class.

    Raises:
        DataError: two spellings of one split, other folders beside a given split, or a
            val / test class missing from train.
    """
    ignored: list[BadFile] = []
    top = _class_dirs(root, root, ignored)
    split_dir: dict[str, str] = {}
    for d in top:
        key = d.lower()
        if key in GIVEN_SPLITS:
            if key in split_dir:
                raise DataError(f"dataset folder {root} has both {split_dir[key]}/ and {d}/",
                                hint=f"merge them into one {key}/ folder")
            split_dir[key] = d
    if "train" not in split_dir:
        return _Layout(root, {}, [None], {None: top}, top, ignored)
    extra = [d for d in top if d.lower() not in GIVEN_SPLITS]
    if extra:
        aliases = [d for d in extra if d.lower() in ("valid", "validation", "testing", "training")]
        raise DataError(
            f"dataset folder {root} has a {split_dir['train']}/ sub-folder (a given split) but also "
            f"other folders: {', '.join(extra)}",
            hint="either use train/, val/, test/ each holding class folders, "
            "or one folder per class (no train/)"
            + (f"; rename {aliases[0]}/ to val/ or test/" if aliases else ""),
        )
    names: list[str | None] = [s for s in GIVEN_SPLITS if s in split_dir]
    per = {s: _class_dirs(root / split_dir[s], root, ignored) for s in names}
    train = set(per["train"])
    for s in names:
        missing = sorted(set(per[s]) - train)
        if missing:
            raise DataError(
                f"dataset folder {root}: {split_dir[s]}/ has classes missing from "
                f"{split_dir['train']}/: {', '.join(missing)}",
                hint="every class in val/ or test/ needs a folder (with images) in train/",
            )
    return _Layout(root, split_dir, names, per, sorted(train), ignored)


def _find_candidates(layout: _Layout) -> tuple[list[_Candidate], list[tuple[str, BadFile]]]:
    """Part 2: every image-named file per (split, class), and the file links into another
    class (``(class, bad file)``), which are not used."""
    visited: set[str] = set()
    reserved = frozenset(os.path.realpath(layout.base_of(s) / c)
                         for s in layout.split_names for c in layout.classes_per_split[s])
    candidates: list[_Candidate] = []
    link_bad: list[tuple[str, BadFile]] = []
    for s in layout.split_names:
        for c in layout.classes_per_split[s]:
            found: list[BadFile] = []
            for rel in _walk_images(layout.base_of(s) / c, layout.root, visited, reserved, bad=found,
                                    ignored=layout.ignored):
                candidates.append(_Candidate(s, c, rel))
            link_bad.extend((c, b) for b in found)
    layout.ignored.sort(key=lambda b: b.path)
    return candidates, link_bad


def _no_images_error(layout: _Layout) -> DataError:
    in_root = sum(1 for b in layout.ignored if "/" not in b.path and is_image_path(b.path))
    return DataError(
        f"dataset folder {layout.root} holds no image files "
        f"(looked for {', '.join(IMAGE_EXTENSIONS)} inside class sub-folders"
        + (f"; {in_root} image file(s) lie directly in it, outside any class folder" if in_root else "")
        + ")",
        hint="put images in ROOT/<class>/ (e.g. ROOT/cat/1.jpg, ROOT/dog/2.jpg)",
    )


def _decode_all(root: Path, rels: list[str], *, cache: Path | None, max_pixels: int, workers: int | None,
                progress: ProgressLike) -> dict[str, str | None]:
    """Part 3: decode every file once (threads; Pillow releases the GIL), skipping files the
    cache knows unchanged; returns ``rel -> reason it is bad, or None``."""
    cached = _load_cache(cache, max_pixels)
    new_cache: dict[str, dict] = {}
    verdicts: dict[str, str | None] = {}
    todo: list[str] = []
    for rel in rels:
        key = _stat_key(root / rel)
        entry = cached.get(rel)
        if key is not None and entry and entry.get("stat") == key:
            verdicts[rel] = entry.get("bad")
            new_cache[rel] = entry
        else:
            todo.append(rel)
    n_workers = workers if workers and workers > 0 else min(8, (os.cpu_count() or 1) + 2)

    def work(rel: str) -> tuple[str, str | None, list | None]:
        key = _stat_key(root / rel)
        return rel, _check_file(root / rel, max_pixels), key

    with as_progress(progress).bar(len(rels), "decoding images", unit="img") as bar:
        bar.update(len(rels) - len(todo))
        if todo:
            with ThreadPoolExecutor(max_workers=n_workers) as pool:
                for rel, reason, key in pool.map(work, todo, chunksize=16):
                    verdicts[rel] = reason
                    if key is not None:
                        new_cache[rel] = {"stat": key, "bad": reason}
                    bar.update(1)
                    if reason is not None:
                        bar.set(f"{sum(v is not None for v in verdicts.values())} bad")
    if cache is not None and (todo or set(new_cache) != set(cached)):
        try:
            _save_cache(cache, root, max_pixels, new_cache)
        except OSError:
            pass  # the cache is an optimisation only
    return verdicts


def _assemble(layout: _Layout, candidates: list[_Candidate], link_bad: list[tuple[str, BadFile]],
              verdicts: dict[str, str | None]) -> tuple[DatasetIndex, dict[str, list[BadFile]]]:
    """Part 4: samples per split (sorted), bad files, per-class counts; also each class's bad files."""
    label_of = {c: i for i, c in enumerate(layout.class_names)}
    bad: list[BadFile] = []
    per_split: dict[str | None, list[Sample]] = {s: [] for s in layout.split_names}
    usable: dict[str, int] = {c: 0 for c in layout.class_names}
    bad_per_class: dict[str, list[BadFile]] = {c: [] for c in layout.class_names}
    for c, b in link_bad:
        bad.append(b)
        bad_per_class[c].append(b)
    for cand in candidates:
        reason = verdicts[cand.rel]
        if reason is not None:
            bad.append(BadFile(cand.rel, reason))
            bad_per_class[cand.cls].append(bad[-1])
        else:
            per_split[cand.split].append(Sample(cand.rel, label_of[cand.cls]))
            usable[cand.cls] += 1
    bad.sort(key=lambda b: b.path)
    for s in per_split:
        per_split[s].sort(key=lambda x: x.path)
    samples = sorted((x for v in per_split.values() for x in v), key=lambda x: x.path)
    given_splits = {s: per_split.get(s, []) for s in GIVEN_SPLITS} if layout.given else None
    idx = DatasetIndex(root=layout.root, class_names=layout.class_names, samples=samples, bad=bad,
                       given_splits=given_splits, counts=usable, ignored=layout.ignored)
    return idx, bad_per_class


def _nested_folders(layout: _Layout, candidates: list[_Candidate]) -> dict[str, int]:
    """Sub-folders of class folders that hold images (``cat/2019/``), with their image counts."""
    depth = 3 if layout.given else 2  # split/class/file or class/file
    found: dict[str, int] = {}
    for c in candidates:
        parts = c.rel.split("/")
        if len(parts) > depth:
            sub = "/".join(parts[:depth]) + "/"
            found[sub] = found.get(sub, 0) + 1
    return dict(sorted(found.items()))


def _hygiene(layout: _Layout, candidates: list[_Candidate], *, allow_nested: bool,
             allow_case_clash: bool) -> tuple[list[DataError], list[str]]:
    """What a folder must not do silently: images in sub-folders of a class (merged into it) and
    class names that differ only in case (one folder on a case-insensitive disk). Returns
    ``(errors, warnings)``; an allowed oddity is a warning."""
    errors, warnings = [], []
    split_like = None if layout.given else \
        _nested_layout_warning(layout.class_names, [(c.split, c.cls, c.rel) for c in candidates])
    if split_like:  # the more telling warning about the same sub-folders
        warnings.append(split_like)
    nested = _nested_folders(layout, candidates)
    if nested:
        shown = ", ".join(f"{k} ({n} image{'s' if n != 1 else ''})" for k, n in list(nested.items())[:5])
        more = f" and {len(nested) - 5} more" if len(nested) > 5 else ""
        msg = (f"dataset folder {layout.root}: class folders hold images in sub-folders, which are merged into "
               f"their class: {shown}{more}")
        if not allow_nested:
            errors.append(DataError(msg, hint=(split_like + "; or " if split_like else "")
                                    + "move the images up into their class folder, or accept the sub-folders "
                                      "as part of their class (the allow-nested option)"))
        elif not split_like:
            warnings.append(msg + " (accepted)")
    by_fold: dict[str, list[str]] = {}
    for c in layout.class_names:
        by_fold.setdefault(c.casefold(), []).append(c)
    clashes = [names for names in by_fold.values() if len(names) > 1]
    if clashes:
        shown = "; ".join(" and ".join(f"{n}/" for n in names) for names in clashes)
        msg = (f"dataset folder {layout.root}: class names that differ only in case: {shown} (one folder on a "
               "case-insensitive disk, two classes here)")
        if allow_case_clash:
            warnings.append(msg + " (accepted as different classes)")
        else:
            errors.append(DataError(msg, hint="merge or rename them, or accept them as different classes "
                                              "(the allow-case-clash option)"))
    return errors, warnings


def _unusable(idx: DatasetIndex, layout: _Layout, bad_per_class: dict[str, list[BadFile]],
              any_candidates: bool) -> list[DataError]:
    """Why the folder cannot be trained as is: a class without a usable image, fewer than two classes."""
    errors = []
    for c in idx.class_names:
        if idx.counts[c] == 0 and any_candidates:
            mine = sorted(bad_per_class[c], key=lambda b: b.path)
            if mine:
                examples = "; ".join(f"{b.path}: {b.reason}" for b in mine[:2])
                detail = f"all {len(mine)} image file(s) in it are bad (e.g. {examples})"
            else:
                detail = "it holds no image files"
            errors.append(DataError(
                f"class folder {layout.class_dir(c)} has no usable image: {detail}",
                hint=f"add readable images to it or remove the folder; `transfer data check {idx.root} "
                     "--bad-csv bad.csv` lists every bad file",
            ))
    if len(idx.class_names) < 2:
        errors.append(DataError(
            f"dataset folder {idx.root} has {len(idx.class_names)} class folder(s) "
            f"({', '.join(idx.class_names) or 'none'}); a classifier needs at least two",
            hint="put each class's images in its own sub-folder: ROOT/<class>/*.jpg",
        ))
    return errors


def index_folder(
    root: str | os.PathLike,
    *,
    workers: int | None = None,
    progress: ProgressLike = None,
    strict: bool = True,
    allow_nested: bool = False,
    allow_case_clash: bool = False,
    check: FileCheck = FileCheck(),
) -> DatasetIndex:
    """Index an image-classification folder and decode every file once to find bad ones.

    Four parts, one function each: the layout (given splits or class folders), the
    candidate files per class, decoding them all (threads, optional cache), and the
    assembled index with the reasons it cannot be trained.

    Args:
        root: ``ROOT/<class>/**/*.jpg`` or ``ROOT/{train,val,test}/<class>/**``.
        workers: decoding threads (default: ``min(8, cpu_count + 2)``).
        progress: a bar while decoding (:class:`transfer.progress.Progress`, a line callable or None).
        strict: when False (``transfer data check``), no image at all, fewer than two
            classes, a class without a usable image or a refused layout are listed in
            ``problems`` instead of raised, so the bad files can still be shown.
        allow_nested: accept images in sub-folders of a class folder as that class (else
            refused, listing the sub-folders: they are often a mistake, e.g. splits or
            sub-classes under another name).
        allow_case_clash: accept class folders whose names differ only in case (``Cat/`` and
            ``cat/``) as different classes (else refused: one folder on a case-insensitive disk).
        check: how each file is checked (:class:`FileCheck`: decoded or only listed, the pixel
            limit, a verdict cache).

    Returns:
        A :class:`DatasetIndex`; bad files are in ``bad`` and excluded from ``samples``,
        files not indexed at all are in ``ignored``.

    Raises:
        DataError: missing folder, no image at all, fewer than two classes, a class
            without a usable image, a given split whose classes are not in ``train/``,
            images in sub-folders of a class, or class names that differ only in case
            (the last two unless allowed).

    Example::

        idx = index_folder("data/digits")
        idx.class_names[:3], len(idx.samples)        # (['0', '1', '2'], 1797)
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist",
                        hint="give a folder with one sub-folder of images per class")
    if not root.is_dir():
        raise DataError(f"dataset folder {root} is not a directory",
                        hint="give a folder with one sub-folder of images per class")
    layout = _read_layout(root.resolve())
    candidates, link_bad = _find_candidates(layout)
    errors, warnings = _hygiene(layout, candidates, allow_nested=allow_nested, allow_case_clash=allow_case_clash)
    if strict and errors:
        raise errors[0]  # before any decoding: the layout is refused as it is
    if not candidates:
        errors.append(_no_images_error(layout))
        if strict:
            raise errors[-1]
    if check.decode:
        verdicts = _decode_all(layout.root, [c.rel for c in candidates],
                               cache=Path(check.cache) if check.cache else None, max_pixels=check.max_pixels,
                               workers=workers, progress=progress)
    else:
        verdicts = {c.rel: None for c in candidates}
    idx, bad_per_class = _assemble(layout, candidates, link_bad, verdicts)
    errors += _unusable(idx, layout, bad_per_class, bool(candidates))
    if strict and errors:
        raise errors[0]
    idx.warnings, idx.problems = warnings, [e.message for e in errors]
    return idx


def write_bad_files_csv(path: str | os.PathLike, bad: list[BadFile]) -> None:
    """Write ``path,reason`` rows (atomically, :func:`transfer.tables.write_csv`), one per bad file.

    Example::

        write_bad_files_csv("runs/x/bad_files.csv", idx.bad)
    """
    write_csv(path, ["path", "reason"], [[b.path, b.reason] for b in bad])
