"""Runtime pieces: provider choice, the threaded pipeline, engine checks, bench, no TensorFlow."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.image_files import solid_pngs
from helpers.processes import run_without
from transfer.data.stream import batches, iter_inputs
from transfer.errors import BundleError, ConfigError
from transfer.runtime.sessions import available_providers, choose_providers
from transfer.runtime.trt_runner import check_engine_matches


def test_provider_choice():
    assert "CPUExecutionProvider" in available_providers()
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    assert choose_providers(None)[-1] == "CPUExecutionProvider"
    with pytest.raises(ConfigError, match="not available"):
        choose_providers("nosuch")


def test_pipeline_keeps_order_and_marks_errors(tmp_path):
    solid_pngs(tmp_path, [i * 10 for i in range(11)])
    (tmp_path / "05.png").write_bytes(b"broken")
    got = list(batches(iter_inputs([tmp_path]), (4, 4), batch=4, workers=3, prefetch=1, recipe=None))
    items = [it for b in got for it in b.items]
    assert [Path(i.path).name for i in items] == [f"{i:02d}.png" for i in range(11)]
    assert [b.x.shape[0] for b in got] == [4, 3, 3]
    assert items[5].error and all(i.error is None for k, i in enumerate(items) if k != 5)
    assert got[2].x[0, 0, 0, 0] == 80.0  # 08.png in the third batch, pixels in order
    with pytest.raises(ConfigError):
        list(batches(iter_inputs([tmp_path]), (4, 4), batch=0, recipe=None))


def test_pipeline_stops_cleanly_when_the_consumer_stops(tmp_path):
    solid_pngs(tmp_path, [0] * 50, (4, 4), name="{i}.png")
    it = batches(iter_inputs([tmp_path]), (4, 4), batch=2, prefetch=1, recipe=None)
    next(it)
    it.close()  # must not hang on the full queue


def test_engine_for_another_gpu_is_refused():
    entry = {"file": "model.fp16.engine", "gpu": "NVIDIA A10", "compute_capability": "8.6", "tensorrt": "10.3.0"}
    check_engine_matches(entry, {"compute_capability": "8.6", "tensorrt": "10.3.0"})
    with pytest.raises(BundleError, match="compute capability 8.6"):
        check_engine_matches(entry, {"compute_capability": "7.5", "tensorrt": "10.3.0"})
    with pytest.raises(BundleError, match="TensorRT 10.3.0"):
        check_engine_matches(entry, {"compute_capability": "8.6", "tensorrt": "10.5.0"})


def test_bench_table_json_and_agreement(rt_bundle, tmp_path):
    from transfer.runtime.bench import bench, render_table

    _, bundle = rt_bundle
    res = bench(bundle, backends=["onnxruntime", "onnxruntime-int8", "tensorrt"], batches=[1, 4], head="rf",
                seconds=0.05, min_iters=3, out=str(tmp_path), progress=None)
    assert {(r["backend"], r["batch"]) for r in res["rows"]} == {("onnxruntime", 1), ("onnxruntime", 4),
                                                                 ("onnxruntime-int8", 1), ("onnxruntime-int8", 4)}
    assert "tensorrt" in res["skipped"]
    for r in res["rows"]:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
        assert r["decode_ms_per_img"] > 0 and r["head_ms_per_img"] > 0 and r["gflops_per_img"] > 0
    assert next(r for r in res["rows"] if r["backend"] == "onnxruntime")["top1_agreement_vs_fp32"] == 1.0
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench.png").is_file()
    assert "| onnxruntime-int8 | 4 |" in render_table(res)


def test_runtime_runs_with_tensorflow_unimportable(rt_bundle, rt_data, tmp_path):
    _, bundle = rt_bundle
    out = tmp_path / "p.csv"
    # the base install: no TensorFlow, no scikit-learn (the ONNX head runs without it)
    code = f"""
        import sys
        import transfer.runtime.infer, transfer.runtime.bench, transfer.commands.runtime
        from transfer.cli import main
        try:
            main(["infer", {str(bundle)!r}, {str(rt_data)!r}, "-r", "--out", {str(out)!r}, "--head", "rf", "-q"])
        except SystemExit as e:
            assert e.code == 0, e.code
        try:
            main(["bench", {str(bundle)!r}, "--backends", "onnxruntime,onnxruntime-int8", "--batch", "1",
                  "--head", "rf", "--seconds", "0.05", "--out", {str(tmp_path / "bench")!r}, "-q"])
        except SystemExit as e:
            assert e.code == 0, e.code
        bad = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "sklearn")
               or m.startswith("transfer.trainer")
               or m.startswith("transfer.export")]
        assert not bad, bad
        print("OK")
    """
    r = run_without(("tensorflow", "keras", "tf2onnx", "sklearn"), code)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    assert out.is_file() and len(out.read_text().splitlines()) == 61
    assert (tmp_path / "bench" / "bench.json").is_file()
