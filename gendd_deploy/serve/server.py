"""`gendd serve`: the serving core and its frontends, composed. REST (asgi_frontend.py: Starlette
on uvicorn) always, gRPC (grpc_frontend.py) when [serve] grpc_port >= 0 and its extra is installed;
both are peers over one ServingCore (core.py), which holds the models, readiness and drain.

The endpoints, status codes and limits are those of the Open Inference Protocol v2 (KServe /
Triton) and are listed in asgi_frontend.py; gRPC speaks KServe's GRPCInferenceService.

Shutdown (SIGTERM / SIGINT, or `InferenceServer.stop`): readiness goes to 503, the frontends stop
accepting, queued requests run and are answered, connections close, then `serve` returns.

Example: gendd serve -p pipelines/quickstart.toml --port 8000

A third frontend is one module with `start()`, `close_listener()` and `finish(deadline)` over the
core, added in `InferenceServer.start` (docs/extending.md).
"""

from __future__ import annotations

import time

from gendd_deploy.config import ServeConfig
from gendd_deploy.errors import MissingDependency
from gendd_deploy.runtime.base import Runner
from gendd_deploy.serve.asgi_frontend import AsgiFrontend
from gendd_deploy.serve.core import Served, ServingCore
from gendd_deploy.serve.protocol import ServedModel

__all__ = ["InferenceServer", "Served", "ServingCore"]


class InferenceServer:
    """The core plus its frontends: `start()` binds REST (live at once), warms the models up,
    starts gRPC and opens (ready); `stop()` drains and closes.

    `runner` / `model` is the first model; `more` adds (runner, model) pairs: other models, or other
    versions of the same name (a URL without a version gets the highest)."""

    def __init__(self, runner: Runner, model: ServedModel | dict, cfg: ServeConfig, **options):
        """`options`: more, request_timeout_s, log, as ServingCore takes them."""
        self.core = ServingCore(runner, model, cfg, **options)
        self.http = AsgiFrontend(self.core)
        self._grpc = None  # the gRPC frontend, when [serve] grpc_port asks for one
        self.frontends: list = []  # started ones, each with start(), close_listener(grace_s), finish(deadline)

    # what callers and tests read: the core's models and state, the frontends' addresses
    cfg = property(lambda self: self.core.cfg)
    log = property(lambda self: self.core.log)
    metrics = property(lambda self: self.core.metrics)
    runner = property(lambda self: self.core.runner)
    model = property(lambda self: self.core.model)
    batcher = property(lambda self: self.core.batcher)
    routes = property(lambda self: self.core.routes)
    ready = property(lambda self: self.core.ready)
    stopping = property(lambda self: self.core.stopping)
    port = property(lambda self: self.http.port)
    url = property(lambda self: self.http.url)
    running = property(lambda self: self.http.running)

    def lookup(self, name: str, version: str | None) -> Served | None:
        return self.core.lookup(name, version)

    def served(self) -> list[Served]:
        return self.core.served()

    @property
    def grpc_port(self) -> int | None:
        return self._grpc.port if self._grpc is not None else None

    def start(self) -> "InferenceServer":
        self.frontends = [self.http.start()]  # live from here; ready after the warm-up
        try:
            self.core.warm_up()  # metadata and readiness answer while warming up
            if self.cfg.grpc_port >= 0:
                self._start_grpc()
        except Exception:
            self.http.abort()
            raise
        self.core.open()
        return self

    def _start_grpc(self) -> None:
        try:  # imported on use: grpcio and Triton's stubs are the [serve] extra
            from gendd_deploy.serve.grpc_frontend import GrpcFrontend
        except MissingDependency as e:
            self.log(f"gendd serve: HTTP only: {e}")
            return
        self._grpc = GrpcFrontend(self.core).start()
        self.frontends.append(self._grpc)

    def stop(self, drain_timeout_s: float = 30.0) -> bool:
        """Stop accepting, answer every queued request, close connections. True if all drained in time."""
        if not self.http.running:
            return True
        self.core.begin_drain()
        for f in self.frontends:  # new requests refused; those in flight are answered as the core drains
            f.close_listener(drain_timeout_s)
        deadline = time.monotonic() + drain_timeout_s
        drained = self.core.drain(max(0.0, deadline - time.monotonic()))
        finished = all([f.finish(deadline) for f in self.frontends])
        self.frontends, self._grpc = [], None
        return drained and finished

    def __enter__(self) -> "InferenceServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
