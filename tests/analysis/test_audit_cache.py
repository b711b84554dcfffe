"""The audit's cache of converted models and Keras references (`transfer.analysis.audit_cache`):
what its keys change with, and that a damaged entry is never used and is replaced. Nothing is
converted here: the entries hold stand-in bytes (the audit tests keep and read real conversions)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from helpers.runs import copy_run
from transfer.analysis import audit_cache
from transfer.analysis.audit_cache import CacheEntry

IMAGES = ["a" * 64, "b" * 64]
BACKBONE = {"name": "source", "backbone": "arc2", "weights": "none", "image_size": 16}


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "audit-onnx"


def test_the_model_key_changes_with_the_model_and_the_reference_key_with_the_images(tiny_run, tmp_path, cache):
    one = CacheEntry.of(BACKBONE, IMAGES, (16, 16), None)
    assert one.folder == cache / one.key
    same = CacheEntry.of({**BACKBONE, "name": "other name", "output": "probs"}, IMAGES, (16, 16), None)
    assert (same.key, same.reference_key) == (one.key, one.reference_key)
    for other in ({**BACKBONE, "image_size": 32}, {**BACKBONE, "weights": "imagenet"},
                  {**BACKBONE, "backbone": "mobilenet_v2"}):
        assert CacheEntry.of(other, IMAGES, (16, 16), None).key != one.key, other
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"one")
    by_file = CacheEntry.of({**BACKBONE, "weights": str(weights)}, IMAGES, (16, 16), None).key
    weights.write_bytes(b"two")
    assert CacheEntry.of({**BACKBONE, "weights": str(weights)}, IMAGES, (16, 16), None).key not in (by_file, one.key)
    # the same model, other parity images, order, size or recipe: the conversion is shared, not the reference
    from transfer.data.image import RECIPES

    for images, size, recipe in ((IMAGES[::-1], (16, 16), None), (IMAGES[:1], (16, 16), None),
                                 (IMAGES, (8, 8), None), (IMAGES, (16, 16), RECIPES[1])):
        e = CacheEntry.of(BACKBONE, images, size, recipe)
        assert e.key == one.key and e.reference_key != one.reference_key
    # a run's trial: by the content of its model.keras (and of its initial weights), in RUN/cache
    run = copy_run(tiny_run, tmp_path / "run")
    spec = {"name": "source", "run": str(run), "trial": "arc2-t100"}
    trained = CacheEntry.of(spec, IMAGES, (16, 16), None)
    initial = CacheEntry.of({**spec, "initial": True}, IMAGES, (16, 16), None)
    assert trained.folder.parent == run / "cache" / "audit-onnx" and initial.key != trained.key
    with open(run / "trials" / "arc2-t100" / "model.keras", "ab") as f:
        f.write(b"\0")
    assert CacheEntry.of(spec, IMAGES, (16, 16), None).key != trained.key


def test_a_damaged_entry_is_not_used_and_storing_again_replaces_it(tmp_path, cache):
    entry = CacheEntry.of(BACKBONE, IMAGES, (16, 16), None)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(bytes(range(256)) * 40)
    dest = tmp_path / "copy.onnx"
    assert entry.conversion(dest) == (None, "") and entry.reference() == (None, "")  # nothing kept: no complaint
    entry.store_conversion(onnx, {"dim": 64, "classes": 3})
    f, p = np.arange(128, dtype=np.float32).reshape(2, 64), np.full((2, 3), 1 / 3, np.float32)
    entry.store_reference(f, p)
    assert entry.conversion(dest) == ({"dim": 64, "classes": 3}, "") and dest.read_bytes() == onnx.read_bytes()
    ref, why = entry.reference()
    assert why == "" and np.array_equal(ref["features"], f) and np.array_equal(ref["probs"], p)

    kept = entry.model_onnx.read_bytes()
    for damage, words in ((kept[:-10], "not the file that was kept"),  # cut short
                          (kept[:100] + b"\xff" + kept[101:], "not the file that was kept")):  # one byte changed
        entry.model_onnx.write_bytes(damage)
        info, why = entry.conversion(dest)
        assert info is None and words in why, why
    entry.model_onnx.unlink()
    assert entry.conversion(dest)[0] is None and "cannot be read" in entry.conversion(dest)[1]
    entry.store_conversion(onnx, {"dim": 64, "classes": 3})  # what the audit does after converting again
    assert entry.conversion(dest) == ({"dim": 64, "classes": 3}, "")

    data = entry.reference_npz.read_bytes()
    entry.reference_npz.write_bytes(data[: len(data) // 2])
    ref, why = entry.reference()
    assert ref is None and "not the file that was kept" in why
    entry.reference_json.write_text("{not json")
    assert entry.reference()[0] is None and "cannot be read" in entry.reference()[1]
    entry.store_reference(f, p)
    assert entry.reference()[1] == ""
    # an entry's JSON copied under another key (or another format) is not taken for it
    other = CacheEntry.of(BACKBONE, IMAGES[:1], (16, 16), None)
    other.folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(entry.reference_json, other.reference_json)
    shutil.copy(entry.reference_npz, other.reference_npz)
    assert other.reference()[0] is None and "another entry" in other.reference()[1]


def test_old_entries_are_removed_and_an_unwritable_cache_is_skipped(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(audit_cache, "KEEP_MODELS", 2)
    monkeypatch.setattr(audit_cache, "KEEP_REFERENCES", 2)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    f, p = np.zeros((1, 4), np.float32), np.zeros((1, 2), np.float32)
    entries = [CacheEntry.of({**BACKBONE, "image_size": s}, IMAGES[:1], (16, 16), None) for s in (16, 20, 24)]
    for k, e in enumerate(entries):
        e.store_conversion(onnx, {"dim": 4, "classes": 2})
        os.utime(e.model_json, (1000 + k, 1000 + k))  # stored in this order, a second apart
    entries[2].store_conversion(onnx, {"dim": 4, "classes": 2})  # prunes: the least recently used goes
    assert [e.folder.is_dir() for e in entries] == [False, True, True]
    refs = [CacheEntry.of(BACKBONE, [c * 64], (16, 16), None) for c in "abc"]
    for k, e in enumerate(refs):
        e.store_reference(f, p)
        os.utime(e.reference_json, (1000 + k, 1000 + k))
    refs[2].store_reference(f, p)
    assert [e.reference()[0] is not None for e in refs] == [False, True, True]
    # a cache that cannot be written is skipped, not an error
    monkeypatch.setenv("TRANSFER_CACHE_DIR", str(onnx))  # a file: nothing can be made under it
    e = CacheEntry.of(BACKBONE, IMAGES, (16, 16), None)
    e.store_conversion(onnx, {"dim": 4, "classes": 2})
    e.store_reference(f, p)
    assert e.conversion(tmp_path / "x.onnx") == (None, "")
