"""The serving core: the models behind `gendd serve`, knowing nothing of sockets or HTTP.

    core = ServingCore(runner, model, cfg)     # more models / versions: more=[(runner, model), ...]
    core.warm_up(); core.open()                # ready: every frontend may now call predict()
    logits = core.predict(core.lookup("digits", None), infer_request)
    core.begin_drain(); core.drain(deadline_s) # not ready; queued requests run and are answered

It holds the model registry (several models, several versions of one name), warm-up, lookup,
readiness, statistics, prediction through each model's dynamic batcher, and drain. Frontends
(asgi_frontend.py for REST, grpc_frontend.py for gRPC) are peers that parse their transport's
requests with protocol.py and call the core; the launcher (server.InferenceServer) composes them.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from gendd_deploy.config import ServeConfig
from gendd_deploy.errors import ArtifactError, UsageError
from gendd_deploy.runtime.base import Runner
from gendd_deploy.serve.batcher import DynamicBatcher, QueueFull, ShuttingDown
from gendd_deploy.serve.metrics import ServerMetrics
from gendd_deploy.serve.protocol import InferRequest, ProtocolError, ServedModel
from gendd_deploy.serve.stats import ModelStats


@dataclass
class Served:
    """One model version behind the server: its description, runner, batcher and statistics. The
    encoded-image sibling of a model shares its runner and batcher (one queue, one batch limit)."""

    model: ServedModel
    runner: Runner
    batcher: DynamicBatcher
    stats: ModelStats = field(default_factory=ModelStats)


class ServingCore:
    """Models behind the protocol. `runner` / `model` is the first model; `more` adds (runner,
    model) pairs: other models, or other versions of the same name (a lookup without a version
    gets the highest)."""

    def __init__(
        self,
        runner: Runner,
        model: ServedModel | dict,
        cfg: ServeConfig,
        *,
        more: list[tuple[Runner, ServedModel | dict]] = (),
        request_timeout_s: float = 30.0,
        log: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg
        self.request_timeout_s = request_timeout_s
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.metrics = ServerMetrics()
        self._primary: list[Served] = []
        for r, m in [(runner, model), *more]:
            # the runner decides about noise; the batch limits are the server's
            m = replace(ServedModel.from_meta(m), needs_noise=r.needs_noise, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms)
            # a batcher's series carry the model it serves (its encoded-image sibling shares them)
            batcher = DynamicBatcher(r, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms, queue_size=cfg.queue_size, metrics=self.metrics.for_batcher(m.name, m.version))
            self._primary.append(Served(m, r, batcher))
        seen = [(p.model.name, p.model.version) for p in self._primary]
        if len(set(seen)) != len(seen):
            raise UsageError(f"two models with the same name and version: {sorted(x for x in seen if seen.count(x) > 1)}; serve each version once")
        self.routes: dict[str, dict[str, Served]] = {}  # name -> version -> served
        self._fill_routes()  # from the start: a model's readiness answers 503 while warming up, never 404
        self._ready = threading.Event()
        self.stopping = False

    @property
    def runner(self) -> Runner:
        return self._primary[0].runner

    @property
    def model(self) -> ServedModel:
        """The first model (after warm_up(): with its class count from the warm-up run)."""
        return self._primary[0].model

    @property
    def batcher(self) -> DynamicBatcher:
        return self._primary[0].batcher

    # ---- lookup, metadata, statistics ------------------------------------------------------------

    def lookup(self, name: str, version: str | None) -> Served | None:
        """The served model `name` at `version` (None: the highest version)."""
        versions = self.routes.get(name)
        if not versions:
            return None
        if version is None:
            return versions[max(versions, key=lambda v: int(v) if v.isdigit() else -1)]
        return next((s for s in versions.values() if s.model.has_version(version)), None)

    def find(self, name: str, version: str | None) -> Served:
        """lookup(), or a 404 ProtocolError naming what this server serves."""
        served = self.lookup(name, version)
        if served is None:
            want = f"'{name}'" + (f" version '{version}'" if version else "")
            raise ProtocolError(404, f"unknown model {want}; this server serves {self.listing()}")
        return served

    def served(self) -> list[Served]:
        return [s for versions in self.routes.values() for s in versions.values()]

    def listing(self) -> str:
        return ", ".join(f"'{name}' (versions {', '.join(sorted(v))})" for name, v in self.routes.items()) or "no models yet"

    def metadata(self, served: Served) -> dict:
        """The model's metadata, listing every version served under its name."""
        versions = sorted(self.routes.get(served.model.name, {served.model.version: served}), key=lambda v: (len(v), v))
        return {**served.model.metadata(), "versions": versions}

    def statistics(self, name: str | None = None, version: str | None = None) -> dict:
        """Triton's statistics: of every model (no name), of one version, or of every version of a name."""
        if not name:
            chosen = self.served()
        else:
            served = self.find(name, version)
            chosen = [served] if version else list(self.routes[name].values())
        return {"model_stats": [s.stats.to_dict(s.model.name, s.model.version) for s in chosen]}

    def account(self, served: Served, status: int, seconds: float) -> None:
        """One infer request answered, by any frontend: Triton's statistics and the per-model series."""
        served.stats.request(status == 200, seconds)
        self.metrics.inferred(served.model.name, served.model.version, status, seconds)

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def not_ready(self) -> str:
        return "not ready: " + ("shutting down" if self.stopping else "warming up")

    def warm_up(self) -> None:
        """Every model run once; then the routes again, with what the runs found."""
        for p in self._primary:
            self._warm_up(p)
        self._fill_routes()  # again: the encoded siblings take the class count the warm-up found

    def open(self) -> None:
        """Start the batchers; the core is ready."""
        for p in self._primary:
            p.batcher.start()
        self._ready.set()

    def begin_drain(self) -> None:
        """Not ready from now: new predictions are refused (503), queued ones still run."""
        self._ready.clear()
        self.stopping = True

    def drain(self, timeout_s: float) -> bool:
        """Run and answer every queued request; True when all finished within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        return all([p.batcher.close(max(0.0, deadline - time.monotonic())) for p in self._primary])

    def _warm_up(self, p: Served) -> None:
        """Run the model at batch 1 and max_batch: the first runs are slow, and a bad model fails here."""
        C, H, W = p.model.input_shape
        for n in sorted({1, self.cfg.max_batch}):
            out = np.asarray(p.runner.run(np.zeros((n, C, H, W), np.float32), p.runner.noise(n, 0)))
            if out.ndim != 2 or out.shape[0] != n:
                raise ArtifactError(f"model '{p.model.name}' returned shape {out.shape} for {n} images; expected (n, num_classes)")
        if p.model.num_classes is None or p.model.num_classes != out.shape[1]:
            if p.model.num_classes is not None:
                raise ArtifactError(f"model '{p.model.name}' returns {out.shape[1]} logits, its description says {p.model.num_classes}")
            p.model = p.model.with_classes(int(out.shape[1]))

    def _fill_routes(self) -> None:
        """Every model under its name and version, and the encoded-image sibling of each model that
        has a preprocessing spec (same runner and batcher, its own statistics)."""
        self.routes = {}
        for p in self._primary:
            self.routes.setdefault(p.model.name, {})[p.model.version] = p
            if p.model.preprocess:
                v = p.model.encoded_variant()
                self.routes.setdefault(v.name, {})[v.version] = Served(v, p.runner, p.batcher)

    def submit(self, served: Served, req: InferRequest) -> Future:
        """Queue one parsed request on the model's batcher; 503 ProtocolError when not ready, full
        or shutting down."""
        if not self.ready:
            raise ProtocolError(503, f"{self.not_ready}; retry later")
        try:
            return served.batcher.submit(req.images, req.seed, served.stats)
        except (QueueFull, ShuttingDown) as e:
            raise ProtocolError(503, str(e)) from None

    def _failure(self, served: Served, future: Future, e: BaseException) -> ProtocolError:
        if isinstance(e, TimeoutError):
            served.batcher.abandon(future)  # queued: never run; running: stopped at its next chunk
            return ProtocolError(503, f"timed out after {self.request_timeout_s:g} s waiting for the model; the server is overloaded")
        if isinstance(e, ShuttingDown):
            return ProtocolError(503, str(e))
        return ProtocolError(500, f"the model failed on this batch: {type(e).__name__}: {e}")

    def predict(self, served: Served, req: InferRequest) -> np.ndarray:
        """Logits of one parsed request through the model's batcher (what the frontends call).
        Refusals are ProtocolErrors: 503 when not ready, full, shutting down or timed out; 500
        when the model fails."""
        future = self.submit(served, req)
        try:
            return future.result(timeout=self.request_timeout_s)
        except Exception as e:  # noqa: BLE001 - every failure becomes the protocol's answer
            raise self._failure(served, future, e) from None

    async def predict_async(self, served: Served, req: InferRequest) -> np.ndarray:
        """predict() for an event loop: the request waits for its batch without holding a thread."""
        future = self.submit(served, req)
        try:  # shield: a timeout here must not cancel the batcher's future; abandon() handles it
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.request_timeout_s)
        except Exception as e:  # noqa: BLE001
            raise self._failure(served, future, e) from None
