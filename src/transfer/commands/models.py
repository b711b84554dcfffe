"""``transfer backbones``: the registered backbones as a table."""

from __future__ import annotations

import click


def backbone_rows(measure: bool = False) -> list[dict]:
    """One dict per registered backbone (what the table shows).

    With ``measure``, each backbone is built (weights none, at its minimum size; the
    small CNNs at their default size since their parameter count depends on it) and its
    blocks and parameters are counted from the real model; otherwise the spec's
    recorded numbers are shown and nothing is built.
    """
    from ..models.registry import get_backbone, list_backbones

    rows = []
    for name in list_backbones():
        spec = get_backbone(name)
        blocks, params = spec.num_blocks, spec.params
        if measure:
            from ..models.build import build_classifier
            from ..models.freeze import block_boundaries

            size = spec.default_size if spec.pooling == "none" else spec.min_size
            model, info = build_classifier(name, input_shape=(size, size, 3), weights="none", num_classes=2)
            blocks = len(block_boundaries(info))
            # everything but the head: a backbone's own normalization (EfficientNet) counts,
            # and so does the small CNNs' Dense "features"
            names = info.preprocessing_layers + info.backbone_layers + (("features",) if spec.pooling == "none" else ())
            params = sum(model.get_layer(n).count_params() for n in names)
            del model
        rows.append({
            "name": name, "default_size": spec.default_size, "min_size": spec.min_size,
            "preprocess": spec.preprocess, "gradcam_layer": spec.gradcam_layer, "blocks": blocks,
            "params": params, "imagenet": spec.pretrainable, "description": spec.description,
        })
    return rows


@click.command("backbones")
@click.option("--params", "measure", is_flag=True,
              help="Build every backbone (random weights, smallest size) to count blocks and parameters.")
def backbones(measure: bool) -> None:
    """List the backbones `transfer train --backbone` accepts.

    Columns: input size (default / minimum), the preprocessing done inside the model
    (tf: x/127.5-1, torch: ImageNet mean/std, caffe: BGR minus mean, none: inside the
    backbone, unit: x/255), the Grad-CAM target layer, blocks (for --freeze-by blocks),
    backbone parameters, and whether ImageNet weights exist.
    """
    rows = backbone_rows(measure)
    header = ["name", "size", "min", "preprocess", "grad-cam layer", "blocks", "params", "imagenet", "description"]
    table = [[r["name"], r["default_size"], r["min_size"], r["preprocess"], r["gradcam_layer"],
              r["blocks"] if r["blocks"] is not None else "-",
              f"{r['params'] / 1e6:.2f}M" if r["params"] else "-",
              "yes" if r["imagenet"] else "no", r["description"]] for r in rows]
    from ..tables import text

    click.echo(text(header, table).rstrip())
    if not measure:
        click.echo("\n(blocks and params as recorded for each backbone; --params builds each model to count them)")


COMMANDS = [backbones]
