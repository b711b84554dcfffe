"""TensorFlow-free runtime: sessions, runners, image pipeline, heads, infer, bench."""
