"""Dynamic batching: requests queue up and one worker thread runs them together through the runner.

A request is (images (n, C, H, W), seed); it waits on a `Future` for its own rows of the logits.
The worker takes the oldest request, then keeps taking queued requests while the batch stays
within `max_batch` images and the oldest request has waited less than `max_delay_ms`, then makes
one runner call. A request larger than `max_batch` on its own runs in chunks of `max_batch`.
`max_batch = 1` or `max_delay_ms = 0` turns batching off: one request per runner call.

Noise, for models that take it, is made per request from the request's seed
(`runner.noise(n, seed)`), so a request's answer does not depend on what it was batched with.
The queue holds at most `queue_size` requests; `submit` raises `QueueFull` beyond that.
`abandon(future)` gives a request up (its client timed out): queued, it is never run; running, the
batch stops at its next chunk of `max_batch` images once every request in it is abandoned.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from gendd_deploy.runtime.base import Runner
from gendd_deploy.serve.metrics import BatcherMetrics, ServerMetrics
from gendd_deploy.serve.stats import ModelStats


class QueueFull(Exception):
    """The request queue is at `queue_size`; the client should retry later (HTTP 503)."""


class ShuttingDown(Exception):
    """The batcher no longer takes requests (HTTP 503)."""


@dataclass
class _Job:
    images: np.ndarray  # (n, C, H, W) float32
    seed: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    stats: ModelStats | None = None  # the served model's statistics (Triton's /stats)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


class DynamicBatcher:
    def __init__(self, runner: Runner, *, max_batch: int, max_delay_ms: float, queue_size: int, metrics: BatcherMetrics | None = None):
        if max_batch < 1 or queue_size < 1 or max_delay_ms < 0:
            raise ValueError("need max_batch >= 1, queue_size >= 1, max_delay_ms >= 0")
        self.runner = runner
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        self.batching = max_batch > 1 and max_delay_ms > 0
        self.metrics = metrics or ServerMetrics().for_batcher("model", "1")
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_size)
        self._carry: _Job | None = None  # taken from the queue but did not fit the last batch
        self._lock = threading.Lock()  # orders submit() against close()
        self._closed = False
        self._abandoned: set[Future] = set()  # futures whose requests were given up while running
        self._thread = threading.Thread(target=self._loop, name="gendd-batcher", daemon=True)

    def start(self) -> "DynamicBatcher":
        self._thread.start()
        return self

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        """Requests waiting (queued or held over), not counting the batch being run."""
        return self._queue.qsize() + (self._carry is not None)

    def submit(self, images: np.ndarray, seed: int = 0, stats: ModelStats | None = None) -> Future:
        """Queue (n, C, H, W) float32 images; the future resolves to their (n, K) logits. `stats`
        receives the request's queue and compute time once its batch has run."""
        job = _Job(images, seed, stats=stats)
        with self._lock:
            if self._closed:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(f"request queue full ({self._queue.maxsize} requests waiting); retry later") from None
        self.metrics.queued.inc()
        self.metrics.queue_depth.set(self.pending())
        return job.future

    def close(self, timeout_s: float = 30.0) -> bool:
        """Stop taking requests, run everything already queued, stop the worker.

        Returns True when the queue drained within `timeout_s`; requests still queued after that
        fail with ShuttingDown.
        """
        with self._lock:
            self._closed = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        drained = not self._thread.is_alive() and self.pending() == 0
        if not drained:
            leftovers = [self._carry] if self._carry else []
            self._carry = None
            while True:
                try:
                    leftovers.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for job in leftovers:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(ShuttingDown("the server shut down before this request ran"))
        return drained

    # ---- worker ------------------------------------------------------------------------------

    def _take(self, timeout: float | None) -> _Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            if timeout is None or timeout <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _collect(self) -> list[_Job] | None:
        first = self._take(timeout=0.05)
        if first is None:
            return None
        jobs, total = [first], first.n
        if self.batching:
            deadline = first.enqueued + self.max_delay_s  # the oldest request waits at most max_delay
            while total < self.max_batch:
                job = self._take(timeout=deadline - time.monotonic())
                if job is None:
                    break
                if total + job.n > self.max_batch:
                    self._carry = job  # first in line for the next batch
                    break
                jobs.append(job)
                total += job.n
        self.metrics.queue_depth.set(self.pending())
        return jobs

    def abandon(self, future: Future) -> None:
        """Give up the request behind `future`: not run if still queued, cut short if running."""
        if not future.cancel():
            with self._lock:
                self._abandoned = {f for f in self._abandoned if not f.done()}  # answered since: nothing to stop
                if not future.done():
                    self._abandoned.add(future)

    def _loop(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                if self._closed and self.pending() == 0:
                    return
                continue
            # a request whose client gave up (future cancelled) is dropped here
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        started = time.monotonic()
        try:
            images = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
            noise = None
            if self.runner.needs_noise:
                parts = [self.runner.noise(j.n, j.seed) for j in jobs]
                noise = parts[0] if len(parts) == 1 else np.concatenate(parts)
            outs = []
            for start in range(0, images.shape[0], self.max_batch):
                if start and self._all_abandoned(jobs):
                    self.metrics.abandoned.inc(images.shape[0] - start)
                    raise TimeoutError("every request of this batch was given up; the rest of it was not run")
                chunk = images[start : start + self.max_batch]
                t0 = time.perf_counter()
                out = self.runner.run(chunk, None if noise is None else noise[start : start + self.max_batch])
                self.metrics.batch_time.observe(time.perf_counter() - t0)
                self.metrics.batch_size.observe(chunk.shape[0])
                outs.append(np.asarray(out))
            logits = outs[0] if len(outs) == 1 else np.concatenate(outs)
            if logits.shape[0] != images.shape[0]:
                raise RuntimeError(f"runner returned {logits.shape[0]} rows for {images.shape[0]} images")
            self.metrics.images.inc(images.shape[0])
        except Exception as e:  # the runner failed: every request of the batch gets the error
            for j in jobs:
                j.future.set_exception(e)
            return
        finally:
            with self._lock:
                self._abandoned.difference_update(j.future for j in jobs)
        compute_s = time.monotonic() - started
        for j in jobs:
            self.metrics.queue_time.observe(started - j.enqueued)
        for stats in {id(j.stats): j.stats for j in jobs if j.stats is not None}.values():
            mine = [j for j in jobs if j.stats is stats]
            stats.batch([started - j.enqueued for j in mine], compute_s, sum(j.n for j in mine))
        start = 0
        for j in jobs:
            j.future.set_result(logits[start : start + j.n])
            start += j.n

    def _all_abandoned(self, jobs: list[_Job]) -> bool:
        with self._lock:
            return all(j.future in self._abandoned for j in jobs)
