"""Looking inside trained runs: classical heads on the learned features, per-class metrics,
feature plots, Grad-CAM, the resolution study and the HTML report (TensorFlow)."""
