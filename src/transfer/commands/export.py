"""``transfer export`` (run -> verified bundle) and ``transfer verify`` (re-check a bundle)."""

from __future__ import annotations

import click

from ..options import click_options, from_cli
from ..runtime.predict_config import TrustOptions
from ._options import quiet_option


@click.command("export")
@click.argument("run", type=click.Path())
@click.option("--trial", default="best", show_default=True, help="best or a trial name.")
@click.option("--out", type=click.Path(), help="Bundle folder. [default: RUN/bundle]")
@click.option("--head", type=click.Choice(["rf", "svm", "logreg", "knn"]),
              help="Also ship this classical head (pickle + ONNX); fitted from cached features if absent.")
@click.option("--quantize", metavar="int8|fp16|int8,fp16",
              help="Add a static int8 ONNX model (CPUs) and/or an fp16 ONNX model (GPUs); --trt fp16 adds fp16.")
@click.option("--trt", type=click.Choice(["fp32", "fp16", "int8"]), help="Add a TensorRT engine (NVIDIA GPU only).")
@click.option("--batch", default="1:8:32", show_default=True, metavar="MIN:OPT:MAX",
              help="TensorRT optimization profile of the batch dimension.")
@click.option("--calib-images", default=512, show_default=True, help="Training images that calibrate int8.")
@click.option("--verify-images", default=256, show_default=True,
              help="Validation images Keras and ONNX are compared on (>= 64; all of them when the run has fewer).")
@click.option("--atol", default=1e-4, show_default=True, help="fp32: max |probability difference| allowed.")
@click.option("--min-agreement", default=0.999, show_default=True, help="fp32: minimum top-1 agreement.")
@click.option("--max-accuracy-drop", default=0.01, show_default=True,
              help="int8 / fp16: maximum validation accuracy drop (0.01 = 1 point).")
@click.option("--opset", default=17, show_default=True, help="ONNX opset.")
@click.option("--workspace-mb", default=2048, show_default=True, help="TensorRT builder workspace limit.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Temperature-scale the probabilities (fitted on the val split and written into the graph only "
                   "when it holds on val folds it was not fitted on; never fitted on test) and fit the "
                   "unknown-input scores that infer/serve --reject use.")
@click.option("--unknown-accept", default=0.95, show_default=True,
              help="Share of known (val) images the unknown-input thresholds accept.")
@click.option("--unknown-default", default="auto", show_default=True, metavar="auto|NAME",
              help="The bundle's default unknown-input score: auto (the one that best separates val images from "
                   "synthetic outliers made of training images; no test image is read) or msp, energy, "
                   "mahalanobis, knn, vim.")
@click.option("--force", is_flag=True,
              help="Replace an existing bundle at --out (only a folder holding nothing but a bundle; its hidden "
                   "files are kept).")
@click.option("--sign", type=click.Path(dir_okay=False),
              help="Sign the bundle with this private key (`transfer keygen KEY`); machines that trust KEY.pub "
                   "load it.")
@quiet_option
def export(run, trial, out, head, quantize, trt, batch, calib_images, verify_images, atol, min_agreement,
           max_accuracy_drop, opset, workspace_mb, calibrate, unknown_accept, unknown_default, force, sign,
           quiet) -> None:
    """Export a trained trial of RUN as a deployment bundle: ONNX (image -> features, probs;
    preprocessing inside the graph), optional classical head, int8 model and TensorRT engine,
    each verified against its reference on real validation images.

    \b
    transfer export runs/digits
    transfer export runs/digits --trial arc2-t100 --head rf --quantize int8 --out bundles/digits
    transfer export runs/cd --trt fp16 --batch 1:8:32

    Exit codes: 0 verified bundle; 1 error or failed verification (bundle marked invalid), or
    another process exports to the same --out; 2 bad option; 3 TensorRT requested but no
    NVIDIA GPU / TensorRT (the ONNX bundle is kept).
    """
    from ..export.api import export_bundle
    from ..progress import Progress

    res = export_bundle(run, trial=trial, out=out, head=head, quantize=quantize, trt=trt, batch=batch,
                        calib_images=calib_images, verify_images=verify_images, atol=atol,
                        min_agreement=min_agreement, max_accuracy_drop=max_accuracy_drop, force=force,
                        opset=opset, workspace_mb=workspace_mb, calibrate=calibrate, unknown_accept=unknown_accept,
                        unknown_default=unknown_default, progress=Progress(quiet=quiet), sign=sign)
    click.echo(f"{res.bundle_dir}: verified ({', '.join(sorted(res.manifest['models']))}"
               f"{', heads ' + ', '.join(sorted(res.manifest['heads'])) if res.manifest['heads'] else ''}) "
               f"in {res.seconds:.1f}s")


@click.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--deep", is_flag=True,
              help="Also run every ONNX model and head once (ONNX Runtime, CPU) and check output shapes.")
@click_options(TrustOptions, only=["trust"])
def verify(bundle, deep, **options) -> None:
    """Re-check a bundle: every file against the SHA-256 in its manifest, the manifest against
    the files (labels, verification record, external data, each ONNX model's inputs, outputs
    and precision), and its signature (exit 1 on any problem). With --trust (or
    TRANSFER_TRUST) an unsigned bundle, or one signed by another key, fails.

    \b
    transfer verify runs/digits/bundle
    transfer verify runs/digits/bundle --deep --trust release.key.pub
    """
    from ..bundle import check_graphs, load_bundle, verify_bundle
    from ..errors import BundleError, TamperedBundleError
    from ..runtime.sessions import light_session

    trust = from_cli(TrustOptions, options).store
    rep = verify_bundle(bundle, trust=trust)
    for p in rep["problems"]:
        extra = f" (expected {p.get('expected')}, found {p.get('found')})" if p["problem"] in ("size", "sha256") else ""
        click.echo(f"  {p['file']}: {p['problem']}{extra}", err=True)
    if rep["unlisted_files"]:
        click.echo(f"  note: files not in the manifest (ignored): {', '.join(rep['unlisted_files'])}", err=True)
    if rep["problems"]:
        names = ", ".join(p["file"] for p in rep["problems"])
        raise TamperedBundleError(f"bundle {bundle} does not match its manifest: {names}",
                                  hint="re-export the bundle or restore the original files")
    # the manifest's own claims: labels, pixel recipe, the verdict, external data (files were hashed above)
    b = load_bundle(bundle, verify_hashes=False, allow_invalid=True, trust=trust)
    problems = check_graphs(b, light_session)  # each ONNX model / head is what its manifest entry says
    for p in problems:
        click.echo(f"  {p['file']}: {p['problem']}", err=True)
    if problems:
        raise TamperedBundleError(f"bundle {bundle}: {', '.join(sorted({p['file'] for p in problems}))} "
                                  "do(es) not match the manifest", hint="re-export the bundle")
    if not rep["valid_at_export"]:
        raise BundleError(f"bundle {bundle} is marked invalid: it failed verification at export",
                          hint=f"see {bundle}/verification.json")
    ran = ""
    if deep:
        from ..export.verify import deep_check

        problems = deep_check(b)
        for p in problems:
            click.echo(f"  {p['file']}: {p['problem']}", err=True)
        if problems:
            raise BundleError(f"bundle {bundle}: {', '.join(sorted({p['file'] for p in problems}))} failed the deep check",
                              hint="re-export the bundle with this version of transfer")
        n = sum(1 for e in b.models.values() if e.get("runtime") == "onnxruntime") + \
            sum(1 for e in b.heads.values() if e.get("onnx"))
        engines = sorted(k for k, e in b.models.items() if e.get("runtime") != "onnxruntime")
        ran = f"; {n} ONNX model(s) ran" + (f"; not run here: {', '.join(engines)} (needs its GPU)" if engines else "")
    signed = ("unsigned" if b.signer is None else
              f"signed by {b.signer}" + (" (trusted)" if b.trusted else " (not checked against trusted keys)"))
    click.echo(f"{bundle}: OK ({rep['files_checked']} files match their SHA-256; verified at export; {signed}{ran})")
    from ..runtime.cam import map_findings

    for line in map_findings(b):
        click.echo(f"  {line}")


COMMANDS = [export, verify]
