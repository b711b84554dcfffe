"""The run report's sections on whether to trust what the model says and shows.

* Grad-CAM (``gradcam/<trial>/``): the verdict sentences and faithfulness table of each trial
  (:mod:`transfer.analysis.cam_verdict`), then the grids best method first; a method no better
  than its control is folded away and says so.
* Maps from the bundle: the bundle's maps (fp32, int8, fp16) beside Keras Grad-CAM
  (:mod:`transfer.analysis.bundle_maps`) and what ``transfer verify`` found about them.
* Calibration and unknown inputs: the bundle's temperature, ECE / NLL / Brier before and after
  per split with the part each split played, a reliability diagram, the unknown-input scores and
  ``transfer evaluate --unknown`` results.

The bundle sections appear only when the run has a bundle (``RUN/bundle``). Nothing is
recomputed but the reliability diagram, drawn from the manifest's numbers.
"""

from __future__ import annotations

import html
from pathlib import Path

from ..bundle import load_bundle, read_manifest
from ..errors import BundleError, TransferError
from ..map_removal import BASELINE_TEXT
from ..plots import figure, save_figure
from ..runfolder import RunLayout
from ..runtime.cam import map_findings
from .bundle_maps import compare as compare_bundle_maps
from .cam_verdict import (
    faithfulness_rows,
    faithfulness_table,
    rank_methods,
    verdict_lines,
)
from .report_blocks import (
    Section,
    add_heading,
    add_images,
    add_note,
    add_table,
    embed_image,
    html_table,
    mark_found,
    safe_json,
    trial_dirs,
)
from .unknown_study import unknown_table

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
        add_note(sec, "faithfulness.json was written by an older version of transfer (a single confidence-drop "
                   "number that passes maps without information); run transfer gradcam again.")
        return []
    first = faith[ranked[0]]
    for line in verdict_lines(faith):
        add_note(sec, line)
    if first.get("layer_note"):
        add_note(sec, first["layer_note"])
    header, rows = faithfulness_rows(faith)

    steps = int(first.get("steps") or 10)
    note = _FAITH_NOTE.format(baseline=BASELINE_TEXT.get(first.get("baseline"), first.get("baseline", "?")),
                              lo=100 / steps, hi=100 * (steps - 1) / steps, layer=first.get("layer", "?"))
    if first.get("road", "on") != "on":
        note += f" ROAD: {first['road']}."
    sec.html.append(html_table(header, rows) + f'<p class="note">{html.escape(note)}</p>')
    sec.md.append(faithfulness_table(faith, markdown=True) + "\n\n" + note + "\n")
    return ranked


def _gradcam_grids(sec: Section, run: RunLayout, d: Path, dirs: list[Path], faith: dict, ranked: list[str]) -> None:
    """Grids best method first; a method no better than its control (or not tested) is folded away and says so."""
    order = {m: i for i, m in enumerate(ranked)}
    for m in sorted(dirs, key=lambda p: (order.get(p.name, len(order)), p.name)):
        r = faith.get(m.name) if m.name in order else None
        if r is not None and r.get("beats_control"):
            add_images(sec, [(m / "grid.png", f"{d.name}: {m.name} (beats its control; flagged maps framed)")],
                    run.path, grid=False)
            continue
        why = ("no better than its control: not an explanation of this model" if r is not None
               else "not tested for faithfulness by this version")
        cap = f"{d.name}: {m.name} ({why})"
        h, md = embed_image(m / "grid.png", run.path, cap)
        sec.html.append(f"<details><summary>{html.escape(cap)} - grid kept for inspection</summary>{h}</details>")
        sec.md.append(f"{m.name}: {why}; grid kept for inspection: {md}")


def gradcam_section(run: RunLayout) -> Section:
    sec = Section("gradcam", "Grad-CAM")

    def method_dirs(d: Path) -> list[Path]:
        return sorted(m for m in d.iterdir() if m.is_dir() and (m / "grid.png").is_file())

    found = [d for d in trial_dirs(run, "gradcam", run.gradcam_dir)
             if (d / "faithfulness.json").is_file() or method_dirs(d)]
    if not mark_found(sec, found, "no Grad-CAM maps (gradcam/<trial>/)",
                  f"transfer gradcam {run.path} --method all"):
        return sec
    for d in found:
        add_heading(sec, d.name)
        faith = safe_json(d / "faithfulness.json")
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


def bundle_maps_section(run: RunLayout) -> Section | None:
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
    add_note(sec, res.note)
    if res.picture is not None:
        add_images(sec, [(res.picture, f"{trial}: Keras Grad-CAM | bundle maps")], run.path, grid=False)
        add_table(sec, res.header, res.rows)
    for line in _map_findings(run):
        add_note(sec, line)
    return sec


def _map_findings(run: RunLayout) -> list[str]:
    try:
        return map_findings(load_bundle(run.bundle_dir, trust=False))
    except TransferError:
        return []


def calibration_section(run: RunLayout) -> Section | None:
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
        add_note(sec, f"the bundle was exported without calibration; `transfer export {run.path} --force` calibrates it")
        return sec
    trial = str((m.get("source") or {}).get("trial", "bundle"))
    images = cal.get("images")
    n_val = images.get("val") if isinstance(images, dict) else images
    if cal.get("method") == "none":
        add_note(sec, f"{trial}: no temperature applied (the bundle's probabilities are the network's): "
                   f"{cal.get('reason')}")
    else:
        add_note(sec, f"{trial}: temperature {cal['temperature']:.3f} fitted on {n_val} {cal.get('fitted_on', 'val')} "
                   f"image(s) (minimum NLL) and written into the bundle's graph"
                   + (f", because {cal['reason']}" if cal.get("reason") else "") + ".")
    add_note(sec, "ECE: 15 equal-width bins; 'ECE floor': the ECE a perfectly calibrated model would show on the same "
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
        add_table(sec, ["split", "role", "probabilities", "images", "accuracy", "ECE", "ECE floor", "NLL", "Brier"], rows)
    test = cal.get("test") or {}
    if cal.get("method") != "none" and all(k in test and "reliability" in test[k] for k in ("before", "after")):
        png = run.plots_dir(trial) / "reliability.png"
        _reliability_diagram(test["before"]["reliability"], test["after"]["reliability"], png, "test")
        add_images(sec, [(png, f"{trial}: reliability diagram")], run.path, grid=False)
    unk = m.get("unknown")
    if isinstance(unk, dict) and unk.get("method") == "none":
        add_note(sec, f"no unknown-input scores: {unk.get('reason')}")
    elif unk:
        if unk.get("rule"):
            add_note(sec, f"default score {unk.get('default')}: {unk['rule']}. Rates on the synthetic outliers chose "
                       "the default: estimates, optimistic for it.")
        add_table(sec, ["score", "threshold", "val images accepted", "synthetic outliers accepted",
                     "AUROC vs synthetic outliers", ""],
               [[k, v["threshold"], v.get("val_acceptance"), (v.get("synthetic") or {}).get("expected_false_accept"),
                 (v.get("synthetic") or {}).get("mean_auroc"), "default" if k == unk.get("default") else ""]
                for k, v in unk["scores"].items()], title="unknown-input scores (transfer infer/serve --reject)")
    res = safe_json(run.evaluate_dir(trial) / "unknown.json")
    if isinstance(res, dict) and res.get("scores"):
        add_table(sec, *unknown_table(res), title=f"known test images ({res['known']}) vs unknown images "
                                                f"({res['unknown']}: {', '.join(res.get('unknown_inputs', []))})")
    else:
        add_note(sec, f"Run `transfer evaluate {run.path} --unknown DIR` with images of none of the classes to "
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


__all__ = ["bundle_maps_section", "calibration_section", "gradcam_section"]
