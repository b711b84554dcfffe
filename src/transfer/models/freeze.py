"""Freeze policies: make the last ``fraction`` of a backbone trainable.

Three ways to count the fraction (``by``):

* ``"layers"`` -- the last ``round(fraction * N)`` of the ``N`` backbone layers
  (the classic ``base_model.layers[-n:]`` recipe). Layers without weights count too.
* ``"params"`` -- walking from the end, whole layers are unfrozen until at least
  ``fraction`` of the backbone's parameters (all weights, as ``layer.count_params()``
  counts them) lie in the unfrozen part (freezing by weights rather than by layers).
* ``"blocks"`` -- the last ``round(fraction * B)`` of the ``B`` blocks that the spec's
  ``block_pattern`` finds (a layer that does not match belongs to the block before it;
  the layers before the first match form block 0, the stem).

``round`` is half-up (0.5 -> 1). Always: preprocessing layers frozen, pooling and head
(``features``, ``head_dropout``, ``probs``) trainable.

BatchNormalization: following the Keras transfer-learning guide, BN layers stay frozen
even inside the trainable part unless ``train_bn=True``. In Keras 3 a BN layer with
``trainable=False`` runs in inference mode (uses and keeps its moving mean / variance),
so fine-tuning does not wreck the pretrained statistics. Train them (``train_bn=True``)
when starting from random weights.

The caller must (re)compile the model after :func:`apply_freeze`: Keras reads
``trainable`` when it compiles.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .._lazy import import_keras
from ..errors import ConfigError, ModelError
from .registry import get_backbone

FREEZE_BY = ("layers", "params", "blocks")


@dataclass(frozen=True)
class FreezeSummary:
    """What :func:`apply_freeze` did.

    Attributes:
        fraction: the requested trainable fraction.
        by: ``layers`` / ``params`` / ``blocks``.
        trainable_layers: backbone layers in the unfrozen part (BatchNormalization
            layers among them stay frozen unless ``train_bn``; see ``frozen_bn``).
        total_layers: backbone layers.
        trainable_params / non_trainable_params: as Keras counts them for the whole model.
        cut_at: first backbone layer of the unfrozen part (``None``: backbone frozen).
        frozen_bn: BatchNormalization layers of the unfrozen part kept frozen.
        trainable_blocks / total_blocks: blocks in the unfrozen part / all blocks
            (a block counts as unfrozen when its first layer is).
    """

    fraction: float
    by: str
    trainable_layers: int
    total_layers: int
    trainable_params: int
    non_trainable_params: int
    cut_at: str | None
    frozen_bn: int = 0
    trainable_blocks: int = 0
    total_blocks: int = 0


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def count_params(model) -> tuple[int, int]:
    """``(trainable, non_trainable)`` parameter counts of ``model``, as Keras counts them.

    Example::

        count_params(model)
        # (12810, 2257984)
    """
    tr = sum(int(math.prod(v.shape)) for v in model.trainable_weights)
    nt = sum(int(math.prod(v.shape)) for v in model.non_trainable_weights)
    return tr, nt


def block_boundaries(info) -> list[int]:
    """Indices into ``info.backbone_layers`` where a block starts (the first is always 0).

    Args:
        info: the :class:`~transfer.models.build.BuildInfo` of the model.

    Example::

        block_boundaries(info)[:3]  # mobilenet_v2: stem, expanded_conv, block_1
        # [0, 3, 11]
    """
    names = list(info.backbone_layers)
    if not names:
        return []
    pattern = re.compile(get_backbone(info.backbone).block_pattern)
    bounds = [0]
    current = None
    for i, name in enumerate(names):
        m = pattern.match(name)
        if not m:
            continue
        key = m.group(1)
        if key != current:
            if i > 0:
                bounds.append(i)
            current = key
    return sorted(set(bounds))


def _check(fraction, by) -> float:
    if by not in FREEZE_BY:
        raise ConfigError(f"freeze by {by!r} is not known", hint=f"use one of: {', '.join(FREEZE_BY)}")
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        f = float("nan")
    if isinstance(fraction, bool) or not (0.0 <= f <= 1.0):
        raise ConfigError(
            f"trainable fraction must be a number between 0 and 1, got {fraction!r}",
            hint="0 = frozen backbone (feature extractor), 1 = everything trainable, 0.3 = last 30 %",
        )
    return f


def cut_index(model, info, fraction: float, *, by: str = "layers") -> int:
    """Index into ``info.backbone_layers`` of the first trainable layer (``len`` = none).

    Raises:
        ConfigError: bad ``fraction`` / ``by``.
    """
    f = _check(fraction, by)
    names = list(info.backbone_layers)
    n = len(names)
    if by == "layers":
        return n - min(n, _round_half_up(f * n))
    if by == "blocks":
        bounds = block_boundaries(info)
        nb = min(len(bounds), _round_half_up(f * len(bounds)))
        return bounds[len(bounds) - nb] if nb > 0 else n
    sizes = [int(model.get_layer(name).count_params()) for name in names]
    total = sum(sizes)
    target = f * total
    if f <= 0.0 or total == 0:
        return n
    acc = 0
    start = n
    while start > 0 and acc < target - 1e-9 * total:
        start -= 1
        acc += sizes[start]
    return start


def apply_freeze(model, info, fraction: float, *, by: str = "layers", train_bn: bool = False) -> FreezeSummary:
    """Make the last ``fraction`` of the backbone trainable and the rest frozen.

    Sets ``layer.trainable`` on every layer (see the module docstring for how each
    ``by`` counts). Recompile the model afterwards.

    Args:
        model: a model from :func:`~transfer.models.build.build_classifier` (or loaded).
        info: its :class:`~transfer.models.build.BuildInfo`.
        fraction: in ``[0, 1]``; 0 = feature extractor, 1 = full fine-tuning.
        by: ``"layers"``, ``"params"`` or ``"blocks"``.
        train_bn: also train BatchNormalization layers of the unfrozen part.

    Returns:
        A :class:`FreezeSummary`.

    Raises:
        ConfigError: ``fraction`` outside ``[0, 1]`` or unknown ``by``.
        ModelError: ``info`` names layers the model does not have.

    Example::

        s = apply_freeze(model, info, 0.3, by="layers")
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        s.trainable_layers, s.cut_at
        # (46, 'block_13_expand')
    """
    keras = import_keras()
    f = _check(fraction, by)
    names = list(info.backbone_layers)
    missing = [n for n in names if n not in {layer.name for layer in model.layers}]
    if missing:
        raise ModelError(f"the model has no layers {missing[:5]} named by its BuildInfo ({info.backbone})")
    start = cut_index(model, info, f, by=by)
    unfrozen = set(names[start:])
    body = set(names)
    pre = set(info.preprocessing_layers)

    model.trainable = True
    frozen_bn = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if layer.name in pre:
            layer.trainable = False
        elif layer.name in body:
            on = layer.name in unfrozen
            if on and not train_bn and isinstance(layer, keras.layers.BatchNormalization):
                on = False
                frozen_bn += 1
            layer.trainable = on
        else:  # pooling and head
            layer.trainable = True
    bounds = block_boundaries(info)
    tr, nt = count_params(model)
    return FreezeSummary(
        fraction=f, by=by, trainable_layers=len(names) - start, total_layers=len(names),
        trainable_params=tr, non_trainable_params=nt, cut_at=names[start] if start < len(names) else None,
        frozen_bn=frozen_bn, trainable_blocks=sum(1 for b in bounds if b >= start), total_blocks=len(bounds),
    )
