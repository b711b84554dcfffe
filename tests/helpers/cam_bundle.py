"""A tiny real bundle with class activation maps: the test-only GAP CNN (``tinycam_test``,
24 px, a 24 x 24 x 16 feature map) trained briefly on one-square images, exported with int8,
fp16 and an rf head."""

from __future__ import annotations

from pathlib import Path

from helpers.explain import tinycam_registered, write_object_folder
from helpers.runs import build_run


def build_cam_bundle(root: Path, *, quantize: str = "int8,fp16", head: str | None = "rf") -> tuple[Path, Path]:
    """(run folder, bundle folder) under ``root`` (the images are in ``root/objects``)."""
    from transfer.export.api import export_bundle

    data = write_object_folder(root / "objects", n=80, size=24)
    with tinycam_registered():
        run = build_run(data, root / "run", backbones="tinycam_test", trainable="1", image_size=24, epochs=3)
        res = export_bundle(run, head=head, quantize=quantize, verify_images=64, progress=None)
    return run, res.bundle_dir
