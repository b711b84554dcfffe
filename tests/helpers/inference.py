"""One Keras forward pass for tests that compare a model's outputs with something else."""

from __future__ import annotations

import numpy as np


def forward(model, x):
    """What ``model.predict(x, verbose=0)`` returns for one small batch, from one call in inference
    mode: the same numbers (checked on MobileNetV2, to the last bit) without ``predict`` tracing a
    graph for each new model first (1.4 s for a MobileNetV2 at 32 px, against 0.1 s for the call).
    ``x`` may be a list (a model with several inputs)."""
    out = model([x] if isinstance(model.input, list) and not isinstance(x, list) else x, training=False)
    return [np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else np.asarray(out)
