"""transfer: transfer learning for image classification, from an image folder to a
verified, benchmarked ONNX / TensorRT deployment bundle.

Sub-packages: ``data`` (image folders, decoding, splits; no TensorFlow), ``models``
(backbone registry, small CNNs), ``trainer`` (freeze sweeps: the plan, one trial's fit,
caches, resume), ``analysis`` (classical heads, Grad-CAM, metrics, resolution, audit,
reports), ``export`` (ONNX, verification, int8, TensorRT), ``runtime`` (TensorFlow-free
inference and benchmarks), ``serve`` (the HTTP service).
"""

__version__ = "0.1.0"
