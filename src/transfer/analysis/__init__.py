"""Looking inside trained runs: classical heads fitted on the learned features (the heads
themselves are :mod:`transfer.classical_heads`), per-class metrics, feature plots, Grad-CAM,
the resolution study, the data audit and the HTML report (TensorFlow)."""
