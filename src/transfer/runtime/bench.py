"""`transfer bench`: latency / throughput per backend and batch size, with the time split,
agreement with fp32, and a roofline column (achieved GFLOP/s vs this machine's matmul peak)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..bundle import Bundle, load_bundle
from ..errors import ConfigError, TransferError

if TYPE_CHECKING:
    from .runners import Runner


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-``repeats`` float32 GEMM rate of numpy/BLAS on all cores (GFLOP/s)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t
        best = max(best, 2 * n ** 3 / dt / 1e9)
    return best


def model_gflops(onnx_path: str | os.PathLike) -> float | None:
    """FLOPs per image (GFLOP, 2 x multiply-accumulates of Conv / Gemm / MatMul) from the graph.

    Needs the ``onnx`` package (in the ``train`` extra); returns ``None`` without it.
    """
    try:
        import onnx
        from onnx import shape_inference
    except ImportError:
        return None
    m = onnx.load(str(onnx_path))
    for t in list(m.graph.input) + list(m.graph.output):
        dims = t.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    try:
        m = shape_inference.infer_shapes(m)
    except Exception:
        return None
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    macs = 0
    for node in m.graph.node:
        if node.op_type == "Conv" and node.input[1] in inits and node.output[0] in shapes:
            w = inits[node.input[1]]  # (Cout, Cin/group, kh, kw)
            out = shapes[node.output[0]]
            if all(out):
                macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0]) or inits.get(node.input[0])
            bsh = inits.get(node.input[1]) or shapes.get(node.input[1])
            if a and bsh and all(a) and all(bsh):
                macs += int(np.prod(a[:-1])) * int(a[-1]) * int(bsh[-1])
    return 2 * macs / 1e9


def _sample_images(bundle: Bundle, images: Sequence[str] | None, n: int):
    """Real image files to time decoding with: --images, else the source run's val split."""
    from ..data.image import is_image_path
    from ..data.stream import iter_inputs

    paths: list[str] = []
    if images:
        paths = [p for p, err in iter_inputs(images, recursive=True) if err is None]
        if not paths:
            raise ConfigError(f"no image files found in --images {' '.join(map(str, images))}")
    else:
        from ..runfolder import RunFolder  # no TensorFlow

        src = bundle.manifest.get("source") or {}
        try:
            rf = RunFolder(src.get("run") or "/nonexistent")
            fold = rf.trial(str(src.get("trial"))).fold  # a k-fold trial: its own held-out images
            paths = [str(p) for p in rf.split_paths("val", fold=fold)[0] if p.is_file()]
        except (TransferError, OSError, ValueError, KeyError, TypeError):
            paths = []  # the run or its data is not on this machine: synthetic pixels
    return [p for p in paths if is_image_path(p)][:n]


def _decode_pool(files: list[str], size: tuple[int, int]):
    """Decode ``files`` for timing; bad ones are skipped. Returns (pixels list, ms per image, bad paths)."""
    from ..data.stream import decode_item

    t = time.perf_counter()
    items = [decode_item(p, size) for p in files]
    good = [it.pixels for it in items if it.pixels is not None]
    ms = (time.perf_counter() - t) / len(files) * 1000 if files else None
    return good, ms, [f"{it.path}: {it.error}" for it in items if it.error]


def _pct(a, q):
    return float(np.percentile(a, q)) * 1000.0


def bench(bundle_path, *, backends: Sequence[str] = ("onnxruntime", "onnxruntime-int8"),
          batches: Sequence[int] = (1, 8, 32), head: str | None = None, images: Sequence[str] | None = None,
          seconds: float = 3.0, min_iters: int = 10, warmup: int = 3, threads: int | None = None,
          out_dir=None, progress: Callable[[str], None] | None = print,
          providers: Sequence[str] | str | None = "cpu",
          extra_runners: Mapping[str, Callable[[Bundle], "Runner"]] | None = None) -> dict:
    """Benchmark backends x batch sizes on one bundle; returns (and writes) the result dict.

    Each cell runs at least ``min_iters`` timed calls and about ``seconds`` seconds after
    ``warmup`` calls. Latency is per model call (one batch); throughput is images/s.
    Decoding is timed on real image files (``images`` or the source run's val split).
    ``providers`` are the ONNX Runtime execution providers of the ``onnxruntime*``
    backends (default CPU; ``None``: the best available, e.g. CUDA / TensorRT); the fp32
    reference for top-1 agreement always runs on the CPU. ``extra_runners`` adds backends
    the runtime does not own, by name (the bench command passes ``keras``:
    :func:`transfer.export.keras_runner.keras_runner_for`, which needs TensorFlow); a
    factory that raises :class:`TransferError` marks its backend skipped with the reason.

    Returns:
        ``{"machine": {...}, "rows": [...], "skipped": {backend: reason}}``; with
        ``out_dir``: bench.json, bench.md and bench.png there.

    Raises:
        ConfigError: unknown backend or bad batch size.

    Example:
        >>> bench("runs/digits/bundle", backends=["onnxruntime"], batches=[1, 32])  # doctest: +SKIP
    """
    from .heads import check_head, make_head
    from .runners import OrtRunner, make_runner

    say = progress or (lambda s: None)
    batches, backends = list(batches), list(backends)
    if not batches or min(batches) < 1:
        raise ConfigError(f"invalid --batch {batches!r}; accepted: positive integers")
    extra_runners = dict(extra_runners or {})
    valid = ("onnxruntime", "onnxruntime-int8", "onnxruntime-fp16", "tensorrt", "tensorrt-fp32", "tensorrt-fp16",
             "tensorrt-int8", *extra_runners)
    if not backends:
        raise ConfigError("no --backends given", hint=f"accepted: {', '.join(valid)}")
    for be in backends:
        if be not in valid:
            raise ConfigError(f"unknown backend {be!r}; accepted: {', '.join(valid)}")
    for name, vals in (("--batch", batches), ("--backends", backends)):
        dup = sorted({str(v) for v in vals if vals.count(v) > 1})
        if dup:
            raise ConfigError(f"{name} lists {', '.join(dup)} more than once")
    if not seconds > 0 or min_iters < 1:
        raise ConfigError(f"invalid --seconds {seconds!r}; accepted: a positive number")
    b = load_bundle(bundle_path)
    check_head(b, head)
    h, w = b.input_size
    files = _sample_images(b, images, max(batches) * 2)
    real, decode_ms, bad = _decode_pool(files, (h, w))
    for e in bad[:3]:
        say(f"skipped an unreadable image: {e}")
    if len(bad) > 3:
        say(f"... and {len(bad) - 3} more unreadable image(s)")
    if real:
        pool = np.stack(real).astype(np.float32)
    else:
        decode_ms = None
        say("no source images to time decoding with (pass --images); timing the model on synthetic pixels")
        pool = np.random.default_rng(0).uniform(0, 255, (max(batches) * 2, h, w, 3)).astype(np.float32)
    say("measuring the matrix-multiply peak of this machine ...")
    peak = matmul_peak_gflops()
    gflops = model_gflops(b.file(b.model_entry("onnx-fp32")["file"]))
    t = time.perf_counter()
    for _ in range(20):
        np.stack(list(pool[: max(batches)].astype(np.uint8))).astype(np.float32)
    prep_ms = (time.perf_counter() - t) / 20 / max(batches) * 1000
    hd = make_head(b, head) if head else None
    ref_runner = OrtRunner(b, "onnx-fp32", "cpu", threads)
    ref = ref_runner.run(pool)[1]
    rows, skipped = [], {}
    for be in backends:
        try:
            if be in extra_runners:
                r = extra_runners[be](b)
            else:
                r = make_runner(b, be, providers if be.startswith("onnxruntime") else None, threads)
            fn, name, provider = r.run, r.name, r.provider
        except TransferError as exc:
            skipped[be] = exc.message
            say(f"skip {be}: {exc.message}")
            continue
        agree = float(np.mean(fn(pool)[1].argmax(1) == ref.argmax(1)))
        for bs in batches:
            x = np.ascontiguousarray(np.resize(pool, (bs, h, w, 3)))
            for _ in range(warmup):
                fn(x)
            lat, t_end = [], time.perf_counter() + seconds
            while len(lat) < min_iters or time.perf_counter() < t_end:
                t = time.perf_counter()
                feats, probs = fn(x)
                lat.append(time.perf_counter() - t)
                if len(lat) >= 10_000:
                    break
            lat = np.asarray(lat)
            head_ms = None
            if hd is not None and feats is not None:
                t = time.perf_counter()
                for _ in range(5):
                    hd(feats, probs)
                head_ms = (time.perf_counter() - t) / 5 / bs * 1000
            thr = bs / float(np.mean(lat))
            row = {"backend": name, "provider": provider, "batch": bs, "iters": int(len(lat)),
                   "p50_ms": _pct(lat, 50), "p90_ms": _pct(lat, 90), "p99_ms": _pct(lat, 99),
                   "images_per_s": thr, "decode_ms_per_img": decode_ms, "preprocess_ms_per_img": prep_ms,
                   "model_ms_per_img": float(np.mean(lat)) / bs * 1000, "head_ms_per_img": head_ms,
                   "top1_agreement_vs_fp32": agree,
                   "gflops_per_img": gflops, "achieved_gflops": gflops * thr if gflops else None,
                   "peak_share": gflops * thr / peak if gflops else None}
            rows.append(row)
            say(f"{name:18s} batch {bs:3d}: p50 {row['p50_ms']:8.2f} ms  {thr:9.1f} img/s")
    from .sessions import available_providers

    res = {"bundle": str(b.path), "machine": {"cpus": os.cpu_count(), "matmul_peak_gflops": peak,
                                              "threads": threads, "providers_found": available_providers()},
           "gflops_per_img": gflops,
           "decode_files": len(real), "decode_skipped": len(bad),
           "rows": rows, "skipped": skipped}
    if out_dir is not None:
        write_outputs(res, Path(out_dir))
    return res


def render_table(res: dict) -> str:
    """Markdown table of a bench result."""
    def f(v, d=2):
        return "n/a" if v is None else f"{v:.{d}f}"

    lines = ["| backend | batch | p50 ms | p90 ms | p99 ms | img/s | decode ms/img | model ms/img | head ms/img | "
             "top-1 vs fp32 | GFLOP/img | GFLOP/s | % of peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['backend']} | {r['batch']} | {f(r['p50_ms'])} | {f(r['p90_ms'])} | {f(r['p99_ms'])} | "
                     f"{f(r['images_per_s'], 1)} | {f(r['decode_ms_per_img'], 3)} | {f(r['model_ms_per_img'], 3)} | "
                     f"{f(r['head_ms_per_img'], 3)} | {f(r['top1_agreement_vs_fp32'], 4)} | "
                     f"{f(r['gflops_per_img'], 4)} | {f(r['achieved_gflops'], 1)} | "
                     f"{f(None if r['peak_share'] is None else 100 * r['peak_share'], 1)} |")
    lines.append(f"\nmatmul peak of this machine: {res['machine']['matmul_peak_gflops']:.1f} GFLOP/s "
                 f"(numpy float32 GEMM, {res['machine']['cpus']} cpus)")
    if res["machine"].get("providers_found"):
        lines.append("ONNX Runtime providers found: " + ", ".join(res["machine"]["providers_found"]))
    for be, why in res.get("skipped", {}).items():
        lines.append(f"skipped {be}: {why}")
    return "\n".join(lines)


def write_outputs(res: dict, out_dir: Path) -> None:
    from ..fsutil import write_json_atomic, write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "bench.json", res)
    write_text_atomic(out_dir / "bench.md", render_table(res) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not res["rows"]:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for be in sorted({r["backend"] for r in res["rows"]}):
        rs = [r for r in res["rows"] if r["backend"] == be]
        ax.plot([r["batch"] for r in rs], [r["images_per_s"] for r in rs], marker="o", label=be)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title("throughput per backend")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "bench.png", dpi=110)
    plt.close(fig)
