"""TensorFlow-free runtime: sessions, runners (ONNX Runtime, TensorRT), the predictor (runner +
head + unknown-input rule + top-k), the options of prediction, infer (local and Ray), bench."""
