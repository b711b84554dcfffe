"""`transfer report`: one self-contained page; a headless-chromium render in a slow test."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from transfer.cli import cli
from transfer.errors import RunFolderError
from transfer.analysis.report import write_report


def _fill_other_sections(run: Path, trial: str) -> None:
    """Files the heads / evaluate / features commands write (their layout of docs/design.md)."""
    h = run / "heads" / trial
    h.mkdir(parents=True)
    (h / "heads.csv").write_text("head,train,val,test,fit_seconds,predict_seconds\n"
                                 "network,0.98,0.95,0.94,,0.01\nrf,0.99,0.93,0.92,0.5,0.02\n")
    e = run / "evaluate" / trial
    e.mkdir(parents=True)
    (e / "per_class.csv").write_text("class,precision,recall,f1,support\nc0,1.0,0.5,0.6666667,4\n"
                                     "c1,0.8,1.0,0.8888889,4\nc2,1.0,1.0,1.0,4\n")
    (e / "metrics.json").write_text('{"split": "test", "accuracy": 0.8333, "macro": {"precision": 0.93}}')
    img = np.zeros((60, 80, 3), np.uint8)
    img[:, :40] = (200, 30, 30)
    Image.fromarray(img).save(e / "confusion.png")
    p = run / "plots" / trial
    p.mkdir(parents=True)
    Image.fromarray(img[::-1]).save(p / "features_pca.png")


@pytest.fixture(scope="module")
def full_run(explain_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(explain_run, run)
    runner = CliRunner()
    for args in (["gradcam", str(run), "--method", "gradcam,gradcam++", "--samples", "6", "-q"],
                 ["resolution", str(run), "--sizes", "16,8,4", "-q"]):
        r = runner.invoke(cli, args)
        assert r.exit_code == 0, r.output
    (run / "bad_files.csv").write_text("path,reason\nc0/broken.png,truncated or corrupt image data\n")
    return run


def test_report_missing_sections_name_their_command(run_copy):
    r = CliRunner().invoke(cli, ["report", str(run_copy)])
    assert r.exit_code == 0, r.output
    assert "missing: heads, evaluate, gradcam, features, resolution" in r.output
    page = (run_copy / "report.html").read_text()
    md = (run_copy / "report.md").read_text()
    for cmd in ("transfer heads", "transfer evaluate", "transfer gradcam", "transfer features",
                "transfer resolution"):
        assert cmd in page and cmd in md, cmd
    assert "arc2 0%" in page and "val accuracy" in page  # the sweep table
    assert page.count("data:image/png;base64,") == 2  # the curves of both trials


def test_full_report_is_self_contained(full_run):
    trial = (full_run / "best.json").read_text().split('"trial": "')[1].split('"')[0]
    _fill_other_sections(full_run, trial)
    out = write_report(full_run)
    assert out["missing"] == [] and len(out["present"]) == 8
    page = out["html"].read_text()
    # self-contained: no external scripts, styles or images
    assert not re.search(r'<(script|link)\b', page)
    assert not re.search(r'src="(?!data:)', page)
    assert "http://" not in page and "https://" not in page
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # 2 curves + confusion + 2 Grad-CAM grids + PCA + 1 resolution chart
    assert len(imgs) == 7
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("Freeze sweep", "Classical heads", "rf", "Per-class metrics", "0.6667", "Grad-CAM",
                 "gradcam++", "deletion AUC", "ROAD MoRF", "beats its control", "TOTV", "bad files",
                 "1 (bad_files.csv)", "c0/broken.png"):
        assert text in page, text
    md = out["md"].read_text()
    assert "| method | images | empty / border maps |" in md and "![" in md
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (full_run / link).is_file(), link


def _faith(share: float, beats: bool, empty: int = 0) -> dict:
    metric = {"better": "lower", "map": 0.3, "control": 0.5, "map_beats_control": share, "sign_test_p": 0.01}
    return {"images": 16, "steps": 10, "baseline": "median", "control": "other", "controls": 1, "road": "on",
            "flags": {"empty": empty, "border": 0, "per_image": [""] * 16},
            "metrics": {"deletion_auc": metric, "road_morf": metric}, "min_share_deletion_road": share,
            "beats_control": beats, "layer": "conv2"}


def test_report_leads_with_the_method_that_beats_its_control(run_copy):
    """Methods best first; one no better than its control is said so and its grid folded; empty maps counted."""
    d = run_copy / "gradcam" / "arc2-t100"
    for m in ("gradcam", "scorecam"):
        (d / m).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / m / "grid.png")
    faith = {"gradcam": _faith(0.25, False, empty=7), "scorecam": _faith(0.94, True)}
    (d / "faithfulness.json").write_text(json.dumps(faith))
    md = write_report(run_copy)["md"].read_text()
    page = (run_copy / "report.html").read_text()
    assert md.index("Leads with scorecam") < md.index("gradcam: no better than its control")
    assert "gradcam: 7 of 16 maps empty" in md
    assert md.index("| scorecam |") < md.index("| gradcam |")
    assert "gradcam: no better than its control: not an explanation of this model; grid kept" in md
    assert re.search(r"<details><summary>arc2-t100: gradcam \(no better than its control", page)
    # a faithfulness.json of the old format is not shown as a verdict
    (d / "faithfulness.json").write_text(json.dumps({"gradcam": {"fractions": {"0.1": {"cam": 0.1}}}}))
    md = write_report(run_copy)["md"].read_text()
    assert "written by an older version" in md and "Leads with" not in md


def test_report_rejects_a_non_run(tmp_path):
    with pytest.raises(RunFolderError, match="not found"):
        write_report(tmp_path / "nope")
    r = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert r.exit_code == 1 and "missing run.json" in r.output


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(full_run, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    trial = (full_run / "best.json").read_text().split('"trial": "')[1].split('"')[0]
    if not (full_run / "heads").exists():
        _fill_other_sections(full_run, trial)
    out = write_report(full_run)
    shot = tmp_path / "report.png"
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1280,4000", out["html"].resolve().as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (4000, 1280)
    # non-trivial: many distinct colours (text, tables, heatmaps), not a blank page
    colours = len(np.unique(img.reshape(-1, 3)[::7], axis=0))
    assert colours > 500, colours
    assert img.std() > 20
    keep = Path("/tmp/transfer_report_render.png")  # for a person to look at
    shutil.copyfile(shot, keep)
