"""`transfer bench`: latency / throughput per backend and batch size, with the time split,
agreement with fp32, and a roofline column (achieved GFLOP/s vs this machine's matmul peak)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..bundle import Bundle, load_bundle
from ..data.image import is_image_path
from ..data.stream import decode_batches, iter_inputs
from ..errors import ConfigError, DependencyMissingError, TransferError
from ..fsutil import write_json_atomic, write_text_atomic
from ..options import replace
from ..plots import figure, save_figure
from ..progress import ProgressLike, as_progress
from ..runfolder import RunFolder  # no TensorFlow
from ..tables import markdown
from .bench_config import BenchConfig
from .heads import check_head, make_head
from .runners import make_runner
from .sessions import available_providers

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


@dataclass
class SamplePool:
    """The pixels every cell is timed on, and what decoding them cost."""

    x: np.ndarray                # float32 (n, H, W, 3)
    decode_ms: float | None      # per image, one thread; None: synthetic pixels
    files: int = 0               # image files decoded into ``x``
    skipped: list[str] = field(default_factory=list)  # "path: reason" of files that would not decode


def _sample_images(bundle: Bundle, images: Sequence[str] | None, n: int) -> list[str]:
    """Real image files to time decoding with: ``images``, else the source run's val split."""

    paths: list[str] = []
    if images:
        paths = [p for p, err in iter_inputs(images, recursive=True) if err is None]
        if not paths:
            raise ConfigError(f"no image files found in {' '.join(map(str, images))} (images to time decoding on)",
                              option="images")
    else:

        src = bundle.manifest.get("source") or {}
        try:
            run = RunFolder(src.get("run") or "/nonexistent")
            fold = run.trial(str(src.get("trial"))).fold  # a k-fold trial: its own held-out images
            paths = [str(p) for p in run.split_paths("val", fold=fold)[0] if p.is_file()]
        except (TransferError, OSError, ValueError, KeyError, TypeError):
            paths = []  # the run or its data is not on this machine: synthetic pixels
    return [p for p in paths if is_image_path(p)][:n]


def sample_pool(bundle: Bundle, images: Sequence[str] | None, n: int, progress: ProgressLike = None) -> SamplePool:
    """``n`` images to time the model on: real files decoded (and timed, one thread) through
    :func:`transfer.data.stream.decode_batches`; synthetic pixels when there are none."""

    p = as_progress(progress)
    h, w = bundle.input_size
    files = _sample_images(bundle, images, n)
    pixels, skipped, secs = [], [], 0.0
    for pb in decode_batches(files, (h, w), batch=max(1, len(files)), workers=1, recipe=bundle.recipe):
        pixels.append(pb.x)
        secs += pb.decode_seconds
        skipped += [f"{it.path}: {it.error}" for it in pb.items if it.error]
    for e in skipped[:3]:
        p.say(f"skipped an unreadable image: {e}")
    if len(skipped) > 3:
        p.say(f"... and {len(skipped) - 3} more unreadable image(s)")
    x = np.concatenate(pixels) if pixels else np.zeros((0, h, w, 3), np.float32)
    if len(x):
        return SamplePool(x, secs / len(files) * 1000, len(x), skipped)
    p.say("no source images to time decoding with; timing the model on synthetic pixels "
          "(give image files to time decoding too)")
    return SamplePool(np.random.default_rng(0).uniform(0, 255, (n, h, w, 3)).astype(np.float32), None, 0, skipped)


def _preprocess_ms(pool: np.ndarray, n: int) -> float:
    """ms per image of turning decoded uint8 images into the float32 batch the model takes."""
    t = time.perf_counter()
    for _ in range(20):
        np.stack(list(pool[:n].astype(np.uint8))).astype(np.float32)
    return (time.perf_counter() - t) / 20 / n * 1000


def time_cell(fn: Callable, x: np.ndarray, *, warmup: int, seconds: float, min_iters: int):
    """Latencies (s) of ``fn(x)`` after ``warmup`` calls: at least ``min_iters`` calls and about
    ``seconds`` seconds (at most 10,000 calls); returns ``(latencies, last outputs)``."""
    for _ in range(warmup):
        fn(x)
    lat, t_end, outs = [], time.perf_counter() + seconds, None
    while len(lat) < min_iters or time.perf_counter() < t_end:
        t = time.perf_counter()
        outs = fn(x)
        lat.append(time.perf_counter() - t)
        if len(lat) >= 10_000:
            break
    return np.asarray(lat), outs


def _head_ms(hd, feats, probs, bs: int) -> float | None:
    if hd is None or feats is None:
        return None
    t = time.perf_counter()
    for _ in range(5):
        hd(feats, probs)
    return (time.perf_counter() - t) / 5 / bs * 1000


def _pct(a, q):
    return float(np.percentile(a, q)) * 1000.0


def _bench_row(runner: "Runner", bs: int, lat: np.ndarray, *, pool: SamplePool, prep_ms: float,
              head_ms: float | None, agreement: float, gflops: float | None, peak: float) -> dict:
    """One row of bench.json (the field names are the file's format)."""
    thr = bs / float(np.mean(lat))
    return {"backend": runner.name, "provider": runner.provider, "batch": bs, "iters": int(len(lat)),
            "p50_ms": _pct(lat, 50), "p90_ms": _pct(lat, 90), "p99_ms": _pct(lat, 99),
            "images_per_s": thr, "decode_ms_per_img": pool.decode_ms, "preprocess_ms_per_img": prep_ms,
            "model_ms_per_img": float(np.mean(lat)) / bs * 1000, "head_ms_per_img": head_ms,
            "top1_agreement_vs_fp32": agreement,
            "gflops_per_img": gflops, "achieved_gflops": gflops * thr if gflops else None,
            "peak_share": gflops * thr / peak if gflops else None}


def bench(bundle_path, config: BenchConfig | None = None, *, progress: ProgressLike = None,
          extra_runners: Mapping[str, Callable[[Bundle], "Runner"]] | None = None, **options) -> dict:
    """Benchmark backends x batch sizes on one bundle; returns (and writes) the result dict.

    Each cell runs at least ``min_iters`` timed calls and about ``seconds`` seconds after
    ``warmup`` calls. Latency is per model call (one batch); throughput is images/s.
    Decoding is timed on real image files (``images`` or the source run's val split).
    ``providers`` are the ONNX Runtime execution providers of the ``onnxruntime*``
    backends (default CPU; ``auto``: the best available, e.g. CUDA / TensorRT); the fp32
    reference for top-1 agreement always runs on the CPU. ``extra_runners`` supplies backends
    the runtime does not own, by name (the bench command passes ``keras``:
    :func:`transfer.export.keras_runner.keras_runner_for`, which needs TensorFlow); a backend
    without a runner, or whose factory raises :class:`TransferError`, is skipped with the reason.

    Args:
        bundle_path: the bundle folder.
        config: the options (:class:`~transfer.runtime.bench_config.BenchConfig`);
            ``options`` are laid over it (``bench(b, batches=[1, 32])``).
        progress: a :class:`~transfer.progress.Progress`, a line callable or None.

    Returns:
        ``{"machine": {...}, "rows": [...], "skipped": {backend: reason}}``; with ``out``:
        bench.json, bench.md and bench.png there.

    Raises:
        ConfigError: an invalid option, or ``out`` inside the bundle.

    Example::

        bench("runs/digits/bundle", backends=["onnxruntime"], batches=[1, 32])
    """
    cfg = replace(config or BenchConfig(), **options)

    p = as_progress(progress)
    extra_runners = dict(extra_runners or {})
    if cfg.out is not None:
        o, root = Path(os.path.realpath(cfg.out)), Path(os.path.realpath(bundle_path))
        if o == root or root in o.parents:
            raise ConfigError(f"output folder {cfg.out} is inside the bundle {bundle_path}; the results would "
                              "become files of the bundle", hint="write them next to it", option="out")
    b = load_bundle(bundle_path, trust=cfg.trust)
    check_head(b, cfg.head)
    h, w = b.input_size
    batches, threads, seconds = cfg.batches, cfg.threads, cfg.seconds
    pool = sample_pool(b, cfg.images or None, max(batches) * 2, p)
    p.say("measuring the matrix-multiply peak of this machine ...")
    peak = matmul_peak_gflops()
    gflops = model_gflops(b.file(b.model_entry("onnx-fp32")["file"]))
    prep_ms = _preprocess_ms(pool.x, max(batches))
    hd = make_head(b, cfg.head) if cfg.head else None
    with make_runner(b, "onnxruntime", "cpu", threads) as fp32:
        ref = fp32.infer(pool.x).probs
    rows, skipped = [], {}
    for be in cfg.backends:
        try:
            if be in extra_runners:
                r = extra_runners[be](b)
            elif be == "keras":
                raise TransferError("the keras backend runs the source run's model with TensorFlow; "
                                    "`transfer bench` adds it")
            else:
                r = make_runner(b, be, cfg.provider_list if be.startswith("onnxruntime") else None, threads)
            r.activate()  # a TensorRT engine loads here: a broken one is a skipped backend
        except TransferError as exc:
            skipped[be] = exc.message
            p.say(f"skip {be}: {exc.message}")
            continue
        with r:
            agree = float(np.mean(r.infer(pool.x).probs.argmax(1) == ref.argmax(1)))
            for bs in batches:
                x = np.ascontiguousarray(np.resize(pool.x, (bs, h, w, 3)))
                lat, out = time_cell(r.infer, x, warmup=cfg.warmup, seconds=seconds, min_iters=cfg.min_iters)
                row = _bench_row(r, bs, lat, pool=pool, prep_ms=prep_ms,
                                head_ms=_head_ms(hd, out.features, out.probs, bs), agreement=agree, gflops=gflops,
                                peak=peak)
                rows.append(row)
                p.say(f"{r.name:18s} batch {bs:3d}: p50 {row['p50_ms']:8.2f} ms  {row['images_per_s']:9.1f} img/s")
    res = {"bundle": str(b.path), "machine": {"cpus": os.cpu_count(), "matmul_peak_gflops": peak,
                                              "threads": threads, "providers_found": available_providers()},
           "gflops_per_img": gflops,
           "decode_files": pool.files, "decode_skipped": len(pool.skipped),
           "rows": rows, "skipped": skipped}
    if cfg.out is not None:
        write_outputs(res, Path(cfg.out))
    return res


#: the bench.md columns: (header, bench.json field, decimals)
_TABLE = (("backend", "backend", None), ("batch", "batch", None), ("p50 ms", "p50_ms", 2), ("p90 ms", "p90_ms", 2),
          ("p99 ms", "p99_ms", 2), ("img/s", "images_per_s", 1), ("decode ms/img", "decode_ms_per_img", 3),
          ("model ms/img", "model_ms_per_img", 3), ("head ms/img", "head_ms_per_img", 3),
          ("top-1 vs fp32", "top1_agreement_vs_fp32", 4), ("GFLOP/img", "gflops_per_img", 4),
          ("GFLOP/s", "achieved_gflops", 1), ("% of peak", "peak_share", 1))


def _cell(row: dict, key: str, digits: int | None) -> str:
    v = row[key]
    if digits is None:
        return str(v)
    if v is None:
        return "n/a"
    return f"{100 * v if key == 'peak_share' else v:.{digits}f}"


def render_table(res: dict) -> str:
    """Markdown table of a bench result (:func:`transfer.tables.markdown`) and the machine's notes."""

    rows = [[_cell(r, key, d) for _, key, d in _TABLE] for r in res["rows"]]
    lines = [markdown([h for h, _, _ in _TABLE], rows, align="l" + "r" * (len(_TABLE) - 1)).rstrip("\n"),
             f"\nmatmul peak of this machine: {res['machine']['matmul_peak_gflops']:.1f} GFLOP/s "
             f"(numpy float32 GEMM, {res['machine']['cpus']} cpus)"]
    if res["machine"].get("providers_found"):
        lines.append("ONNX Runtime providers found: " + ", ".join(res["machine"]["providers_found"]))
    for be, why in res.get("skipped", {}).items():
        lines.append(f"skipped {be}: {why}")
    return "\n".join(lines)


def write_outputs(res: dict, out_dir: Path) -> None:
    """bench.json, bench.md and (with matplotlib and at least one row) bench.png, written atomically."""

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "bench.json", res)
    write_text_atomic(out_dir / "bench.md", render_table(res) + "\n")
    if not res["rows"]:
        return
    try:
        with figure(figsize=(7, 4), purpose="the bench chart") as (fig, ax):
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
            save_figure(fig, out_dir / "bench.png", dpi=110)
    except DependencyMissingError:
        return  # the runtime's base install has no matplotlib: the table and JSON are the result
