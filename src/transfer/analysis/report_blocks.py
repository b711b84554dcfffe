"""The building blocks of the run report: a :class:`Section` in HTML and Markdown, its tables,
images (inlined as base64 ``data:`` URIs in the HTML, linked by relative path in the Markdown),
notes and headings, the page's CSS, and safe readers of the files the sections show.

Markdown tables come from :mod:`transfer.tables`; the sections themselves are in
:mod:`transfer.analysis.report` (the data and training) and :mod:`transfer.analysis.report_trust`
(Grad-CAM, the bundle's maps, calibration).

Example::

    sec = Section("heads", "Classical heads on learned features")
    add_table(sec, ["head", "accuracy"], [["rf", "0.97"]], title="arc2-t100")
    add_note(sec, "val chose the head; test only reports")
"""

from __future__ import annotations

import base64
import csv
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..fsutil import read_json
from ..runfolder import RunLayout
from ..tables import markdown

#: Rows shown of a long table before the rest is folded away.
MAX_ROWS = 60

CSS = """
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


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [], []
    return rows[0], rows[1:]


def fmt_value(v) -> str:
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


def html_table(header, rows, *, cls: str = "") -> str:
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


def md_table(header, rows) -> str:
    """A Markdown table of CSV cells (long decimals shortened as in the HTML)."""
    if not header:
        return ""
    return markdown([str(h) for h in header], [[_cell(str(c)) for c in r] for r in rows])


def embed_image(path: Path, run: Path, caption: str) -> tuple[str, str]:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    h = (f'<figure><img alt="{html.escape(caption)}" src="data:{mime};base64,{data}">'
         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    rel = os.path.relpath(path, run).replace(os.sep, "/")
    return h, f"![{caption}]({rel})\n"


def add_images(sec: Section, items: list[tuple[Path, str]], run: Path, *, grid: bool = True) -> None:
    hs = []
    for p, cap in items:
        h, m = embed_image(p, run, cap)
        hs.append(h)
        sec.md.append(m)
    if hs:
        sec.html.append(('<div class="grid">' + "".join(hs) + "</div>") if grid and len(hs) > 1 else "".join(hs))


def safe_json(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def trial_dirs(run: RunLayout, area: str, folder_of, *files: str) -> list[Path]:
    """The per-trial folders of an analysis area that hold any of ``files`` (all, when none is named)."""
    dirs = [folder_of(t) for t in run.analysis_trials(area)]
    return [d for d in dirs if not files or any((d / f).is_file() for f in files)]


def add_table(sec: Section, header, rows, title: str | None = None) -> None:
    """A table in both renderings (with an ``h3`` title when given)."""
    h3 = f"<h3>{html.escape(title)}</h3>" if title else ""
    sec.html.append(h3 + html_table(header, rows))
    sec.md.append((f"### {title}\n\n" if title else "") + md_table(header, rows))


def add_note(sec: Section, line: str) -> None:
    sec.html.append(f'<p class="note">{html.escape(line)}</p>')
    sec.md.append(line + "\n")


def image_section(run: RunLayout, key: str, title: str, items: list[tuple[Path, str]], what: str,
                   command: str) -> Section:
    """A section of pictures only; ``what`` / ``command`` say what is missing and what makes it."""
    sec = Section(key, title)
    if not items:
        sec.missing(what, command)
        return sec
    sec.present = True
    add_images(sec, items, run.path)
    return sec


def mark_found(sec: Section, found: list, what: str, command: str) -> bool:
    """Mark the section present when ``found`` is not empty, else say what is missing."""
    if not found:
        sec.missing(what, command)
        return False
    sec.present = True
    return True


def add_heading(sec: Section, name: str) -> None:
    sec.html.append(f"<h3>{html.escape(name)}</h3>")
    sec.md.append(f"### {name}\n")


def md_rows(md: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a Markdown table (the audit's summary, shown in the HTML)."""
    lines = [ln.strip().strip("|") for ln in md.strip().splitlines()]
    cells = [[c.strip() for c in ln.split(" | ")] for i, ln in enumerate(lines) if i != 1]
    return cells[0], cells[1:]


__all__ = ["CSS", "MAX_ROWS", "Section", "add_heading", "add_images", "add_note", "add_table", "embed_image",
           "fmt_value", "html_table", "image_section", "mark_found", "md_rows", "md_table", "read_csv", "safe_json",
           "trial_dirs"]
