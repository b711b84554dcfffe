"""The audit's HTML page (``audit.html``, self-contained: thumbnails inlined) and its section of
the run report."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..fsutil import write_text_atomic
from ..tables import markdown

#: findings shown per kind (every finding is in audit.csv)
SHOWN = 24
#: kinds of findings of an audit, in the order the page shows them
KINDS = ("unreadable", "leakage", "conflicting_labels", "exact_duplicate", "near_duplicate", "label_issue",
         "outlier", "blank", "noise", "dark", "bright", "blurry", "tiny", "aspect_ratio", "grayscale")

_TITLES = {
    "unreadable": "Unreadable files", "leakage": "Duplicates across splits (leakage)",
    "conflicting_labels": "Duplicates with different labels", "exact_duplicate": "Exact duplicates",
    "near_duplicate": "Near duplicates", "label_issue": "Likely label errors (confident learning)",
    "outlier": "Outliers in feature space", "blank": "Blank images", "noise": "Noise images", "dark": "Very dark",
    "bright": "Very bright", "blurry": "Blurry", "tiny": "Tiny", "aspect_ratio": "Extreme aspect ratio",
    "grayscale": "Grayscale in a colour set",
}

_CSS = ("body{font-family:sans-serif;margin:20px;color:#1d2330}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #dde1e8;padding:3px 8px}.cells{display:flex;flex-wrap:wrap;gap:8px}"
        "figure{margin:0;width:120px;font-size:11px;word-break:break-all}figure img{width:96px;height:96px;"
        "image-rendering:pixelated;border:1px solid #ccc}h2{border-bottom:2px solid #e3e6ec}")


def _thumb(path: Path) -> str:
    """A data: URI of the image shrunk to at most 96 px (empty when it cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((96, 96))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except Exception:  # noqa: BLE001 - an unreadable file is shown without a picture
        return ""
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(root: Path, r: dict) -> str:
    src = _thumb(root / r["path"]) if r["kind"] != "unreadable" else ""
    img = f'<img alt="" src="{src}">' if src else ""
    cap = [r["path"], f"label {r['label']}" if r.get("label") else ""]
    if r.get("suggested_label"):
        cap.append(f"suggested {r['suggested_label']}")
    if r.get("split"):
        cap.append(f"split {r['split']}")
    if r.get("score") not in (None, ""):
        cap.append(f"score {float(r['score']):.3f}")
    if r.get("detail"):
        cap.append(str(r["detail"]))
    return f"<figure>{img}<figcaption>{html.escape(' / '.join(c for c in cap if c))}</figcaption></figure>"


def findings_html(root: Path, rows: list[dict], kinds) -> list[str]:
    """One block per kind with up to :data:`SHOWN` thumbnails (groups kept together)."""
    parts = []
    for kind in kinds:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        parts.append(f"<h3>{html.escape(_TITLES.get(kind, kind))} ({len(mine)})</h3>")
        parts.append('<div class="cells">' + "".join(_cell(root, r) for r in mine[:SHOWN]) + "</div>")
    return parts


def summary_markdown(summary: dict, kinds) -> str:
    counts = summary.get("counts", {})
    rows = [[_TITLES.get(k, k), counts[k]] for k in kinds if counts.get(k)]
    return markdown(["finding", "rows in audit.csv"], rows or [["nothing found", 0]])


def write_page(out: Path, root: Path, summary: dict, rows: list[dict]) -> Path:
    bal = summary.get("class_balance", {})
    src = summary.get("source", {})
    body = [f"<h1>Audit of {html.escape(str(summary.get('data')))}</h1>",
            f"<p>{summary.get('images')} images ({summary.get('readable')} readable); features of "
            f"{html.escape(', '.join(f'{k} {v}' for k, v in src.items()))}; "
            f"{summary.get('leaking_groups', 0)} duplicate group(s) straddle splits.</p>",
            *([f"<p><b>Note:</b> {html.escape(n)}</p>" for n in summary.get("notes", [])]),
            "<h2>Findings</h2>", _md_to_html(summary_markdown(summary, KINDS)),
            *_label_sources(summary.get("label_issues") or {}),
            "<h2>Class balance</h2>", _md_to_html(markdown(["class", "images"], [[c, n] for c, n in bal.items()]))]
    body += findings_html(root, rows, KINDS)
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>audit</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
    write_text_atomic(out / "audit.html", page)
    return out / "audit.html"


def _label_sources(rec: dict) -> list[str]:
    """Which probabilities judged each group of images for label issues (none of them fit the judged label)."""
    rows = [[g.get("what", g.get("group")), g.get("images"), g.get("source", "not searched"), g.get("issues", 0)]
            for g in rec.get("groups", [])]
    if not rows:
        return []
    return ["<h2>Label issues: who judged which images</h2>",
            f"<p>Probabilities of {rec.get('folds')} heads, each cross-fitted on the other folds, on views of the "
            "images that never fit the judged label; the view (or mean of views) with the smallest out-of-fold log "
            "loss on the group's labels.</p>",
            _md_to_html(markdown(["images", "count", "probabilities from", "label issues"], rows))]


def _md_to_html(md: str) -> str:
    """A Markdown table of :func:`transfer.tables.markdown` as an HTML table."""
    lines = [ln for ln in md.strip().splitlines() if ln.strip()]
    cells = [[html.escape(c.strip().replace("\\|", "|")) for c in ln.strip().strip("|").split(" | ")]
             for i, ln in enumerate(lines) if i != 1]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"
