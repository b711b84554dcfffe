"""Export: a trained trial -> a verified deployment bundle (``api.export_bundle`` with the
options of ``export_config.ExportConfig``): ONNX fp32 (Keras -> ONNX in
:mod:`transfer.models.onnx_convert`), int8 / fp16 models, TensorRT engines, a classical head
(:mod:`transfer.classical_heads`), calibration and unknown-input scores; each model run by a
runner and compared with its reference (``verify``, ``compare``)."""
