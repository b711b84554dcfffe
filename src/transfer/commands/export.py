"""``transfer export`` (run -> verified bundle) and ``transfer verify`` (re-check a bundle)."""

from __future__ import annotations

import click

from ..export.export_config import ExportConfig
from ..options import click_options, from_cli
from ..runtime.predict_config import TrustOptions
from ._options import quiet_option


@click.command("export")
@click.argument("run", type=click.Path())
@click_options(ExportConfig)
@quiet_option
def export(run, quiet, **options) -> None:
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

    res = export_bundle(run, from_cli(ExportConfig, options), progress=Progress(quiet=quiet))
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
