"""Training freeze sweeps: the config, one trial's fit, the sweep over backbones x fractions,
Ray and tf.distribute strategies (TensorFlow, imported inside functions)."""
