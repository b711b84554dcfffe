"""Which class-activation method to trust on a model, from the faithfulness summaries ``transfer gradcam`` wrote.

A trial's ``gradcam/<trial>/faithfulness.json`` holds one summary per method
(:func:`transfer.faithfulness.summarize_faithfulness`). Here they are ranked
(:func:`rank_methods`: those that beat their control first, then by the smaller of the deletion
and ROAD-MoRF shares), put in one table (:func:`faithfulness_table`, legend :data:`TABLE_LEGEND`)
and said in sentences (:func:`verdict_lines`) for ``transfer gradcam`` and the run report.
Plain Python: no TensorFlow, no numpy.

Example::

    from transfer.analysis.cam_verdict import rank_methods, verdict_lines
    faith = read_json("RUN/gradcam/arc2-t100/faithfulness.json")
    rank_methods(faith)          # e.g. ['scorecam', 'gradcam++', 'gradcam']
    verdict_lines(faith)[0]      # 'Leads with scorecam: its maps beat another image's map on ...'
"""

from __future__ import annotations

from .. import tables
from .gradcam_config import METHODS

#: the faithfulness numbers shown, with their names in tables
_SHOWN = (("deletion_auc", "deletion AUC"), ("insertion_auc", "insertion AUC"), ("road_morf", "ROAD MoRF"),
          ("road_lerf", "ROAD LeRF"))


def current_entries(faith: dict) -> dict:
    """The entries of a merged faithfulness.json written by this version (with ``metrics``)."""
    return {m: r for m, r in faith.items() if isinstance(r, dict) and isinstance(r.get("metrics"), dict)}


def rank_methods(faith: dict) -> list[str]:
    """Methods best first: those that beat their control, then by ``min_share_deletion_road`` (the smaller of
    the deletion and ROAD-MoRF shares of images where the map beats its control).

    Example::

        rank_methods(read_json("RUN/gradcam/arc2-t100/faithfulness.json"))    # ['scorecam', 'gradcam++', 'gradcam']
    """
    cur = current_entries(faith)
    return sorted(cur, key=lambda m: (not cur[m].get("beats_control"), -(cur[m].get("min_share_deletion_road") or 0.0),
                                      METHODS.index(m) if m in METHODS else len(METHODS), m))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


#: what a cell of the faithfulness table says (printed with it)
TABLE_LEGEND = ("each cell: the map's number / its control's, the median over maps of images of another class "
                "(share of measurable images where the map beats it); deletion AUC and ROAD MoRF: lower is better, "
                "insertion AUC and ROAD LeRF: higher")


def faithfulness_rows(faith: dict) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)``, best method first: per number ``map / control (share of images where the map beats it)``
    (:data:`TABLE_LEGEND`)."""
    cur = current_entries(faith)
    methods = rank_methods(faith)
    if not methods:
        return [], []
    header = ["method", "images", "empty / border maps"] + [name for _, name in _SHOWN] + ["beats its control"]
    rows = []
    for m in methods:
        r = cur[m]
        fl = r.get("flags", {})
        n, k = r.get("images", "-"), r.get("measurable", r.get("images", "-"))
        row = [m, str(n) if k == n else f"{k} of {n} measurable", f"{fl.get('empty', 0)} / {fl.get('border', 0)}"]
        for k, _ in _SHOWN:
            v = r["metrics"].get(k)
            row.append("-" if not v else f"{v['map']:.3f} / {v['control']:.3f} ({_pct(v['map_beats_control'])})")
        row.append("yes" if r.get("beats_control") else "no")
        rows.append(row)
    return header, rows


def faithfulness_table(faith: dict, *, markdown: bool = False) -> str:
    """The faithfulness results as a text (or Markdown) table, best method first.

    Example::

        print(faithfulness_table(read_json("RUN/gradcam/arc2-t000/faithfulness.json")))
    """
    header, rows = faithfulness_rows(faith)
    if not header:
        return "(no faithfulness results of this version; run transfer gradcam again)"
    align = "l" + "r" * (len(header) - 1)
    return tables.markdown(header, rows, align=align) if markdown else tables.text(header, rows).rstrip("\n")


def shares_text(r: dict) -> str:
    """Where one method's maps beat their control: "deletion in 88 % and on ROAD in 90 % of the 40 images"."""
    m = r["metrics"]
    parts = [f"{name} in {_pct(m[k]['map_beats_control'])}" for k, name in (("deletion_auc", "deletion"),
                                                                             ("road_morf", "ROAD")) if k in m]
    n, k = r.get("images"), r.get("measurable", r.get("images"))
    tail = f" of the {k} measurable images" if k != n else f" of the {n} images"
    return " and on ".join(parts) + tail


def verdict_lines(faith: dict) -> list[str]:
    """Sentences for people: which method's maps to trust on this model, which are no better than
    their control, and how many maps are flagged.

    Example::

        verdict_lines(faith)[0]
        # 'Leads with scorecam: its maps beat another image's map on deletion in 88 % and on ROAD in 90 % ...'
    """
    cur = current_entries(faith)
    ranked = rank_methods(faith)
    if not ranked:
        return []
    out = []
    good = [m for m in ranked if cur[m].get("beats_control")]
    if good:
        r = cur[good[0]]
        ps = ", ".join(f"{v['sign_test_p']:.2g}" for k, v in r["metrics"].items() if k in ("deletion_auc", "road_morf"))
        out.append(f"Leads with {good[0]}: its maps beat another image's map on {shares_text(r)} (sign tests p = {ps}).")
    else:
        out.append("No method's maps beat another image's map on this model: none of these maps shows what the "
                   "model uses (try another --layer, or more --samples if there are few images).")
    r0 = cur[ranked[0]]
    skipped = r0.get("images", 0) - r0.get("measurable", r0.get("images", 0))
    if skipped:
        out.append(f"{skipped} of {r0.get('images')} images are not measurable: the removal baseline alone keeps at "
                   f"least half of their class probability above chance, so no removal can show what the model "
                   "needs there "
                   "(listed in faithfulness.json, 'measurable' in maps.csv); the shares count the others.")
    for m in ranked:
        r = cur[m]
        if m not in good:
            out.append(f"{m}: no better than its control (the map beats another image's map on {shares_text(r)}); "
                       "its maps are not an explanation of this model.")
        fl = r.get("flags", {})
        if fl.get("empty") or fl.get("border"):
            out.append(f"{m}: {fl.get('empty', 0)} of {r.get('images')} maps empty (no positive evidence), "
                       f"{fl.get('border', 0)} with most of their mass on the image border; marked in the grid.")
    return out


__all__ = ["TABLE_LEGEND", "current_entries", "faithfulness_rows", "faithfulness_table", "rank_methods",
           "shares_text", "verdict_lines"]
