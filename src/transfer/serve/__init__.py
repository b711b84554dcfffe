"""``transfer serve``: a bundle behind an HTTP API with dynamic batching (no TensorFlow).

- :mod:`~transfer.serve.serve_config`: :class:`ServeConfig`, every option, declared once.
- :mod:`~transfer.serve.model`: :func:`load_served_model` (the one bundle loader) and the row builder,
  over the runtime's :class:`~transfer.runtime.predictor.Predictor`.
- :mod:`~transfer.serve.pixels`: uploaded bytes -> model pixels (the runtime's decode + resize).
- :mod:`~transfer.serve.batcher`: groups images of concurrent requests into model calls.
- :mod:`~transfer.serve.app`: the FastAPI routes; :mod:`~transfer.serve.guard`: the middleware in front of
  them (limits, API key, admission, access log); :mod:`~transfer.serve.prometheus`: Prometheus.
- :mod:`~transfer.serve.server`: uvicorn with draining; :mod:`~transfer.serve.ray_serve`: Ray Serve.

FastAPI, uvicorn, prometheus-client and python-multipart come with ``pip install "transfer[serve]"``;
they are imported when a server is built, so this package imports without them.
"""

from .model import ModelOptions, ServedModel, load_served_model
from .serve_config import ServeConfig

__all__ = ["ServeConfig", "ModelOptions", "ServedModel", "load_served_model"]
