"""Train/serve pixel parity on the inputs users have: JPEG, PNG, 16-bit, palette, RGBA and
EXIF-rotated files, larger and smaller than the model input.

"The pixels training used" are what the trainer's loader (:class:`transfer.data.batches.BatchSource`)
gives the model; `transfer infer` must match the Keras model on them within 1e-4, for the
probabilities and for the pooled features.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from helpers.inference import forward


def _photo(h, w, seed=0) -> np.ndarray:
    """A smooth picture with texture (JPEG-like content, not noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w * 255, yy / h * 255, (xx + yy) % 200], -1) + rng.normal(0, 10, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_inputs(folder):
    """One file of every kind, larger (and smaller) than a 16 x 16 model input."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []

    def save(img, name, **kw):
        p = folder / name
        img.save(p, **kw)
        files.append(p)

    for h, w, tag in ((480, 640, "big"), (1200, 1600, "huge"), (10, 12, "small")):
        rgb = Image.fromarray(_photo(h, w))
        save(rgb, f"{tag}.jpg", quality=90)
        save(rgb, f"{tag}.png")
        save(rgb.convert("L"), f"{tag}_gray.jpg", quality=90)
        save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), f"{tag}_palette.png")
        rgba = rgb.convert("RGBA")
        alpha = np.full((h, w), 255, np.uint8)
        alpha[: h // 2] = 60
        rgba.putalpha(Image.fromarray(alpha))
        save(rgba, f"{tag}_rgba.png")
        g16 = (np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)
        save(Image.fromarray(g16), f"{tag}_16bit.png")  # uint16 -> mode I;16
        exif = Image.Exif()
        exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
        save(Image.fromarray(_photo(w, h, 1)), f"{tag}_exif6.jpg", exif=exif.tobytes(), quality=90)
    return files


def test_infer_equals_keras_on_training_pixels_for_every_kind_of_file(rt_bundle, tmp_path):
    from transfer.bundle import load_bundle
    from transfer.data.batches import BatchSource
    from transfer.data.folder import Sample
    from transfer.data.stream import batches, iter_inputs
    from transfer.models.build import feature_model
    from transfer.runfolder import RunFolder
    from transfer.runtime.infer import infer
    from transfer.runtime.runners import make_runner

    run, bundle = rt_bundle
    run = RunFolder(run)
    t = run.trial("best")
    files = write_inputs(tmp_path / "in")
    # the trainer's loader, on the run's recorded recipe
    src = BatchSource(tmp_path / "in", [Sample(p.name, 0) for p in files], len(files), t.image_size,
                      recipe=run.recipe)
    x_train = src.get(0).x.astype(np.float32)
    assert not src.failed and x_train.shape == (len(files), *t.image_size, 3)
    feats_ref, probs_ref = forward(feature_model(t.load_model()), x_train)

    # transfer infer: all classes per row (JSON lines, 6 decimals)
    out = tmp_path / "p.jsonl"
    c = len(run.class_names)
    s = infer(bundle, files, out=out, topk=c, batch=5)
    assert s.ok == len(files) and s.errors == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = run.class_names
    for r, p in zip(rows, probs_ref):
        got = np.array([next(e["prob"] for e in r["top"] if e["class"] == n) for n in names])
        np.testing.assert_allclose(got, p, atol=1e-4 + 1e-6, err_msg=r["path"])
    # the features output, through the same decode and runner infer uses
    b = load_bundle(bundle)
    runner = make_runner(b, "onnxruntime", "cpu")
    got_f = np.concatenate([runner.infer(pb.x).features for pb in batches(iter_inputs(files), b.input_size, batch=5,
                                                                  recipe=b.recipe)])
    scale = max(1.0, float(np.abs(feats_ref).max()))
    np.testing.assert_allclose(got_f, feats_ref, atol=1e-4 * scale)


def test_recipe_2_shrinks_large_jpegs_in_the_dct_and_keeps_the_picture(tmp_path):
    from transfer.data.image import RECIPES, load_image, recipe_version

    files = {p.name: p for p in write_inputs(tmp_path)}
    v1, v2 = RECIPES[1], RECIPES[2]
    for name in ("huge.jpg", "huge_exif6.jpg", "big.jpg", "huge.png", "huge_gray.jpg"):
        a = load_image(files[name], (224, 224), recipe=v1).astype(float)
        b = load_image(files[name], (224, 224), recipe=v2).astype(float)
        assert a.shape == b.shape == (224, 224, 3)
        assert np.abs(a - b).mean() < 1.5, name  # the same picture, within a grey level on average
    # EXIF orientation: a file stored 1200 wide x 1600 high, shown rotated, keeps its layout
    a = load_image(files["huge_exif6.jpg"], (40, 30), recipe=v1).astype(float)
    b = load_image(files["huge_exif6.jpg"], (40, 30), recipe=v2).astype(float)
    assert np.abs(a - b).mean() < 2.0
    # small sources are untouched by the draft: recipes 1 and 2 give the same pixels
    for name in ("small.jpg", "small.png", "small_16bit.png"):
        np.testing.assert_array_equal(load_image(files[name], (16, 16), recipe=v1),
                                      load_image(files[name], (16, 16), recipe=v2))
    assert recipe_version(None) == 2 and recipe_version(v1) == 1
    with pytest.raises(ValueError, match="reducing_gap"):
        recipe_version({**v2, "reducing_gap": 3.0})


def test_an_old_bundle_decodes_with_its_own_recipe(tmp_path):
    """A bundle exported with recipe 1 keeps its pixels: infer decodes with the recorded recipe."""
    from helpers.bundle_factory import edit_manifest, make_bundle
    from transfer.bundle import load_bundle
    from transfer.data.image import RECIPES, load_image
    from transfer.runtime.infer import infer
    from transfer.runtime.runners import make_runner

    big = tmp_path / "big.jpg"
    Image.fromarray(_photo(1200, 1600)).save(big, quality=90)
    b = make_bundle(tmp_path / "b", size=8)
    edit_manifest(b, lambda m: m.update(preprocessing=RECIPES[1]))
    bundle = load_bundle(b)
    assert bundle.recipe["version"] == 1
    v1 = load_image(big, (8, 8), recipe=RECIPES[1])
    assert np.any(v1 != load_image(big, (8, 8), recipe=RECIPES[2]))  # the recipes differ on this file
    from transfer.data.stream import batches, iter_inputs

    (pb,) = list(batches(iter_inputs([big]), bundle.input_size, recipe=bundle.recipe))  # what infer decodes
    np.testing.assert_array_equal(pb.x[0], v1)
    out = tmp_path / "p.jsonl"
    infer(b, [big], out=out, topk=2)
    got = {e["class"]: e["prob"] for e in json.loads(out.read_text())["top"]}
    p1 = make_runner(bundle, "onnxruntime", "cpu").infer(v1[None].astype(np.float32)).probs[0]
    np.testing.assert_allclose([got["a"], got["b"]], p1, atol=1e-6)
    edit_manifest(b, lambda m: m.update(preprocessing={**RECIPES[2], "version": 9}))
    from transfer.errors import BundleError

    with pytest.raises(BundleError, match="pixel recipe"):
        load_bundle(b)
