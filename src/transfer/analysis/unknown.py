"""``transfer evaluate RUN --unknown DIR``: how well the run's bundle answers "unknown".

The known images are the test split of the trial the bundle was exported from; the unknown
ones are image files of none of its classes (classes left out of training, noise, another
dataset). For each unknown-input score the bundle carries, the AUROC (known vs unknown over
all thresholds) and, at the bundle's own threshold, the share of unknown images accepted
(false-accept rate) and of known images accepted. The numbers come from the bundle's
files, run the way ``transfer infer --reject`` runs them
(:func:`transfer.runtime.unknown.evaluate_unknown`).

Example::

    res = evaluate_unknown_run(RunFolder("runs/digits"), ["unknown/"])
    res["scores"]["mahalanobis"]["auroc"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..fsutil import write_json_atomic
from ..progress import ProgressLike
from ..runfolder import RunFolder


def evaluate_unknown_run(rf: RunFolder, unknown: Sequence[str | os.PathLike], *, bundle=None,
                         progress: ProgressLike = None) -> dict:
    """Score the run's bundle on its test split (known) against ``unknown`` files and folders
    (folders: their image files, all levels); writes ``RUN/evaluate/<trial>/unknown.json``.

    Raises:
        BundleError: no bundle at ``bundle`` (default ``RUN/bundle``) or one refused on load.
        ConfigError: the bundle has no unknown-input score, or no unknown image was found.
    """
    from ..bundle import load_bundle
    from ..data.stream import iter_inputs
    from ..runtime.unknown import evaluate_unknown

    b = load_bundle(Path(bundle) if bundle is not None else rf.bundle_dir)
    trial = rf.trial(str((b.manifest.get("source") or {}).get("trial") or "best"))
    known = rf.split_paths("test", fold=trial.fold)[0]
    files = [p for p, err in iter_inputs([os.fspath(u) for u in unknown], recursive=True) if err is None]
    if not files:
        raise ConfigError(f"no image files in {', '.join(map(str, unknown))}", option="unknown")
    res = evaluate_unknown(b, known, files, progress=progress)
    res.update(bundle=str(b.path), trial=trial.name, unknown_inputs=[os.fspath(u) for u in unknown])
    out = rf.evaluate_dir(trial.name) / "unknown.json"
    write_json_atomic(out, res)
    res["out"] = str(out)
    return res


def unknown_table(res: dict) -> tuple[list[str], list[list]]:
    """Header and rows of an unknown-input evaluation (one row per score)."""
    rows = [[name, s["auroc"], s["threshold"], s["known_accept_rate"], s["false_accept_rate"],
             "default" if name == res.get("default") else ""] for name, s in res["scores"].items()]
    return ["score", "AUROC", "threshold", "known accepted", "unknown accepted (false accept)", ""], rows
