"""Image folders, decoding, splits and datasets. Never imports TensorFlow."""
