"""Prometheus metrics in the text exposition format (version 0.0.4), written without a dependency.

Three metric kinds, each thread-safe, each optionally labelled: a counter, a gauge and a
histogram with fixed cumulative buckets. `ServerMetrics` holds the server's own set and renders
them all for `GET /metrics`.
"""

from __future__ import annotations

import math
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict | None) -> tuple[str, ...]:
        labels = labels or {}
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self._values: dict[tuple, float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help: str):
        super().__init__(name, help)
        self._value = 0.0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def value(self) -> float:
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: list[float]):
        super().__init__(name, help)
        self.buckets = sorted(float(b) for b in buckets) + [math.inf]
        self._counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    self._counts[i] += 1
                    break
            self._sum += value
            self._count += 1

    def snapshot(self) -> dict:
        """{"buckets": {upper: cumulative count}, "sum": s, "count": n}."""
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        cumulative, running = {}, 0
        for upper, c in zip(self.buckets, counts):
            running += c
            cumulative[upper] = running
        return {"buckets": cumulative, "sum": total, "count": n}

    def render(self) -> list[str]:
        snap = self.snapshot()
        lines = self.header()
        for upper, c in snap["buckets"].items():
            lines.append(f'{self.name}_bucket{{le="{_fmt(upper)}"}} {c}')
        lines.append(f"{self.name}_sum {_fmt(snap['sum'])}")
        lines.append(f"{self.name}_count {snap['count']}")
        return lines


LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class ServerMetrics:
    """The metrics `gendd serve` exports; names carry the `gendd_` prefix."""

    def __init__(self) -> None:
        self.requests = Counter("gendd_requests_total", "HTTP requests answered, by endpoint and status code", ("endpoint", "code"))
        self.latency = Histogram("gendd_request_duration_seconds", "infer request latency, from its headers read to its response written", LATENCY_BUCKETS)
        self.batch_size = Histogram("gendd_batch_size", "images per runner call", BATCH_BUCKETS)
        self.batch_latency = Histogram("gendd_batch_duration_seconds", "runner time per batch", LATENCY_BUCKETS)
        self.queue_depth = Gauge("gendd_queue_depth", "infer requests waiting for the batcher")
        self.queued = Counter("gendd_queued_requests_total", "infer requests accepted into the batching queue")
        self.images = Counter("gendd_images_total", "images run through the model")
        self.abandoned = Counter("gendd_abandoned_images_total", "images not run because every request of their batch had timed out")
        self._all = [self.requests, self.latency, self.batch_size, self.batch_latency, self.queue_depth, self.queued, self.images, self.abandoned]

    def render(self) -> str:
        lines: list[str] = []
        for m in self._all:
            lines += m.render()
        return "\n".join(lines) + "\n"
