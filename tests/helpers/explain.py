"""Helpers of the explain tests: synthetic "one small object" images and a tiny CAM CNN."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from PIL import Image

from transfer.models import registry
from transfer.models.registry import BackboneSpec, register_backbone

OBJ = 4  # side of the object in pixels
COLORS = ((255, 40, 40), (40, 40, 255))  # class 0: red square, class 1: blue square


def object_images(n: int, size: int = 24, seed: int = 0):
    """``n`` noisy grey images, each with one OBJxOBJ coloured square at a random place.

    Returns (x uint8 (n, size, size, 3), labels (n,), boxes (n, 4) as y0, x0, y1, x1).
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(70, 130, size=(n, size, size, 3)).astype(np.uint8)
    labels = rng.integers(0, 2, size=n)
    boxes = np.zeros((n, 4), dtype=int)
    for i in range(n):
        y0, x0 = rng.integers(0, size - OBJ + 1, size=2)
        x[i, y0:y0 + OBJ, x0:x0 + OBJ] = COLORS[labels[i]]
        boxes[i] = (y0, x0, y0 + OBJ, x0 + OBJ)
    return x, labels, boxes


def write_object_folder(root: Path, n: int = 60, size: int = 24, seed: int = 0) -> Path:
    x, labels, _ = object_images(n, size, seed)
    for c in (0, 1):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(x, labels)):
        Image.fromarray(img).save(root / f"c{lab}" / f"{i:03d}.png")
    return root


def _tinycam(input_tensor, weights=None):
    """Two 3x3 convs (the second named ``cam_conv``) -> global average pooling by the builder."""
    from transfer._lazy import import_keras

    keras = import_keras()
    from keras.src.ops.operation_utils import get_source_inputs

    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c1")(input_tensor)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="cam_conv")(x)
    return keras.Model(get_source_inputs(input_tensor), x, name="tinycam")


TINYCAM = BackboneSpec(
    name="tinycam_test", builder=_tinycam, default_size=24, min_size=8, preprocess="unit",
    gradcam_layer="cam_conv", block_pattern=r"^(c\d|cam_conv)", imagenet_file=None, pretrainable=False,
    description="test-only CNN with global average pooling", pooling="avg",
)


@contextlib.contextmanager
def tinycam_registered():
    """Register the test-only backbone for the duration of a build (other tests never see it)."""
    register_backbone(TINYCAM, replace=True)
    try:
        yield TINYCAM
    finally:
        registry._REGISTRY.pop(TINYCAM.name, None)


def build_tinycam(size: int = 24, num_classes: int = 2, seed: int = 0):
    """A contract classifier on the test-only backbone: (model, BuildInfo)."""
    from transfer.models.build import build_classifier

    with tinycam_registered():
        return build_classifier(TINYCAM.name, input_shape=(size, size, 3), weights="none",
                                num_classes=num_classes, seed=seed)


def train_object_model(n: int = 400, size: int = 24, epochs: int = 8, seed: int = 0):
    """A tinycam classifier trained on :func:`object_images`; returns (model, val accuracy)."""
    from transfer._lazy import import_keras
    keras = import_keras()
    model, _ = build_tinycam(size, 2, seed)
    x, y, _ = object_images(n, size, seed)
    xv, yv, _ = object_images(100, size, seed + 1)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x.astype("float32"), y, epochs=epochs, batch_size=32, verbose=0)
    acc = float((model.predict(xv.astype("float32"), verbose=0).argmax(1) == yv).mean())
    return model, acc


def blob_maps(n: int, size: int, *, seed: int = 0, centre: bool = False, sigma: float | None = None) -> np.ndarray:
    """Maps that carry no information about their image: Gaussian blobs at random places (or all
    at the centre), ``(n, size, size)`` float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    sigma = sigma or size / 6
    yy, xx = np.mgrid[:size, :size]
    centres = np.full((n, 2), (size - 1) / 2) if centre else rng.uniform(0, size, (n, 2))
    return np.stack([np.exp(-((yy - a) ** 2 + (xx - b) ** 2) / (2 * sigma ** 2)) for a, b in centres]).astype(np.float32)
