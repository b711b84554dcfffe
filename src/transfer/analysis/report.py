"""One page per run: ``RUN/report.html`` (self-contained) and ``RUN/report.md``.

The report gathers what the other commands wrote into the run folder -- nothing is
recomputed -- so it is quick and never needs TensorFlow:

============================  =========================================  ==============================
section                       files read                                  made by
============================  =========================================  ==============================
dataset                       dataset.json, bad_files.csv                 ``transfer train``
sweep table                   sweep.csv (sweep.md), best.json             ``transfer train``
training curves               trials/<t>/curves.png                       ``transfer train``
classical heads               heads/<t>/heads.csv                         ``transfer heads RUN``
per-class metrics             evaluate/<t>/{metrics.json, per_class.csv,  ``transfer evaluate RUN``
                              confusion.png, samples.png, wrong.png}
Grad-CAM                      gradcam/<t>/faithfulness.json,              ``transfer gradcam RUN``
                              gradcam/<t>/<method>/grid.png               (best method first)
feature plots                 plots/<t>/features_{pca,tsne}.png           ``transfer features RUN``
resolution                    resolution/{totv,tvtv}{.csv,.png,           ``transfer resolution RUN``
                              _per_class.csv}
============================  =========================================  ==============================

A section whose files are missing says which command makes them. The HTML embeds its
images as base64 ``data:`` URIs and its CSS inline: one file to open, mail or archive.
The Markdown links the images by their path relative to the run folder.

The run's files are found through :class:`~transfer.runfolder.RunLayout` (no path of the
run folder is spelled here). This module holds the page and the sections on the data and
training; the sections on Grad-CAM, the bundle's maps and calibration are
:mod:`transfer.analysis.report_trust`, the blocks they are made of (tables, images, notes)
:mod:`transfer.analysis.report_blocks`, whose Markdown tables come from :mod:`transfer.tables`.

Example::

    from transfer.analysis.report import write_report
    paths = write_report("runs/digits")
    paths["html"]                       # runs/digits/report.html
"""

from __future__ import annotations

import html
import os
from datetime import datetime, timezone
from pathlib import Path

from ..fsutil import write_text_atomic
from ..runfolder import RunFolder, RunLayout
from .audit import audit_dir
from .audit_page import KINDS, findings_html, summary_markdown
from .report_blocks import (
    CSS,
    Section,
    add_heading,
    add_images,
    add_note,
    add_table,
    fmt_value,
    html_table,
    image_section,
    mark_found,
    md_rows,
    md_table,
    read_csv,
    safe_json,
    trial_dirs,
)
from .report_trust import bundle_maps_section, calibration_section, gradcam_section

# --------------------------------------------------------------------------- sections


def _dataset(run: RunLayout) -> Section:
    sec = Section("dataset", "Dataset")
    ds = safe_json(run.dataset_json)
    if not isinstance(ds, dict):
        sec.missing("dataset.json is missing or unreadable", f"transfer train DATA --out {run.path}")
        return sec
    sec.present = True
    names = ds.get("class_names", [])
    shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
    counts = ds.get("counts", {})
    split = ds.get("split", {})
    bad_rows: list[list[str]] = []
    if run.bad_files_csv.is_file():
        _, bad_rows = read_csv(run.bad_files_csv)
    n_bad = ds.get("num_bad", len(bad_rows))
    kv = [
        ("data folder", ds.get("root", "?")),
        ("classes", f"{len(names)}: {shown}"),
        ("images", f"{ds.get('num_images', '?')} readable"),
        ("split", f"{split.get('method', '?')} (val {split.get('val')}, test {split.get('test')}, seed "
                  f"{split.get('seed')}" + (f", {split['kfold']} folds" if split.get("kfold") else "")
                  + (", duplicate groups kept on one side" if split.get("dedupe") else "") + ")"),
        ("train / val / test", " / ".join(str(counts.get(k, "?")) for k in ("train", "val", "test"))),
        ("bad files", f"{max(int(n_bad or 0), len(bad_rows))} (bad_files.csv)"),
    ]
    dup = ds.get("duplicates")
    if isinstance(dup, dict):
        kv.append(("duplicates", f"{dup.get('groups', 0)} group(s) of {dup.get('images', 0)} images; "
                   + (f"kept on one side of the split ({dup.get('left_out', 0)} copie(s) in given val/test left out)"
                      if dup.get("dedupe") else
                      f"{dup.get('straddling_groups', 0)} straddle the split ({dup.get('test_with_copy', 0)} test, "
                      f"{dup.get('val_with_copy', 0)} val image(s) with a copy in an earlier split)")
                   + " (duplicates.csv)"))
    sec.html.append(html_table([], kv, cls="kv"))
    sec.md.append(md_table(["", ""], kv))
    if bad_rows:
        sec.html.append("<details><summary>bad files</summary>"
                        + html_table(["path", "reason"], bad_rows[:200]) + "</details>")
        sec.md.append(md_table(["path", "reason"], bad_rows[:20]))
    return sec


def _sweep(run: RunLayout) -> Section:
    sec = Section("sweep", "Freeze sweep")
    if not run.sweep_csv.is_file():
        sec.missing("no sweep table (sweep.csv)", f"transfer train DATA --out {run.path}")
        return sec
    sec.present = True
    add_table(sec, *read_csv(run.sweep_csv))
    best = safe_json(run.best_json)
    if isinstance(best, dict) and best.get("trial"):
        line = f"Best trial: {best['trial']} ({best.get('metric', 'val_accuracy')} {fmt_value(best.get('value'))}"
        if best.get("test_accuracy") is not None:
            line += f", test accuracy {fmt_value(best['test_accuracy'])}"
        line += ")."
        add_note(sec, line)
        clean = best.get("test_without_duplicates")
        if isinstance(clean, dict) and clean.get("left_out"):
            add_note(sec, f"Test accuracy with the {clean['left_out']} test image(s) that have a copy in train or val: "
                       f"{fmt_value(best.get('test_accuracy'))}; without them ({clean.get('images')} images): "
                       f"{fmt_value(clean.get('accuracy'))}. The copies are listed in duplicates.csv; "
                       f"`transfer train --dedupe` makes a split that keeps every group on one side.")
    _rungs(sec, run.rungs())
    return sec


def _rungs(sec: Section, record: dict) -> None:
    """Which trial reached which epoch of a ``--schedule halving`` sweep, at what validation accuracy."""
    decisions = record.get("decisions") or []
    if not decisions:
        return
    trials = list(dict.fromkeys(s["trial"] for d in decisions for s in d.get("standings", [])))
    header = ["trial"] + [f"rung {d['rung']} (epoch {d['epoch']})" for d in decisions] + ["outcome"]
    rows = []
    for t in trials:
        cells, outcome = [], "trained to the full budget"
        for d in decisions:
            s = next((x for x in d.get("standings", []) if x["trial"] == t), None)
            if s is None:
                cells.append("")
                continue
            what = ("" if t in d.get("promoted", []) else " stopped" if t in d.get("stopped", []) else f" {s['state']}")
            cells.append(f"{fmt_value(s.get('accuracy'))}{what}")
            if t in d.get("stopped", []):
                outcome = f"stopped at epoch {d['epoch']}"
            elif s.get("state") in ("complete", "failed") and outcome.startswith("trained"):
                outcome = (f"complete at epoch {s.get('epoch')} (its training ended there)" if s["state"] == "complete"
                           else f"failed at epoch {s.get('epoch')}")
        rows.append([t] + cells + [outcome])
    add_table(sec, header, rows, title="Successive halving: validation accuracy at each rung")
    add_note(sec, f"Each rung ranks the trials still training by the validation accuracy of their saved epoch (ties: "
               f"more trainable parameters, then the name) and keeps the best 1/{record.get('rate')}; the rest stop "
               f"there and are evaluated as they are. The best trial is chosen among the trials trained to the full "
               f"budget (rungs.json).")


def _curves(run: RunLayout) -> Section:
    trials = sorted(d.name for d in run.trials_dir.iterdir() if d.is_dir()) if run.trials_dir.is_dir() else []
    items = [(run.trial_paths(t).curves_png, t) for t in trials if run.trial_paths(t).curves_png.is_file()]
    return image_section(run, "curves", "Training curves", items, "no training curves (trials/<trial>/curves.png)",
                          f"transfer train DATA --out {run.path}")


def _heads(run: RunLayout) -> Section:
    sec = Section("heads", "Classical heads on learned features")
    found = trial_dirs(run, "heads", run.heads_dir, "heads.csv")
    if not mark_found(sec, found, "no classical-head comparison (heads/<trial>/heads.csv)", f"transfer heads {run.path}"):
        return sec
    for d in found:
        add_table(sec, *read_csv(d / "heads.csv"), title=d.name)
    return sec


def _metrics_summary(sec: Section, m: dict, *, averages: bool = True) -> None:
    """Top-level scalars as one line; averages (dicts such as macro / weighted) as one small table."""
    skip = {"trial", "outputs", "class_names", "per_class"}
    line = ", ".join(f"{k} {fmt_value(v)}" for k, v in m.items()
                     if k not in skip and not isinstance(v, (dict, list)))
    if line:
        add_note(sec, line)
    avgs = {k: v for k, v in m.items() if k not in skip and isinstance(v, dict)
            and v and all(not isinstance(x, (dict, list)) for x in v.values())}
    if avgs and averages:
        cols: list[str] = []
        for v in avgs.values():
            cols += [c for c in v if c not in cols]
        add_table(sec, ["average"] + cols, [[k] + [fmt_value(v.get(c, "")) for c in cols] for k, v in avgs.items()])


def _evaluate(run: RunLayout) -> Section:
    sec = Section("evaluate", "Per-class metrics and confusion matrix")
    found = trial_dirs(run, "evaluate", run.evaluate_dir, "metrics.json", "per_class.csv", "confusion.png")
    if not mark_found(sec, found, "no evaluation (evaluate/<trial>/)", f"transfer evaluate {run.path}"):
        return sec
    for d in found:
        add_heading(sec, d.name)
        m = safe_json(d / "metrics.json")
        if isinstance(m, dict):
            _metrics_summary(sec, m, averages=not (d / "per_class.csv").is_file())
        if (d / "per_class.csv").is_file():
            add_table(sec, *read_csv(d / "per_class.csv"))
        else:
            sec.html.append('<p class="note">per_class.csv missing</p>')
        pics = [(d / f, f"{d.name}: {cap}") for f, cap in (
            ("confusion.png", "confusion matrix"), ("samples.png", "random test images: predicted / true"),
            ("wrong.png", "most confidently wrong")) if (d / f).is_file()]
        add_images(sec, pics, run.path)
    return sec


def _features(run: RunLayout) -> Section:
    items = [(run.plots_dir(t) / f"features_{kind}.png", f"{t}: {name} of the features")
             for t in run.analysis_trials("plots") for kind, name in (("pca", "PCA"), ("tsne", "t-SNE"))
             if (run.plots_dir(t) / f"features_{kind}.png").is_file()]
    return image_section(run, "features", "Learned features", items,
                          "no feature plot (plots/<trial>/features_pca.png)", f"transfer features {run.path} --plot pca")


def _resolution(run: RunLayout) -> Section:
    sec = Section("resolution", "Resolution study")
    d = run.resolution_dir
    modes = [m for m in ("totv", "tvtv") if (d / f"{m}.csv").is_file()]
    if not modes:
        sec.missing("no resolution study (resolution/totv.csv)",
                    f"transfer resolution {run.path} --sizes 32,16,8 --mode totv")
        return sec
    sec.present = True
    labels = {"totv": "TOTV: trained once, tested on images reduced to each size",
              "tvtv": "TVTV: trained and tested at each size"}
    for m in modes:
        info = safe_json(d / f"{m}.json") or {}
        title = labels[m] + (f" (trial {info['trial']})" if info.get("trial") else "")
        add_table(sec, *read_csv(d / f"{m}.csv"), title=title)
        if (d / f"{m}_per_class.csv").is_file():
            ph, pr = read_csv(d / f"{m}_per_class.csv")
            sec.html.append("<details><summary>per class</summary>" + html_table(ph, pr) + "</details>")
        if (d / f"{m}.png").is_file():
            add_images(sec, [(d / f"{m}.png", title)], run.path, grid=False)
    if (d / "compare.csv").is_file():
        add_table(sec, *read_csv(d / "compare.csv"), title="TOTV vs TVTV")
        if (d / "compare.png").is_file():
            add_images(sec, [(d / "compare.png", "TOTV vs TVTV")], run.path, grid=False)
    elif len(modes) == 1:
        other = "tvtv" if modes[0] == "totv" else "totv"
        sec.html.append(f'<p class="note">Run <code>transfer resolution {html.escape(str(run.path))} --mode {other}</code> '
                        "as well to compare TOTV with TVTV.</p>")
        sec.md.append(f"Run `transfer resolution {run.path} --mode {other}` as well to compare TOTV with TVTV.\n")
    return sec


def _audit(run: RunLayout) -> Section | None:
    """The data audit (``transfer data audit DATA --run RUN``), only when the run has one."""

    d = audit_dir(run)
    s = safe_json(d / "audit.json")
    if not isinstance(s, dict):
        return None
    sec = Section("audit", "Data audit", present=True)
    add_note(sec, f"{s.get('images')} images ({s.get('readable')} readable) audited {s.get('created')}; "
               f"{len(s.get('groups', []))} duplicate group(s), {s.get('leaking_groups', 0)} across splits.")
    md = summary_markdown(s, KINDS)
    sec.md.append(md)
    sec.html.append(html_table(*md_rows(md)))
    rows = read_csv(d / "audit.csv")
    if rows[0]:
        sec.html += findings_html(Path(s.get("data", "")), [dict(zip(rows[0], r)) for r in rows[1]], KINDS)
    sec.md.append(f"Every finding: `{os.path.relpath(d / 'audit.csv', run.path)}`; thumbnails: "
                  f"`{os.path.relpath(d / 'audit.html', run.path)}`.\n")
    return sec


# --------------------------------------------------------------------------- page


def build_sections(run_dir: "str | os.PathLike | RunLayout") -> list[Section]:
    """Every section of the report of ``run_dir`` (present or saying which command makes it)."""
    run = run_dir if isinstance(run_dir, RunLayout) else RunLayout(run_dir)
    secs = [_dataset(run), _sweep(run), _curves(run), _heads(run), _evaluate(run), gradcam_section(run),
            bundle_maps_section(run), _features(run), _resolution(run), calibration_section(run), _audit(run)]
    return [s for s in secs if s is not None]


def write_report(run_dir: str | os.PathLike) -> dict:
    """Write ``RUN/report.html`` (self-contained) and ``RUN/report.md``.

    Args:
        run_dir: a run folder written by ``transfer train``.

    Returns:
        ``{"html": Path, "md": Path, "present": [section keys], "missing": [section keys]}``.

    Raises:
        RunFolderError: the folder is missing or not a (complete) run folder.

    Example::

        write_report("runs/digits")["missing"]     # ['heads', 'resolution']
    """
    run_folder = RunFolder(run_dir)  # names what is missing
    run = run_folder.path
    info = run_folder.info
    secs = build_sections(run_folder)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"transfer run report: {run.resolve().name}"
    sub = (f"run {html.escape(str(run.resolve()))} &middot; created {html.escape(str(info.get('created', '?')))} "
           f"&middot; transfer {html.escape(str(info.get('transfer_version', '?')))} &middot; report {now}")
    nav = " ".join(
        f'<a href="#{s.key}"' + ("" if s.present else ' class="missing"') + f">{html.escape(s.title)}"
        + ("" if s.present else " (missing)") + "</a>" for s in secs)
    body = [f"<h1>{html.escape(title)}</h1>", f'<div class="sub">{sub}</div>', f"<nav>{nav}</nav>"]
    md = [f"# {title}\n", f"run `{run.resolve()}` - created {info.get('created', '?')} - transfer "
          f"{info.get('transfer_version', '?')} - report {now}\n"]
    for s in secs:
        body.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>' + "\n".join(s.html) + "</section>")
        md.append(f"## {s.title}\n\n" + "\n".join(s.md))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")
    write_text_atomic(run_folder.report_html, page)
    write_text_atomic(run_folder.report_md, "\n".join(md))
    return {"html": run_folder.report_html, "md": run_folder.report_md,
            "present": [s.key for s in secs if s.present], "missing": [s.key for s in secs if not s.present]}


__all__ = ["write_report", "build_sections", "Section"]
