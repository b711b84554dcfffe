"""transfer: transfer learning for image classification, from an image folder to a
verified, benchmarked ONNX / TensorRT deployment bundle.

Sub-packages: ``data`` (image folders, decoding, splits; no TensorFlow), ``models``
(backbone registry, small CNNs), ``trainer`` (freeze sweeps: the plan, one trial's fit,
caches, resume), ``analysis`` (classical heads fitted on a run's features, Grad-CAM, metrics,
resolution, audit, reports), ``export`` (ONNX, verification, int8, TensorRT), ``runtime``
(TensorFlow-free inference and benchmarks), ``serve`` (the HTTP service), ``commands`` (the
CLI). Shared modules at the top: ``options`` (options declared once), ``bundle``,
``runfolder``, ``classical_heads``, ``calibration``, ``maps``, ``signing`` and helpers.
"""

__version__ = "0.1.0"
