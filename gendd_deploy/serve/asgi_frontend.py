"""The REST frontend of `gendd serve`: the Open Inference Protocol v2 over HTTP/1.1, a Starlette app
served by uvicorn (h11), over the serving core (core.py).

Endpoints (KServe v2 / Triton REST; `/versions/<v>` may follow the model name):

    GET  /v2/health/live             200 {"live": true}
    GET  /v2/health/ready            200 {"ready": true} | 503 while warming up or shutting down
    GET  /v2                         server metadata (name, version, extensions)
    GET  /v2/models/<name>           model metadata (see protocol.ServedModel.metadata)
    GET  /v2/models/<name>/ready     200 | 503
    POST /v2/models/<name>/infer     inference (see protocol.py for inputs, outputs, classification, seed)
    GET  /v2/models/<name>/config    Triton's ModelConfig (JSON form)
    GET  /v2/models/<name>/stats     Triton's statistics (also /v2/models/stats for every model)
    GET  /metrics                    Prometheus text format (metrics.py)
    GET  /openapi.json               the OpenAPI document of these routes (openapi.py)

Errors are JSON `{"error": "..."}`: 400 bad request (shape, datatype, missing input, undecodable
image, malformed JSON), 404 unknown model or path, 405 wrong method (HEAD and OPTIONS too), 408
body not sent in time, 411 no Content-Length (chunked bodies are refused), 413 body over
`max_body_mb` (refused from the Content-Length, before reading it), 431 request head over 64 KiB,
503 not ready / queue full / shutting down / timed out waiting / too many connections, 500 the
runner failed. Any of them leaves the server serving.

The limits ([serve] section), on uvicorn's own knobs where it has them:
- `max_connections`: past it a new connection is answered 503 at once and closed (here, in
  _GuardedH11; uvicorn's `limit_concurrency` stays set as a backstop);
- `idle_timeout_s` -> `timeout_keep_alive`: an idle keep-alive connection is closed, and (added
  here) so is a new connection that sends nothing;
- `header_timeout_s`: a request's line and headers must arrive within it of their first byte
  (added here: uvicorn has no such deadline, and a client dripping a header byte every few
  seconds would otherwise keep its connection slot for ever);
- request line + headers over 64 KiB -> `h11_max_incomplete_event_size` while they arrive, and a
  check of the parsed headers here: refused (431) and closed;
- `max_body_mb`: checked here from Content-Length before a byte of the body is read (413);
- `body_timeout_s`: the whole body must arrive within it, timed here (408).
These bound what one client can take; they do not tell clients apart. Facing untrusted networks,
put a reverse proxy (nginx, Envoy, a cloud load balancer) in front for per-client limits and TLS.

One event loop thread parses requests and writes answers; a request waits for its batch without
holding a thread (the core's `predict_async`); encoded images are decoded in a worker thread so one
large request does not stall the loop; one batcher thread per model runs it (batcher.py).

Example: gendd serve -p pipelines/quickstart.toml --port 8000
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from functools import partial
from http import HTTPStatus

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

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
REFUSED_LINGER_S = 1.0  # a refused connection is closed at the latest this long after its answer


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
            if scope["method"] in ("HEAD", "OPTIONS"):  # neither is served (Starlette would answer HEAD as GET)
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
        """The router's and the lookup's refusals, as JSON errors that name the way out."""
        if exc.status_code == 405:  # Starlette lists HEAD beside GET; HEAD is not served (see _Counted)
            allowed = ", ".join(m for m in (exc.headers or {}).get("Allow", "GET").split(", ") if m != "HEAD")
            return _error(405, f"method {request.method} not allowed here; use {allowed}", {"Allow": allowed})
        if exc.status_code == 404 and exc.detail == "Not Found":
            return _error(404, f"no route {request.url.path}; see GET /v2 and /v2/models/<name> for {self.core.listing()}")
        return _error(exc.status_code, str(exc.detail), exc.headers)


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with the guards uvicorn lacks, each closing the connection:
    - past `max_connections` a new connection is answered a JSON 503 at once (uvicorn's own
      `limit_concurrency` answers plain text, and only after reading a request);
    - a new connection that sends nothing is closed after `timeout_keep_alive` (uvicorn arms that
      timer only after a first answer, so a silent connection would hold its slot for ever);
    - a request's line and headers must all arrive within `head_timeout_s` of their first byte (a
      client that drips a header byte every few seconds resets uvicorn's keep-alive timer each time);
    - a request line h11 cannot parse is answered a JSON 400 (uvicorn's is plain text).
    The server's settings arrive as class attributes of a per-server subclass (AsgiFrontend._config).
    Each refusal is counted in gendd_requests_total as endpoint "connection"."""

    head_timeout_s: float = 10.0
    max_connections: int = 512
    metrics = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        if len(self.connections) > self.max_connections:
            self._refuse(503, f"the server holds {self.max_connections} connections (max_connections); retry shortly", b"Retry-After: 1\r\n")
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # whatever the client still sends is dropped
            return
        super().data_received(data)  # cancels the keep-alive timer; parses what arrived
        waiting_for_head = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting_for_head and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._timed_out)
        elif not waiting_for_head:
            self._cancel_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, f"malformed HTTP request ({msg.rstrip('.')}); send an HTTP/1.1 request line and headers")

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._count(408)
            self.transport.close()

    def _refuse(self, status: int, message: str, extra_headers: bytes = b"") -> None:
        """Answer `status` with a JSON error outside any request cycle, then close: our side at
        once, theirs within REFUSED_LINGER_S, reading and dropping what they send meanwhile (closing
        with their request unread would reset the connection and lose the answer)."""
        self._count(status)
        self._refused = True
        body = error_body(message)
        head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        self.transport.write(head.encode() + extra_headers + b"\r\n" + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(REFUSED_LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _count(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.answered("connection", status)


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
    def open_connections(self) -> int:
        """Connections uvicorn holds now (idle ones included)."""
        return len(self.uvicorn.server_state.connections) if self.uvicorn is not None else 0

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
            http=type("GenddH11", (_GuardedH11,), {"head_timeout_s": cfg.header_timeout_s, "max_connections": cfg.max_connections, "metrics": self.core.metrics}),
            lifespan="off",
            log_config=None,  # leave the process's logging alone
            log_level="error",
            access_log=False,
            server_header=False,
            headers=[("server", f"{SERVER_NAME}/{__version__}")],
            backlog=BACKLOG,
            timeout_keep_alive=cfg.idle_timeout_s,
            limit_concurrency=cfg.max_connections + 1,  # a backstop: _GuardedH11 refuses extra connections first
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
