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
run folder is spelled here); Markdown tables come from :mod:`transfer.tables`.

Example::

    from transfer.analysis.report import write_report
    paths = write_report("runs/digits")
    paths["html"]                       # runs/digits/report.html
"""

from __future__ import annotations

import base64
import csv
import html
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..bundle import load_bundle, read_manifest
from ..errors import BundleError, TransferError
from ..fsutil import read_json, write_text_atomic
from ..map_removal import BASELINE_TEXT
from ..plots import figure, save_figure
from ..runfolder import RunFolder, RunLayout
from ..runtime.cam import map_findings
from ..tables import markdown
from .audit import audit_dir
from .audit_page import KINDS, findings_html, summary_markdown
from .bundle_maps import compare as compare_bundle_maps
from .cam_verdict import faithfulness_rows, faithfulness_table, rank_methods, verdict_lines
from .unknown_study import unknown_table

#: Rows shown of a long table before the rest is folded away.
MAX_ROWS = 60

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Helvetica,Arial,sans-serif;margin:0;
 background:#f4f5f7;color:#1d2330;line-height:1.45;font-size:15px}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh;
 box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:26px;margin:4px 0 4px}h2{font-size:20px;margin:34px 0 10px;padding-bottom:4px;
 border-bottom:2px solid #e3e6ec}h3{font-size:16px;margin:20px 0 8px;color:#334}
.sub{color:#667;font-size:13px;margin-bottom:14px}
nav{background:#f7f8fa;border:1px solid #e3e6ec;border-radius:6px;padding:8px 14px;font-size:14px}
nav a{margin-right:14px;white-space:nowrap;color:#2456a6;text-decoration:none}
nav .missing{color:#999}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px;max-width:100%;display:block;overflow-x:auto}
th,td{border:1px solid #dde1e8;padding:4px 9px;text-align:left;white-space:nowrap}
th{background:#eef1f6;font-weight:600}.n{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
.kv td{text-align:left}.kv td:first-child{color:#556;font-weight:600}
figure{margin:8px 0 16px}figure img{max-width:100%;height:auto;border:1px solid #e3e6ec;border-radius:4px}
figcaption{font-size:12.5px;color:#556;margin-top:2px}
.grid{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.grid figure{flex:1 1 440px;max-width:560px;margin:0}
.missing-box{background:#fff8e6;border:1px solid #f0d9a0;border-radius:6px;padding:8px 12px;
 color:#6b5310;font-size:14px}
code{background:#f1f3f6;padding:1px 5px;border-radius:3px;font-size:13px}
details summary{cursor:pointer;color:#2456a6;font-size:13px;margin:4px 0}
.note{font-size:13px;color:#556}
"""


@dataclass
class Section:
    """One part of the report, in HTML and Markdown."""

    key: str
    title: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    present: bool = False

    def missing(self, what: str, command: str) -> None:
        self.html.append(f'<p class="missing-box">{html.escape(what)} - run <code>{html.escape(command)}</code>'
                         " to make this section.</p>")
        self.md.append(f"*{what}* - run `{command}` to make this section.\n")


# --------------------------------------------------------------------------- helpers


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [], []
    return rows[0], rows[1:]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _cell(v: str) -> str:
    """Numbers with many digits from CSV files are shortened to 4 decimals."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    if "." in v and len(v.split(".")[1]) > 4 and abs(f) < 1e6:
        return f"{f:.4f}"
    return v


def _is_num(text: str) -> bool:
    try:
        float(text.replace(",", "").split(" ")[0])
    except ValueError:
        return False
    return True


def _html_table(header, rows, *, cls: str = "") -> str:
    texts = [[_cell(str(c)) for c in r] for r in rows]
    width = max([len(header)] + [len(r) for r in texts]) if (header or texts) else 0
    numeric = [i > 0 and any(i < len(r) and r[i] != "" for r in texts)
               and all(_is_num(r[i]) for r in texts if i < len(r) and r[i] != "") for i in range(width)]

    def tr(cells, tag):
        num = ' class="n"'
        return "<tr>" + "".join(
            f"<{tag}{num if i < width and numeric[i] else ''}>{html.escape(c)}</{tag}>"
            for i, c in enumerate(cells)) + "</tr>"

    head = tr([str(h) for h in header], "th") if header else ""
    body = [tr(r, "td") for r in texts]
    cls_attr = f' class="{cls}"' if cls else ""
    if len(body) > MAX_ROWS:
        first = f"<table{cls_attr}>{head}{''.join(body[:MAX_ROWS])}</table>"
        rest = f"<table{cls_attr}>{head}{''.join(body[MAX_ROWS:])}</table>"
        return first + f"<details><summary>{len(body) - MAX_ROWS} more rows</summary>{rest}</details>"
    return f"<table{cls_attr}>{head}{''.join(body)}</table>"


def _md_table(header, rows) -> str:
    """A Markdown table of CSV cells (long decimals shortened as in the HTML)."""
    if not header:
        return ""
    return markdown([str(h) for h in header], [[_cell(str(c)) for c in r] for r in rows])


def _img(path: Path, run: Path, caption: str) -> tuple[str, str]:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    h = (f'<figure><img alt="{html.escape(caption)}" src="data:{mime};base64,{data}">'
         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    rel = os.path.relpath(path, run).replace(os.sep, "/")
    return h, f"![{caption}]({rel})\n"


def _images(sec: Section, items: list[tuple[Path, str]], run: Path, *, grid: bool = True) -> None:
    hs = []
    for p, cap in items:
        h, m = _img(p, run, cap)
        hs.append(h)
        sec.md.append(m)
    if hs:
        sec.html.append(('<div class="grid">' + "".join(hs) + "</div>") if grid and len(hs) > 1 else "".join(hs))


def _safe_json(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _trial_dirs(run: RunLayout, area: str, folder_of, *files: str) -> list[Path]:
    """The per-trial folders of an analysis area that hold any of ``files`` (all, when none is named)."""
    dirs = [folder_of(t) for t in run.analysis_trials(area)]
    return [d for d in dirs if not files or any((d / f).is_file() for f in files)]


# --------------------------------------------------------------------------- sections


def _dataset(run: RunLayout) -> Section:
    sec = Section("dataset", "Dataset")
    ds = _safe_json(run.dataset_json)
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
        _, bad_rows = _read_csv(run.bad_files_csv)
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
    sec.html.append(_html_table([], kv, cls="kv"))
    sec.md.append(_md_table(["", ""], kv))
    if bad_rows:
        sec.html.append("<details><summary>bad files</summary>"
                        + _html_table(["path", "reason"], bad_rows[:200]) + "</details>")
        sec.md.append(_md_table(["path", "reason"], bad_rows[:20]))
    return sec


def _sweep(run: RunLayout) -> Section:
    sec = Section("sweep", "Freeze sweep")
    if not run.sweep_csv.is_file():
        sec.missing("no sweep table (sweep.csv)", f"transfer train DATA --out {run.path}")
        return sec
    sec.present = True
    _table(sec, *_read_csv(run.sweep_csv))
    best = _safe_json(run.best_json)
    if isinstance(best, dict) and best.get("trial"):
        line = f"Best trial: {best['trial']} ({best.get('metric', 'val_accuracy')} {_fmt(best.get('value'))}"
        if best.get("test_accuracy") is not None:
            line += f", test accuracy {_fmt(best['test_accuracy'])}"
        line += ")."
        _note(sec, line)
        clean = best.get("test_without_duplicates")
        if isinstance(clean, dict) and clean.get("left_out"):
            _note(sec, f"Test accuracy with the {clean['left_out']} test image(s) that have a copy in train or val: "
                       f"{_fmt(best.get('test_accuracy'))}; without them ({clean.get('images')} images): "
                       f"{_fmt(clean.get('accuracy'))}. The copies are listed in duplicates.csv; "
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
            cells.append(f"{_fmt(s.get('accuracy'))}{what}")
            if t in d.get("stopped", []):
                outcome = f"stopped at epoch {d['epoch']}"
            elif s.get("state") in ("complete", "failed") and outcome.startswith("trained"):
                outcome = (f"complete at epoch {s.get('epoch')} (its training ended there)" if s["state"] == "complete"
                           else f"failed at epoch {s.get('epoch')}")
        rows.append([t] + cells + [outcome])
    _table(sec, header, rows, title="Successive halving: validation accuracy at each rung")
    _note(sec, f"Each rung ranks the trials still training by the validation accuracy of their saved epoch (ties: "
               f"more trainable parameters, then the name) and keeps the best 1/{record.get('rate')}; the rest stop "
               f"there and are evaluated as they are. The best trial is chosen among the trials trained to the full "
               f"budget (rungs.json).")


def _table(sec: Section, header, rows, title: str | None = None) -> None:
    """A table in both renderings (with an ``h3`` title when given)."""
    h3 = f"<h3>{html.escape(title)}</h3>" if title else ""
    sec.html.append(h3 + _html_table(header, rows))
    sec.md.append((f"### {title}\n\n" if title else "") + _md_table(header, rows))


def _note(sec: Section, line: str) -> None:
    sec.html.append(f'<p class="note">{html.escape(line)}</p>')
    sec.md.append(line + "\n")


def _image_section(run: RunLayout, key: str, title: str, items: list[tuple[Path, str]], what: str,
                   command: str) -> Section:
    """A section of pictures only; ``what`` / ``command`` say what is missing and what makes it."""
    sec = Section(key, title)
    if not items:
        sec.missing(what, command)
        return sec
    sec.present = True
    _images(sec, items, run.path)
    return sec


def _curves(run: RunLayout) -> Section:
    trials = sorted(d.name for d in run.trials_dir.iterdir() if d.is_dir()) if run.trials_dir.is_dir() else []
    items = [(run.trial_paths(t).curves_png, t) for t in trials if run.trial_paths(t).curves_png.is_file()]
    return _image_section(run, "curves", "Training curves", items, "no training curves (trials/<trial>/curves.png)",
                          f"transfer train DATA --out {run.path}")


def _heads(run: RunLayout) -> Section:
    sec = Section("heads", "Classical heads on learned features")
    found = _trial_dirs(run, "heads", run.heads_dir, "heads.csv")
    if not _found(sec, found, "no classical-head comparison (heads/<trial>/heads.csv)", f"transfer heads {run.path}"):
        return sec
    for d in found:
        _table(sec, *_read_csv(d / "heads.csv"), title=d.name)
    return sec


def _metrics_summary(sec: Section, m: dict, *, averages: bool = True) -> None:
    """Top-level scalars as one line; averages (dicts such as macro / weighted) as one small table."""
    skip = {"trial", "outputs", "class_names", "per_class"}
    line = ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()
                     if k not in skip and not isinstance(v, (dict, list)))
    if line:
        _note(sec, line)
    avgs = {k: v for k, v in m.items() if k not in skip and isinstance(v, dict)
            and v and all(not isinstance(x, (dict, list)) for x in v.values())}
    if avgs and averages:
        cols: list[str] = []
        for v in avgs.values():
            cols += [c for c in v if c not in cols]
        _table(sec, ["average"] + cols, [[k] + [_fmt(v.get(c, "")) for c in cols] for k, v in avgs.items()])


def _found(sec: Section, found: list, what: str, command: str) -> bool:
    """Mark the section present when ``found`` is not empty, else say what is missing."""
    if not found:
        sec.missing(what, command)
        return False
    sec.present = True
    return True


def _heading(sec: Section, name: str) -> None:
    sec.html.append(f"<h3>{html.escape(name)}</h3>")
    sec.md.append(f"### {name}\n")


def _evaluate(run: RunLayout) -> Section:
    sec = Section("evaluate", "Per-class metrics and confusion matrix")
    found = _trial_dirs(run, "evaluate", run.evaluate_dir, "metrics.json", "per_class.csv", "confusion.png")
    if not _found(sec, found, "no evaluation (evaluate/<trial>/)", f"transfer evaluate {run.path}"):
        return sec
    for d in found:
        _heading(sec, d.name)
        m = _safe_json(d / "metrics.json")
        if isinstance(m, dict):
            _metrics_summary(sec, m, averages=not (d / "per_class.csv").is_file())
        if (d / "per_class.csv").is_file():
            _table(sec, *_read_csv(d / "per_class.csv"))
        else:
            sec.html.append('<p class="note">per_class.csv missing</p>')
        pics = [(d / f, f"{d.name}: {cap}") for f, cap in (
            ("confusion.png", "confusion matrix"), ("samples.png", "random test images: predicted / true"),
            ("wrong.png", "most confidently wrong")) if (d / f).is_file()]
        _images(sec, pics, run.path)
    return sec


_FAITH_NOTE = (
    "Faithfulness: for each image the pixels are removed in the order of the map (deletion: the explained "
    "class's probability as 0..100 % of them become {baseline}, area under the curve, lower is better; "
    "insertion: put back onto it, higher is better; ROAD MoRF / LeRF: the most / least relevant {lo:g}..{hi:g} % "
    "filled in from their neighbours, mean probability, lower / higher is better). Each number is also measured "
    "for a control: the median over maps of images of another class from the same method (as smooth, but about "
    "other images), and the table gives map / control (share of images where the map beats it). Only images where "
    "the baseline alone removes at least half of the class probability above chance are scored (the others "
    "cannot show a drop). A method beats its control when a sign test on the deletion and on the ROAD MoRF wins "
    "gives p < 0.05. Layer {layer}.")


def _faithfulness(sec: Section, faith: dict) -> list[str]:
    """The verdict sentences and the table of one trial; returns the methods best first."""
    ranked = rank_methods(faith)
    if not ranked:
        _note(sec, "faithfulness.json was written by an older version of transfer (a single confidence-drop "
                   "number that passes maps without information); run transfer gradcam again.")
        return []
    first = faith[ranked[0]]
    for line in verdict_lines(faith):
        _note(sec, line)
    if first.get("layer_note"):
        _note(sec, first["layer_note"])
    header, rows = faithfulness_rows(faith)

    steps = int(first.get("steps") or 10)
    note = _FAITH_NOTE.format(baseline=BASELINE_TEXT.get(first.get("baseline"), first.get("baseline", "?")),
                              lo=100 / steps, hi=100 * (steps - 1) / steps, layer=first.get("layer", "?"))
    if first.get("road", "on") != "on":
        note += f" ROAD: {first['road']}."
    sec.html.append(_html_table(header, rows) + f'<p class="note">{html.escape(note)}</p>')
    sec.md.append(faithfulness_table(faith, markdown=True) + "\n\n" + note + "\n")
    return ranked


def _gradcam_grids(sec: Section, run: RunLayout, d: Path, dirs: list[Path], faith: dict, ranked: list[str]) -> None:
    """Grids best method first; a method no better than its control (or not tested) is folded away and says so."""
    order = {m: i for i, m in enumerate(ranked)}
    for m in sorted(dirs, key=lambda p: (order.get(p.name, len(order)), p.name)):
        r = faith.get(m.name) if m.name in order else None
        if r is not None and r.get("beats_control"):
            _images(sec, [(m / "grid.png", f"{d.name}: {m.name} (beats its control; flagged maps framed)")],
                    run.path, grid=False)
            continue
        why = ("no better than its control: not an explanation of this model" if r is not None
               else "not tested for faithfulness by this version")
        cap = f"{d.name}: {m.name} ({why})"
        h, md = _img(m / "grid.png", run.path, cap)
        sec.html.append(f"<details><summary>{html.escape(cap)} - grid kept for inspection</summary>{h}</details>")
        sec.md.append(f"{m.name}: {why}; grid kept for inspection: {md}")


def _gradcam(run: RunLayout) -> Section:
    sec = Section("gradcam", "Grad-CAM")

    def method_dirs(d: Path) -> list[Path]:
        return sorted(m for m in d.iterdir() if m.is_dir() and (m / "grid.png").is_file())

    found = [d for d in _trial_dirs(run, "gradcam", run.gradcam_dir)
             if (d / "faithfulness.json").is_file() or method_dirs(d)]
    if not _found(sec, found, "no Grad-CAM maps (gradcam/<trial>/)",
                  f"transfer gradcam {run.path} --method all"):
        return sec
    for d in found:
        _heading(sec, d.name)
        faith = _safe_json(d / "faithfulness.json")
        faith = faith if isinstance(faith, dict) else {}
        try:
            ranked = _faithfulness(sec, faith) if faith else []
        except (KeyError, TypeError, ValueError, AttributeError):
            sec.html.append('<p class="note">faithfulness.json unreadable</p>')
            ranked = []
        _gradcam_grids(sec, run, d, method_dirs(d), faith, ranked)
    return sec


def _bundle_manifest(run: RunLayout) -> dict | None:
    """The run's bundle manifest, or ``None`` without a readable bundle (its sections are left out)."""
    try:
        return read_manifest(run.bundle_dir) if run.bundle_dir.is_dir() else None
    except BundleError:
        return None


def _bundle_maps(run: RunLayout) -> Section | None:
    """The bundle's maps (fp32, int8, fp16) beside Keras Grad-CAM for the images ``transfer gradcam``
    explained for the bundle's trial (:mod:`transfer.analysis.bundle_maps`); only with a bundle."""
    m = _bundle_manifest(run)
    if m is None:
        return None
    sec = Section("bundle_maps", "Maps from the bundle")
    trial = str((m.get("source") or {}).get("trial", ""))
    res = compare_bundle_maps(run.bundle_dir, run.gradcam_dir(trial) / "gradcam", run.gradcam_dir(trial) / "bundle_maps.png")
    if res is None:
        sec.missing(f"no Grad-CAM maps of the bundle's trial {trial} to compare with",
                    f"transfer gradcam {run.path} --trial {trial} --method gradcam --save-maps")
        return sec
    sec.present = True
    _note(sec, res.note)
    if res.picture is not None:
        _images(sec, [(res.picture, f"{trial}: Keras Grad-CAM | bundle maps")], run.path, grid=False)
        _table(sec, res.header, res.rows)
    for line in _map_findings(run):
        _note(sec, line)
    return sec


def _map_findings(run: RunLayout) -> list[str]:
    try:
        return map_findings(load_bundle(run.bundle_dir, trust=False))
    except TransferError:
        return []


def _features(run: RunLayout) -> Section:
    items = [(run.plots_dir(t) / f"features_{kind}.png", f"{t}: {name} of the features")
             for t in run.analysis_trials("plots") for kind, name in (("pca", "PCA"), ("tsne", "t-SNE"))
             if (run.plots_dir(t) / f"features_{kind}.png").is_file()]
    return _image_section(run, "features", "Learned features", items,
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
        info = _safe_json(d / f"{m}.json") or {}
        title = labels[m] + (f" (trial {info['trial']})" if info.get("trial") else "")
        _table(sec, *_read_csv(d / f"{m}.csv"), title=title)
        if (d / f"{m}_per_class.csv").is_file():
            ph, pr = _read_csv(d / f"{m}_per_class.csv")
            sec.html.append("<details><summary>per class</summary>" + _html_table(ph, pr) + "</details>")
        if (d / f"{m}.png").is_file():
            _images(sec, [(d / f"{m}.png", title)], run.path, grid=False)
    if (d / "compare.csv").is_file():
        _table(sec, *_read_csv(d / "compare.csv"), title="TOTV vs TVTV")
        if (d / "compare.png").is_file():
            _images(sec, [(d / "compare.png", "TOTV vs TVTV")], run.path, grid=False)
    elif len(modes) == 1:
        other = "tvtv" if modes[0] == "totv" else "totv"
        sec.html.append(f'<p class="note">Run <code>transfer resolution {html.escape(str(run.path))} --mode {other}</code> '
                        "as well to compare TOTV with TVTV.</p>")
        sec.md.append(f"Run `transfer resolution {run.path} --mode {other}` as well to compare TOTV with TVTV.\n")
    return sec


def _audit(run: RunLayout) -> Section | None:
    """The data audit (``transfer data audit DATA --run RUN``), only when the run has one."""

    d = audit_dir(run)
    s = _safe_json(d / "audit.json")
    if not isinstance(s, dict):
        return None
    sec = Section("audit", "Data audit", present=True)
    _note(sec, f"{s.get('images')} images ({s.get('readable')} readable) audited {s.get('created')}; "
               f"{len(s.get('groups', []))} duplicate group(s), {s.get('leaking_groups', 0)} across splits.")
    md = summary_markdown(s, KINDS)
    sec.md.append(md)
    sec.html.append(_html_table(*_md_rows(md)))
    rows = _read_csv(d / "audit.csv")
    if rows[0]:
        sec.html += findings_html(Path(s.get("data", "")), [dict(zip(rows[0], r)) for r in rows[1]], KINDS)
    sec.md.append(f"Every finding: `{os.path.relpath(d / 'audit.csv', run.path)}`; thumbnails: "
                  f"`{os.path.relpath(d / 'audit.html', run.path)}`.\n")
    return sec


def _calibration(run: RunLayout) -> Section | None:
    """The bundle's calibration (temperature, ECE / NLL / Brier before and after, a reliability
    diagram) and unknown-input scores, with ``transfer evaluate --unknown`` results if any; only
    when the run has a bundle (``RUN/bundle``)."""

    sec = Section("calibration", "Calibration and unknown inputs")
    m = _bundle_manifest(run)
    if m is None:
        return None
    sec.present = True
    cal = m.get("calibration")
    if not cal:
        _note(sec, f"the bundle was exported without calibration; `transfer export {run.path} --force` calibrates it")
        return sec
    trial = str((m.get("source") or {}).get("trial", "bundle"))
    images = cal.get("images")
    n_val = images.get("val") if isinstance(images, dict) else images
    if cal.get("method") == "none":
        _note(sec, f"{trial}: no temperature applied (the bundle's probabilities are the network's): "
                   f"{cal.get('reason')}")
    else:
        _note(sec, f"{trial}: temperature {cal['temperature']:.3f} fitted on {n_val} {cal.get('fitted_on', 'val')} "
                   f"image(s) (minimum NLL) and written into the bundle's graph"
                   + (f", because {cal['reason']}" if cal.get("reason") else "") + ".")
    _note(sec, "ECE: 15 equal-width bins; 'ECE floor': the ECE a perfectly calibrated model would show on the same "
               "images. Val chose the temperature (and the model): its numbers are optimistic; test only reports.")
    rows = []
    for split in ("val", "test"):
        entry = cal.get(split) or {}
        for when in ("before", "after"):
            r = entry.get(when)
            if r:
                rows.append([split, "chose" if split == "val" else "reported only",
                             "calibrated" if when == "after" else "network", r["images"], r["accuracy"], r["ece"],
                             r.get("ece_floor"), r["nll"], r["brier"]])
    if rows:
        _table(sec, ["split", "role", "probabilities", "images", "accuracy", "ECE", "ECE floor", "NLL", "Brier"], rows)
    test = cal.get("test") or {}
    if cal.get("method") != "none" and all(k in test and "reliability" in test[k] for k in ("before", "after")):
        png = run.plots_dir(trial) / "reliability.png"
        _reliability_diagram(test["before"]["reliability"], test["after"]["reliability"], png, "test")
        _images(sec, [(png, f"{trial}: reliability diagram")], run.path, grid=False)
    unk = m.get("unknown")
    if isinstance(unk, dict) and unk.get("method") == "none":
        _note(sec, f"no unknown-input scores: {unk.get('reason')}")
    elif unk:
        if unk.get("rule"):
            _note(sec, f"default score {unk.get('default')}: {unk['rule']}. Rates on the synthetic outliers chose "
                       "the default: estimates, optimistic for it.")
        _table(sec, ["score", "threshold", "val images accepted", "synthetic outliers accepted",
                     "AUROC vs synthetic outliers", ""],
               [[k, v["threshold"], v.get("val_acceptance"), (v.get("synthetic") or {}).get("expected_false_accept"),
                 (v.get("synthetic") or {}).get("mean_auroc"), "default" if k == unk.get("default") else ""]
                for k, v in unk["scores"].items()], title="unknown-input scores (transfer infer/serve --reject)")
    res = _safe_json(run.evaluate_dir(trial) / "unknown.json")
    if isinstance(res, dict) and res.get("scores"):
        _table(sec, *unknown_table(res), title=f"known test images ({res['known']}) vs unknown images "
                                                f"({res['unknown']}: {', '.join(res.get('unknown_inputs', []))})")
    else:
        _note(sec, f"Run `transfer evaluate {run.path} --unknown DIR` with images of none of the classes to "
                   "measure how well these scores separate them.")
    return sec


def _reliability_diagram(before: dict, after: dict, path: Path, split: str) -> None:
    with figure(figsize=(4.6, 4.2), purpose="the reliability diagram") as (fig, ax):
        edges = before["edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect calibration")
        for r, label, marker in ((before, "before", "o"), (after, "after temperature", "s")):
            pts = [(c, a) for c, a, n in zip(r["confidence"], r["accuracy"], r["count"]) if n]
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=label)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel(f"accuracy ({split} images)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xticks([round(c, 1) for c in centers[::3]])
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        save_figure(fig, path)


def _md_rows(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln.strip().strip("|") for ln in md.strip().splitlines()]
    cells = [[c.strip() for c in ln.split(" | ")] for i, ln in enumerate(lines) if i != 1]
    return cells[0], cells[1:]


# --------------------------------------------------------------------------- page


def build_sections(run_dir: "str | os.PathLike | RunLayout") -> list[Section]:
    """Every section of the report of ``run_dir`` (present or saying which command makes it)."""
    run = run_dir if isinstance(run_dir, RunLayout) else RunLayout(run_dir)
    secs = [_dataset(run), _sweep(run), _curves(run), _heads(run), _evaluate(run), _gradcam(run), _bundle_maps(run), _features(run),
            _resolution(run), _calibration(run), _audit(run)]
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
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")
    write_text_atomic(run_folder.report_html, page)
    write_text_atomic(run_folder.report_md, "\n".join(md))
    return {"html": run_folder.report_html, "md": run_folder.report_md,
            "present": [s.key for s in secs if s.present], "missing": [s.key for s in secs if not s.present]}


__all__ = ["write_report", "build_sections", "Section"]
