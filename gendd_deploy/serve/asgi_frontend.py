"""The REST frontend on a kept stack: a Starlette app served by uvicorn (`gendd serve --http-server asgi`).

Same routes, JSON and binary-tensor bodies and status codes as the standard-library frontend
(http_frontend.py, the default), over the same serving core (core.py), plus `GET /openapi.json`.

The limits map onto uvicorn's own knobs where it has them:
- `[serve] max_connections` -> `limit_concurrency`: past it uvicorn answers 503 and closes;
- `idle_timeout_s` -> `timeout_keep_alive`: an idle keep-alive connection is closed;
- request line + headers over 64 KiB -> `h11_max_incomplete_event_size` while they arrive, and a
  check of the parsed headers here: refused (431) and closed;
- `max_body_mb`: checked here from Content-Length before a byte of the body is read (413);
- `body_timeout_s`: the whole body must arrive within it, timed here (408).
uvicorn has no deadline for slow request *headers* (a client that sends a header byte every few
seconds keeps its connection); `[serve] header_timeout_s` therefore holds only on the stdlib
frontend. Put a reverse proxy (nginx, Envoy, a cloud load balancer) in front of the ASGI frontend
when it faces untrusted clients: they bound header time and connection counts per client.

A request waits for its batch without holding a thread (the core's `predict_async`); encoded
images are decoded in a worker thread so one large request does not stall the event loop.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from functools import partial

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gendd_deploy import __version__
from gendd_deploy.errors import UsageError
from gendd_deploy.serve.openapi import PATH as OPENAPI_PATH
from gendd_deploy.serve.openapi import document as openapi_document
from gendd_deploy.serve.core import Served, ServingCore
from gendd_deploy.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gendd_deploy.serve.metrics import endpoint_label
from gendd_deploy.serve.protocol import EXTENSIONS, SERVER_NAME, ProtocolError, build_infer_response, error_body, parse_infer_request

MAX_HEAD_BYTES = 64 * 1024  # request line + headers (uvicorn's h11_max_incomplete_event_size)
BACKLOG = 512  # listen backlog: bursts of new connections must not be dropped
LINGER_BYTES = 1 << 20  # after refusing an oversized body, read at most this much of it


def _json(status: int, obj: dict, headers: dict | None = None) -> Response:
    return Response(json.dumps(obj).encode(), status, headers, media_type="application/json")


def _error(status: int, message: str, headers: dict | None = None, **extra) -> Response:
    return Response(error_body(message, **extra), status, headers, media_type="application/json")


def _refuse(status: int, message: str) -> Response:
    """An error after which the connection is not reused (its body was not read)."""
    return _error(status, message, {"Connection": "close"})


class _Counted:
    """ASGI middleware: every answer counted by endpoint and status code (404s and 405s too)."""

    def __init__(self, app, core: ServingCore):
        self.app, self.core = app, core

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted_once = False

        async def counted(message) -> None:
            nonlocal counted_once
            if message["type"] == "http.response.start":  # counted before the answer leaves
                self.core.metrics.answered(endpoint_label(scope["path"]), message["status"])
                counted_once = True
            await send(message)

        try:
            if scope["method"] in ("HEAD", "OPTIONS"):  # as the stdlib frontend: neither is served
                await self._not_served(scope["method"], counted)
            elif sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEAD_BYTES:  # a head that arrived whole: h11 let it through
                await _error(431, f"request headers are over {MAX_HEAD_BYTES} bytes", {"Connection": "close"})(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            if not counted_once:  # the app failed before it answered: uvicorn sends a 500
                self.core.metrics.answered(endpoint_label(scope["path"]), 500)


    @staticmethod
    async def _not_served(method: str, send) -> None:
        body = b"" if method == "HEAD" else error_body("OPTIONS is not supported; use GET or POST")
        ctype = b"text/plain" if method == "HEAD" else b"application/json"
        headers = [(b"content-type", ctype), (b"allow", b"GET, POST"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 405, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Handlers:
    def __init__(self, core: ServingCore):
        self.core = core

    async def server_metadata(self, request: Request) -> Response:
        return _json(200, {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return _json(200, {"live": True})

    async def ready(self, request: Request) -> Response:
        return self._readiness({"ready": self.core.ready})

    async def all_stats(self, request: Request) -> Response:
        return _json(200, self.core.statistics())

    async def metrics(self, request: Request) -> Response:
        return Response(self.core.metrics.render(), 200, media_type=METRICS_CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return _json(200, openapi_document(self.core))

    def _served(self, request: Request) -> Served:
        try:
            return self.core.find(request.path_params["name"], request.path_params.get("version"))
        except ProtocolError as e:
            raise HTTPException(e.status, e.message) from None

    async def model_metadata(self, request: Request) -> Response:
        return _json(200, self.core.metadata(self._served(request)))

    async def model_ready(self, request: Request) -> Response:
        return self._readiness({"name": self._served(request).model.name, "ready": self.core.ready})

    async def model_config(self, request: Request) -> Response:
        return _json(200, self._served(request).model.config())

    async def model_stats(self, request: Request) -> Response:
        served = self._served(request)
        return _json(200, self.core.statistics(served.model.name, request.path_params.get("version")))

    def _readiness(self, obj: dict) -> Response:
        if self.core.ready:
            return _json(200, obj)
        return _json(503, {**obj, "error": self.core.not_ready})

    # ---- infer -------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        served = self._served(request)
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        t0 = time.perf_counter()
        resp = await self._infer(served, request, body)
        self.core.account(served, resp.status_code, time.perf_counter() - t0)
        return resp

    async def _body(self, request: Request) -> bytes | Response:
        """The request body, read within the server's limits, or the refusal."""
        cfg = self.core.cfg
        if request.headers.get("transfer-encoding"):
            return _refuse(411, "chunked request bodies are not supported; send Content-Length")
        length_text = request.headers.get("content-length")
        if length_text is None:
            return _refuse(411, "missing Content-Length header")
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            return _refuse(400, f"bad Content-Length {length_text!r}")
        limit = int(cfg.max_body_mb * 1024 * 1024)
        if length > limit:
            await self._linger(request, length)
            return _refuse(413, f"request body of {length} bytes is over the limit of {limit} bytes (max_body_mb = {cfg.max_body_mb:g})")
        chunks, got = [], 0
        try:
            async with asyncio.timeout(cfg.body_timeout_s):  # the whole body, not each read
                while True:
                    message = await request.receive()
                    if message["type"] == "http.disconnect":
                        return _refuse(400, f"the client went away after {got} of {length} bytes")
                    chunks.append(message.get("body", b""))
                    got += len(chunks[-1])
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return _refuse(408, f"the request body did not arrive within {cfg.body_timeout_s:g} s (body_timeout_s)")
        if got != length:
            return _refuse(400, f"request body ended after {got} of {length} bytes")
        return b"".join(chunks)

    @staticmethod
    async def _linger(request: Request, length: int) -> None:
        """Read (bounded) what the client is already sending, so that it sees our answer, not a reset."""
        left = min(length, LINGER_BYTES)
        try:
            while left > 0:
                message = await asyncio.wait_for(request.receive(), 0.2)
                left -= len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        except TimeoutError:
            pass

    async def _infer(self, served: Served, request: Request, body: bytes) -> Response:
        if not self.core.ready:
            return _error(503, f"{self.core.not_ready}; retry later")
        encoding = (request.headers.get("content-encoding") or "identity").strip().lower()
        if encoding != "identity":
            return _error(400, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
        header_text = request.headers.get("inference-header-content-length")
        if header_text is not None and not (header_text.strip().isdigit() and len(header_text.strip()) <= 19):
            return _error(400, f"bad Inference-Header-Content-Length {header_text[:40]!r}: expected a byte count")
        header_length = None if header_text is None else int(header_text)
        max_json = int(self.core.cfg.max_json_mb * 1024 * 1024)
        try:
            parse = partial(parse_infer_request, served.model, body, header_length, max_json_bytes=max_json)
            req = await run_in_threadpool(parse) if served.model.encoded else parse()  # decoding images is slow work
        except ProtocolError as e:
            return _error(e.status, e.message)
        try:
            logits = await self.core.predict_async(served, req)
            payload, json_length = build_infer_response(served.model, req, logits)
        except ProtocolError as e:
            return _error(e.status, e.message, **({"id": req.id} if req.id is not None else {}))
        if json_length is None:
            return Response(payload, 200, media_type="application/json")
        return Response(payload, 200, {"Inference-Header-Content-Length": str(json_length)}, media_type="application/octet-stream")

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        """The router's and the lookup's refusals, as the JSON errors the stdlib frontend sends."""
        if exc.status_code == 405:  # Starlette lists HEAD beside GET; HEAD is not served (see _Counted)
            allowed = ", ".join(m for m in (exc.headers or {}).get("Allow", "GET").split(", ") if m != "HEAD")
            return _error(405, f"method {request.method} not allowed here; use {allowed}", {"Allow": allowed})
        if exc.status_code == 404 and exc.detail == "Not Found":
            return _error(404, f"no route {request.url.path}; see GET /v2 and /v2/models/<name> for {self.core.listing()}")
        return _error(exc.status_code, str(exc.detail), exc.headers)


def _guarded(handler):
    """A bug in a handler is a JSON 500, not a traceback, and the server keeps serving."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPException:
            raise
        except Exception as e:  # noqa: BLE001
            return _error(500, f"internal error: {type(e).__name__}: {e}")

    run.__name__ = handler.__name__
    return run


def build_app(core: ServingCore):
    """The ASGI app: Starlette routes under the counting middleware."""
    h = _Handlers(core)
    get = partial(Route, methods=["GET"])
    routes = [
        Route("/v2/models/{name}/infer", _guarded(h.infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", _guarded(h.infer), methods=["POST"]),
        get("/v2", _guarded(h.server_metadata)),
        get("/v2/health/live", _guarded(h.live)),
        get("/v2/health/ready", _guarded(h.ready)),
        get("/v2/models/stats", _guarded(h.all_stats)),  # before /v2/models/{name}
        get("/metrics", _guarded(h.metrics)),
        get(OPENAPI_PATH, _guarded(h.openapi)),
    ]
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            get(model, _guarded(h.model_metadata)),
            get(model + "/ready", _guarded(h.model_ready)),
            get(model + "/config", _guarded(h.model_config)),
            get(model + "/stats", _guarded(h.model_stats)),
        ]
    return _Counted(Starlette(routes=routes, exception_handlers={HTTPException: h.http_error}), core)


class AsgiFrontend:
    """uvicorn serving the core's models on [serve] host:port (0 picks a free port), in a thread:
    `start()`, `close_listener(grace_s)`, `finish(deadline)` as every frontend."""

    def __init__(self, core: ServingCore):
        self.core, self.cfg = core, core.cfg
        self.sock: socket.socket | None = None
        self.uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1]) if self.sock is not None else self.cfg.port

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        return f"http://{host}:{self.port}"

    def _config(self) -> uvicorn.Config:
        cfg = self.cfg
        return uvicorn.Config(
            build_app(self.core),
            http="h11",
            lifespan="off",
            log_config=None,  # leave the process's logging alone
            log_level="error",
            access_log=False,
            server_header=False,
            headers=[("server", f"{SERVER_NAME}/{__version__}")],
            backlog=BACKLOG,
            timeout_keep_alive=cfg.idle_timeout_s,
            limit_concurrency=cfg.max_connections + 1,  # uvicorn counts the connection asking, too
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        )

    def start(self, timeout_s: float = 30.0) -> "AsgiFrontend":
        cfg = self.cfg
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it
        # a response's head and body (two writes) wait out the client's delayed ACK (~40 ms each)
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((cfg.host, cfg.port))
            sock.listen(BACKLOG)
        except OSError as e:
            sock.close()
            raise UsageError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}); pick another --port") from None
        self.sock = sock
        self.uvicorn = uvicorn.Server(self._config())
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, name="gendd-asgi", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise UsageError(f"the HTTP server did not start on port {self.port}")
            time.sleep(0.005)
        return self

    def close_listener(self, grace_s: float = 0.0) -> None:
        """Stop accepting and close idle connections; requests in flight get up to `grace_s`."""
        if self.uvicorn is not None:
            self.uvicorn.config.timeout_graceful_shutdown = max(0.1, grace_s)
            self.uvicorn.should_exit = True

    def finish(self, deadline: float) -> bool:
        """Wait, until the monotonic `deadline`, for uvicorn to finish; True when it has."""
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()) + 5.0)
        if self.sock is not None:
            self.sock.close()
        return not self.running

    def abort(self) -> None:
        self.close_listener(0.0)
        self.finish(time.monotonic())
