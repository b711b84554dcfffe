"""transfer: transfer learning for image classification, from an image folder to a
verified, benchmarked ONNX / TensorRT deployment bundle.

Sub-packages: ``data`` (image folders, decoding, splits; no TensorFlow), ``models``
(backbone registry, small CNNs), ``trainer`` (fit, freeze sweeps, heads, Grad-CAM,
reports), ``export`` (ONNX, verification, int8, TensorRT), ``runtime`` (TensorFlow-free
inference and benchmarks).
"""

__version__ = "0.1.0"
