"""trainer: training freeze sweeps (config, fit, sweep, plots) and analysis of runs.

Heavy dependencies (TensorFlow / Keras, matplotlib) are imported inside functions.
"""
