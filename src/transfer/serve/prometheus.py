"""Prometheus metrics of one server (its own registry: several apps in one process do not collide).

Names (all prefixed ``transfer_serve_``):

- ``requests_total{route, method, status}``: every HTTP request, by route template
  (``/v1/predict``, ..., ``other`` for unknown paths) and status code.
- ``request_seconds{route}``: latency histogram, from the first byte read to the last sent.
- ``images_total{status}``: images answered, ``ok`` or the HTTP status of their error (``499``: the
  client disconnected before the image reached the model, so it was not run).
- ``batch_size``: images per model call (histogram); ``model_seconds``: model + head time per call.
- ``queue_depth``: images waiting for the model; ``in_flight``: requests in the server.
- ``shed_total{reason}``: requests answered 503 (``full``, ``late``, ``not_ready``, ``draining``).
- ``dropped_total{stage}``: requests whose client disconnected before their images reached the
  model, so none of the dropped images cost a model call: ``reading`` (while sending the body),
  ``queued`` (read; decoding or waiting for a batch). Such requests are logged with status 499.
- ``ready``: 1 when warmed up and not draining.
- ``cam_seconds``: seconds to compute and encode one class activation map (``?cam=1``; its count
  is the maps answered).
- the process's CPU seconds, memory and open files (``process_*``) and Python's GC counters.
"""

from __future__ import annotations

from typing import Callable

from ._deps import prometheus

#: routes that get their own label value (anything else is ``other``: bounded label cardinality)
ROUTES = ("/", "/healthz", "/readyz", "/metrics", "/v1/model", "/v1/predict", "/openapi.json")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's metrics; ``render()`` gives the Prometheus text exposition."""

    def __init__(self):
        pc = prometheus()
        pc.disable_created_metrics()  # the *_created series only double the exposition
        self.registry = pc.CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "transfer_serve_"
        self.requests = pc.Counter(p + "requests", "HTTP requests by route, method and status",
                                   ("route", "method", "status"), registry=r)
        self.latency = pc.Histogram(p + "request_seconds", "HTTP request latency by route", ("route",),
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.images = pc.Counter(p + "images", "images answered, by outcome", ("status",), registry=r)
        self.batch_size = pc.Histogram(p + "batch_size", "images per model call", buckets=_BATCH_BUCKETS,
                                       registry=r)
        self.model_seconds = pc.Histogram(p + "model_seconds", "seconds per model + head call",
                                          buckets=_LATENCY_BUCKETS, registry=r)
        self.shed = pc.Counter(p + "shed", "requests answered 503, by reason", ("reason",), registry=r)
        self.dropped = pc.Counter(p + "dropped", "requests whose client disconnected before their images reached "
                                  "the model (those images were not run), by stage", ("stage",), registry=r)
        for stage in ("reading", "queued"):  # exported as 0 from the start
            self.dropped.labels(stage)
        self.cam_seconds = pc.Histogram(p + "cam_seconds", "seconds per class activation map (?cam=1): the map "
                                        "from the feature map, its overlay and PNG", buckets=_LATENCY_BUCKETS,
                                        registry=r)
        self.ready = pc.Gauge(p + "ready", "1 when the model is warmed up and the server is not draining",
                              registry=r)
        self.queue_depth = pc.Gauge(p + "queue_depth", "images waiting for the model", registry=r)
        self.in_flight = pc.Gauge(p + "in_flight", "requests being served", registry=r)
        pc.ProcessCollector(registry=r)
        pc.GCCollector(registry=r)
        self.content_type = pc.CONTENT_TYPE_LATEST
        self._generate = pc.generate_latest

    def bind(self, depth: Callable[[], int], in_flight: Callable[[], int]) -> None:
        """Read the queue depth and in-flight gauges from these functions at every scrape."""
        self.queue_depth.set_function(depth)
        self.in_flight.set_function(in_flight)

    @staticmethod
    def route(path: str) -> str:
        return path if path in ROUTES else "other"

    def observe_request(self, path: str, method: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.model_seconds.observe(seconds)

    def render(self) -> bytes:
        return self._generate(self.registry)


__all__ = ["Metrics", "ROUTES"]
