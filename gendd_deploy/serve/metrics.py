"""The server's Prometheus metrics, on prometheus-client, in a registry of their own per server.

Names carry the `gendd_` prefix. Per endpoint: `gendd_requests_total{endpoint, code}` (every HTTP
and gRPC request answered, 404s included). Per model (`model`, `version` as served in URLs):
`gendd_infer_requests_total{model, version, code}` and `gendd_request_duration_seconds` (arrival
to answer). Per batcher (labelled with the model that owns it; a model's encoded-image sibling
shares its batcher): queue time per request vs compute time per runner call
(`gendd_queue_duration_seconds`, `gendd_batch_duration_seconds`), `gendd_batch_size`,
`gendd_queue_depth`, `gendd_queued_requests_total`, `gendd_images_total` and
`gendd_abandoned_images_total` (images not run because every request of their batch timed out).

`GET /metrics` answers in the text exposition format 0.0.4, which every Prometheus reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
from prometheus_client.exposition import generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MODEL = ("model", "version")


@dataclass(frozen=True)
class BatcherMetrics:
    """One batcher's metrics, already labelled (what batcher.py records into)."""

    queue_time: object
    batch_time: object
    batch_size: object
    queue_depth: object
    queued: object
    images: object
    abandoned: object


def endpoint_label(path: str) -> str:
    """The `endpoint` label of gendd_requests_total for a REST path."""
    if path.startswith("/v2/health"):
        return "health"
    if path == "/metrics":
        return "metrics"
    if path.startswith("/v2/models/") and path.rstrip("/").endswith("/infer"):
        return "infer"
    if path.startswith("/v2") or path == "/openapi.json":
        return "metadata"
    return "other"


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gendd_requests", "requests answered, by endpoint and status code", ("endpoint", "code"), registry=r)
        self.infer = Counter("gendd_infer_requests", "infer requests answered, per model and status code", (*MODEL, "code"), registry=r)
        self.latency = Histogram("gendd_request_duration_seconds", "infer request latency, from its body read to its answer", MODEL, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("gendd_queue_duration_seconds", "time an infer request waited in the batcher's queue", MODEL, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_time = Histogram("gendd_batch_duration_seconds", "runner (compute) time per runner call", MODEL, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("gendd_batch_size", "images per runner call", MODEL, buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("gendd_queue_depth", "infer requests waiting for the batcher", MODEL, registry=r)
        self.queued = Counter("gendd_queued_requests", "infer requests accepted into the batching queue", MODEL, registry=r)
        self.images = Counter("gendd_images", "images run through the model", MODEL, registry=r)
        self.abandoned = Counter("gendd_abandoned_images", "images not run because every request of their batch had timed out", MODEL, registry=r)
        self._children: dict[tuple, tuple] = {}  # labelled series by label values: labels() costs a lock and a sort per call

    def for_batcher(self, model: str, version: str) -> BatcherMetrics:
        labels = {"model": model, "version": version}
        kinds = ("queue_time", "batch_time", "batch_size", "queue_depth", "queued", "images", "abandoned")
        return BatcherMetrics(**{k: getattr(self, k).labels(**labels) for k in kinds})

    def answered(self, endpoint: str, code: int) -> None:
        key = ("requests", endpoint, code)
        if (series := self._children.get(key)) is None:
            series = self._children[key] = (self.requests.labels(endpoint=endpoint, code=str(code)),)
        series[0].inc()

    def inferred(self, model: str, version: str, code: int, seconds: float) -> None:
        """One infer request answered (either protocol)."""
        key = ("infer", model, version, code)
        if (series := self._children.get(key)) is None:
            labels = {"model": model, "version": version}
            series = self._children[key] = (self.infer.labels(**labels, code=str(code)), self.latency.labels(**labels))
        count, latency = series
        count.inc()
        latency.observe(seconds)

    def sample(self, name: str, **labels) -> float:
        """The current value of one series (0 when it has none yet)."""
        value = self.registry.get_sample_value(name, {k: str(v) for k, v in labels.items()})
        return 0.0 if value is None else value

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["BATCH_BUCKETS", "CONTENT_TYPE", "LATENCY_BUCKETS", "BatcherMetrics", "ServerMetrics", "endpoint_label"]
