"""One trial over several devices of one machine (``tf.distribute``; the ``strategy`` option)."""

from __future__ import annotations

from .._lazy import import_tensorflow
from ..errors import ConfigError


def make_strategy(name: str):
    """The ``tf.distribute`` strategy called ``name``, or None for the default.

    ``mirrored`` replicates the model on every GPU of the machine (or of the Ray task:
    Ray sets ``CUDA_VISIBLE_DEVICES`` to the ``--gpus-per-trial`` it reserved); without a
    GPU it uses the CPU devices, which are several only when logical CPU devices were
    configured before TensorFlow ran an op (how the tests exercise it). The batch size
    stays global: each of N replicas gets ``batch_size / N`` images per step.

    Args:
        name: ``"default"`` or ``"mirrored"``.

    Returns:
        A ``tf.distribute.MirroredStrategy`` or None.

    Raises:
        ConfigError: an unknown strategy name.

    Example::

        make_strategy("default") is None
        # True
    """
    if name in (None, "", "default"):
        return None
    if name != "mirrored":
        raise ConfigError(f"invalid strategy: {name!r}; accepted: default, mirrored", option="strategy")
    tf = import_tensorflow()
    devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)
