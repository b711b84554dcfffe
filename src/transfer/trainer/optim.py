"""The optimizer a stage compiles with: SGD with momentum 0.9, or Adam whose update of each
variable is one fused kernel.

Keras's ``Adam.update_step`` is eight TensorFlow ops per variable (two ``assign_add``, an
``assign_sub`` and the arithmetic between them), each its own kernel launch and pass over the
variable's memory, repeated for every trainable tensor (MobileNetV2 has ~160) in every step.
``tf.raw_ops.ResourceApplyAdam`` does the same update in one kernel:
``m += (g - m)(1 - beta_1)``, ``v += (g^2 - v)(1 - beta_2)``,
``w -= m alpha / (sqrt(v) + epsilon)`` with ``alpha = lr sqrt(1 - beta_2^t) / (1 - beta_1^t)``:
the formula of ``keras.optimizers.Adam`` term for term (TensorFlow's ``ApplyAdamNonCuda``), the
same slot variables in the same order, so checkpoints, the optimizer state a resumed trial
restores and ``model.keras`` are unchanged. One step agrees with Keras's within float32
rounding, but training amplifies rounding: on the quality guard the fused update took a
different trajectory and missed its epoch-6 bar, for 2 % less step time (docs/benchmarks.md,
section 9), so it is off by default (:data:`FUSED_ADAM`) and kept for ``bench_sweep.py --adam``.
Where it is on, it falls back to Keras's own update where the kernel does not apply (AMSGrad,
sparse gradients, a distribution strategy's mirrored variables).
"""

from __future__ import annotations

from .._lazy import import_keras, import_tensorflow
from .config import TrainConfig

#: Adam's update of each variable as one ``ResourceApplyAdam`` kernel: off (see the module docstring)
FUSED_ADAM = False

_CLASS: list = []


def fused_adam_class():
    """``FusedAdam``: ``keras.optimizers.Adam`` whose ``update_step`` is one kernel per variable
    (made on first use, so importing this module does not import TensorFlow)."""
    if _CLASS:
        return _CLASS[0]
    keras, tf = import_keras(), import_tensorflow()

    @keras.saving.register_keras_serializable(package="transfer")
    class FusedAdam(keras.optimizers.Adam):
        """Keras's Adam, each variable updated by one ``ResourceApplyAdam`` kernel."""

        def update_step(self, gradient, variable, learning_rate):
            if (self.amsgrad or isinstance(gradient, tf.IndexedSlices) or tf.distribute.has_strategy()
                    or not hasattr(variable, "handle")):
                return super().update_step(gradient, variable, learning_rate)
            dtype = variable.dtype
            step = tf.cast(self.iterations + 1, dtype)
            beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
            m = self._momentums[self._get_variable_index(variable)]
            v = self._velocities[self._get_variable_index(variable)]
            tf.raw_ops.ResourceApplyAdam(
                var=variable.handle, m=m.handle, v=v.handle, beta1_power=tf.pow(beta_1, step),
                beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype), use_locking=False,
                use_nesterov=False)

    _CLASS.append(FusedAdam)
    return FusedAdam


def make_optimizer(cfg: TrainConfig, lr: float, *, fused: bool | None = None):
    """The optimizer of ``cfg`` at learning rate ``lr``; ``fused`` overrides :data:`FUSED_ADAM`."""
    keras = import_keras()
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    if FUSED_ADAM if fused is None else fused:
        return fused_adam_class()(learning_rate=lr)
    return keras.optimizers.Adam(learning_rate=lr)


__all__ = ["make_optimizer", "fused_adam_class", "FUSED_ADAM"]
