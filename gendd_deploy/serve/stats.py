"""Per-model inference statistics in Triton's shape: `GET /v2/models/<m>/stats` and the gRPC
`ModelStatistics` call, which perf_analyzer and model_analyzer read.

Durations are cumulative nanoseconds, as Triton reports them: `success` / `fail` time a request
from arrival to answer, `queue` from entering the batcher to its batch starting, `compute_infer`
the model run of the batch the request rode in (each request of a batch counts the whole run, as
in Triton). `execution_count` counts model runs, `inference_count` images.
"""

from __future__ import annotations

import threading
import time


def _duration() -> dict:
    return {"count": 0, "ns": 0}


class ModelStats:
    def __init__(self):
        self._lock = threading.Lock()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.kinds = {k: _duration() for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}
        self.batches: dict[int, dict] = {}  # batch size -> compute_infer duration

    def _add(self, kind: str, seconds: float, count: int = 1) -> None:
        d = self.kinds[kind]
        d["count"] += count
        d["ns"] += int(seconds * 1e9)

    def batch(self, queue_s: list[float], compute_s: float, images: int) -> None:
        """One model run of `images` images for requests that waited `queue_s` each."""
        with self._lock:
            self.execution_count += 1
            self.inference_count += images
            for q in queue_s:
                self._add("queue", q)
                self._add("compute_infer", compute_s)
            b = self.batches.setdefault(images, _duration())
            b["count"] += 1
            b["ns"] += int(compute_s * 1e9)
            self.last_inference_ms = int(time.time() * 1000)

    def request(self, ok: bool, seconds: float) -> None:
        with self._lock:
            self._add("success" if ok else "fail", seconds)

    def to_dict(self, name: str, version: str) -> dict:
        """One entry of Triton's `model_stats` list (its JSON field names)."""
        with self._lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {k: dict(v) for k, v in self.kinds.items()},
                "batch_stats": [
                    {"batch_size": size, "compute_input": _duration(), "compute_infer": dict(d), "compute_output": _duration()}
                    for size, d in sorted(self.batches.items())
                ],
            }
