"""TensorFlow-free runtime: sessions, runners, devices, heads, infer, bench."""
