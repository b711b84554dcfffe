"""The backbone registry: names, lookups, errors, and no TensorFlow at import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from transfer.errors import ConfigError
from transfer.models.registry import BackboneSpec, get_backbone, list_backbones, register_backbone

EXPECTED = {"xception", "resnet50", "densenet121", "vgg16", "mobilenet_v2", "efficientnet_b0", "arc2", "arc3"}


def test_list_has_the_required_backbones_sorted():
    names = list_backbones()
    assert EXPECTED <= set(names)
    assert names == sorted(names)


def test_get_backbone_normalizes_the_name():
    assert get_backbone("MobileNet-V2").name == "mobilenet_v2"
    assert get_backbone(" ARC2 ").name == "arc2"


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ConfigError) as ei:
        get_backbone("resnet9000")
    msg = str(ei.value)
    assert "resnet9000" in msg
    for name in EXPECTED:
        assert name in msg


def test_spec_fields_are_sane():
    for name in list_backbones():
        s = get_backbone(name)
        assert s.pretrainable == (s.imagenet_file is not None)  # the constructor does not check this pair
        assert callable(s.builder)
    assert get_backbone("arc2").pretrainable is False
    assert get_backbone("xception").min_size == 71
    assert get_backbone("resnet50").preprocess == "caffe"
    assert get_backbone("densenet121").preprocess == "torch"
    assert get_backbone("efficientnet_b0").preprocess == "none"


_SLOW = {"xception", "resnet50", "densenet121", "vgg16", "efficientnet_b0"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
                                  for n in sorted(EXPECTED)])
def test_a_spec_describes_the_model_it_builds(name):
    """What the registry says without building (minimum size, Grad-CAM layer, preprocessing)
    is true of the model: it builds at its minimum size, the Grad-CAM layer is a spatial map
    there, and the preprocessing inside the graph is the recorded mode."""
    from transfer.models.build import build_classifier

    s = get_backbone(name)
    model, info = build_classifier(name, input_shape=(s.min_size, s.min_size, 3), weights="none", num_classes=2)
    shape = model.get_layer(s.gradcam_layer).output.shape
    assert len(shape) == 4 and shape[1] >= 1 and shape[2] >= 1
    assert info.preprocess == s.preprocess and info.gradcam_layer == s.gradcam_layer


def _spec(name="tmp_test_bb", **kw):
    base = dict(name=name, builder=lambda t, w: None, default_size=32, min_size=8, preprocess="unit",
                gradcam_layer="conv1", block_pattern=r"^(conv\d+)", imagenet_file=None, pretrainable=False,
                description="test")
    base.update(kw)
    return BackboneSpec(**base)


def test_register_refuses_a_different_spec_under_a_taken_name():
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone(_spec(name="arc2"))


def test_register_and_decorator_form():
    from transfer.models import registry

    try:
        spec = register_backbone(_spec())
        assert get_backbone("tmp_test_bb") is spec
        assert register_backbone(spec) is spec  # same spec again is fine

        @register_backbone(name="tmp_test_bb2", default_size=16, min_size=8, preprocess="unit",
                           gradcam_layer="c", block_pattern="(c)", imagenet_file=None,
                           pretrainable=False, description="d")
        def my_builder(t, w):
            return None

        assert get_backbone("tmp_test_bb2").builder is my_builder
    finally:
        registry._REGISTRY.pop("tmp_test_bb", None)
        registry._REGISTRY.pop("tmp_test_bb2", None)


def test_bad_spec_values_are_config_errors():
    with pytest.raises(ConfigError, match="preprocess"):
        _spec(preprocess="bgr")
    with pytest.raises(ConfigError, match="min_size"):
        _spec(min_size=64, default_size=32)


def test_registry_and_backbones_command_do_not_import_tensorflow():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from transfer.cli import cli\n"
        "import transfer.models\n"
        "r = CliRunner().invoke(cli, ['backbones'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'\n"
        "print(r.output)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "mobilenet_v2" in out.stdout


def test_backbones_table_lists_every_backbone_with_its_columns():
    from transfer.cli import cli

    res = CliRunner().invoke(cli, ["backbones"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["name", "size", "min"]
    for name in list_backbones():
        s = get_backbone(name)
        row = next(line for line in lines if line.startswith(name + " "))
        cells = row.split()
        assert cells[1:6] == [str(s.default_size), str(s.min_size), s.preprocess, s.gradcam_layer, str(s.num_blocks)]
        assert cells[6] == f"{s.params / 1e6:.2f}M"


@pytest.mark.slow
def test_backbones_params_builds_every_model_and_matches_the_recorded_numbers():
    from transfer.commands.models import backbone_rows

    measured = {r["name"]: r for r in backbone_rows(measure=True)}
    for name in list_backbones():
        s = get_backbone(name)
        assert (measured[name]["blocks"], measured[name]["params"]) == (s.num_blocks, s.params), name
