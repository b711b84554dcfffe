"""``transfer evaluate RUN --unknown DIR``: how well the run's bundle answers "unknown".

The known images are the test split of the trial the bundle was exported from; the unknown
ones are image files of none of its classes (classes left out of training, noise, another
dataset). For every unknown-input score the bundle carries: the AUROC (known vs unknown over
all thresholds), the FPR at 95 % TPR (the share of unknown images accepted by the threshold
that keeps 95 % of these known images) and, at the bundle's own threshold (chosen at export
on val images), the shares of unknown images (false accepts) and known images accepted --
overall and per ``--unknown`` input. The numbers come from the bundle's files, run the way
``transfer infer --reject`` runs them (:func:`transfer.runtime.unknown.evaluate_unknown`).
The test images only report here: the bundle's default score was chosen at export without
them, and the score with the highest AUROC on them is named, not adopted.

Example::

    res = evaluate_unknown_run(RunFolder("runs/digits"), ["unknown/"])
    res["scores"]["knn"]["auroc"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..bundle import load_bundle
from ..data.stream import iter_inputs
from ..errors import ConfigError
from ..fsutil import write_json_atomic
from ..progress import ProgressLike
from ..runfolder import RunFolder
from ..runtime.unknown import evaluate_unknown


def evaluate_unknown_run(run: RunFolder, unknown: Sequence[str | os.PathLike], *, bundle=None,
                         progress: ProgressLike = None) -> dict:
    """Score the run's bundle on its test split (known) against ``unknown`` files and folders
    (folders: their image files, all levels); writes ``RUN/evaluate/<trial>/unknown.json``.

    Raises:
        BundleError: no bundle at ``bundle`` (default ``RUN/bundle``) or one refused on load.
        ConfigError: the bundle has no unknown-input score, or no unknown image was found.
    """

    b = load_bundle(Path(bundle) if bundle is not None else run.bundle_dir)
    trial = run.trial(str((b.manifest.get("source") or {}).get("trial") or "best"))
    known = run.split_paths("test", fold=trial.fold)[0]
    files, groups = [], []
    for u in unknown:
        found = [p for p, err in iter_inputs([os.fspath(u)], recursive=True) if err is None]
        files += found
        groups += [os.fspath(u)] * len(found)
    if not files:
        raise ConfigError(f"no image files in {', '.join(map(str, unknown))}", option="unknown")
    res = evaluate_unknown(b, known, files, groups=groups, progress=progress)
    res.update(bundle=str(b.path), trial=trial.name, unknown_inputs=[os.fspath(u) for u in unknown])
    out = run.evaluate_dir(trial.name) / "unknown.json"
    write_json_atomic(out, res)
    res["out"] = str(out)
    return res


def unknown_table(res: dict) -> tuple[list[str], list[list]]:
    """Header and rows of an unknown-input evaluation (one row per score)."""
    pct = f"FPR at {100 * res.get('tpr', 0.95):.0f} % TPR"
    rows = [[name, s["auroc"], s.get("fpr_at_tpr"), s["threshold"], s["known_accept_rate"], s["false_accept_rate"],
             "default" if name == res.get("default") else ""] for name, s in res["scores"].items()]
    return ["score", "AUROC", pct, "threshold", "known accepted", "unknown accepted (false accept)", ""], rows


def group_table(res: dict) -> tuple[list[str], list[list]] | None:
    """Header and rows of the per-input breakdown (one row per input and score), or None with one input."""
    groups = res.get("by_group") or {}
    if len(groups) < 2:
        return None
    rows = [[g, e["images"], name, s["auroc"], s["false_accept_rate"], "default" if name == res.get("default") else ""]
            for g, e in groups.items() for name, s in e["scores"].items()]
    return ["unknown input", "images", "score", "AUROC", "false accept at threshold", ""], rows
