"""The REST frontend of `gendd serve`: the Open Inference Protocol v2 over HTTP/1.1, on the standard
library's threading server, over the serving core (core.py).

Endpoints (KServe v2 / Triton REST; `/versions/<v>` may follow the model name):

    GET  /v2/health/live             200 {"live": true}
    GET  /v2/health/ready            200 {"ready": true} | 503 while warming up or shutting down
    GET  /v2                         server metadata (name, version, extensions)
    GET  /v2/models/<name>           model metadata (see protocol.ServedModel.metadata)
    GET  /v2/models/<name>/ready     200 | 503
    POST /v2/models/<name>/infer     inference (see protocol.py for inputs, outputs, classification, seed)
    GET  /v2/models/<name>/config    Triton's ModelConfig (JSON form)
    GET  /v2/models/<name>/stats     Triton's statistics (also /v2/models/stats for every model)
    GET  /metrics                    Prometheus text format

Errors are JSON `{"error": "..."}`: 400 bad request (shape, datatype, missing input, undecodable
image, malformed JSON), 404 unknown model or path, 405 wrong method, 408 body not sent in time,
411 no Content-Length (chunked bodies are refused), 413 body over `max_body_mb` (refused from the
Content-Length, before reading it), 503 not ready / queue full / shutting down / timed out
waiting, 500 the runner failed. Any of them leaves the server serving.

Each connection gets a thread that parses, decodes and preprocesses its requests; one batcher
thread runs the model (batcher.py). Shutdown (SIGTERM / SIGINT, or `InferenceServer.stop`):
readiness goes to 503, the listener closes, queued requests run and are answered, idle
keep-alive connections close, then `serve` returns.

Example: gendd serve -p pipelines/quickstart.toml --port 8000

Longer than most modules: the HTTP half of the protocol in one place: connection handling and
its limits, and the routes, each a call into the core.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from gendd_deploy import __version__
from gendd_deploy.errors import UsageError
from gendd_deploy.serve.core import Served, ServingCore
from gendd_deploy.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gendd_deploy.serve.metrics import endpoint_label
from gendd_deploy.serve.protocol import EXTENSIONS, SERVER_NAME, ProtocolError, build_infer_response, error_body, parse_infer_request

_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer|/config|/stats)?/?$")
_LINGER_BYTES = 1 << 20  # after refusing an oversized body, read at most this much of it before closing


class _Response:
    __slots__ = ("status", "body", "content_type", "headers", "close")

    def __init__(self, status: int, body: bytes, content_type: str = "application/json", headers: dict | None = None, close: bool = False):
        self.status, self.body, self.content_type = status, body, content_type
        self.headers, self.close = headers or {}, close


def _json(status: int, obj: dict) -> _Response:
    return _Response(status, json.dumps(obj).encode())


def _error(status: int, message: str, **extra) -> _Response:
    return _Response(status, error_body(message, **extra))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # stop() waits for connections itself, with a bound
    request_queue_size = 512  # listen backlog: bursts of new connections must not be dropped
    app: "HttpFrontend"

    def __init__(self, address: tuple[str, int], app: "HttpFrontend"):
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        """One thread per connection, but never more than max_connections: past that the
        connection gets a 503 at once and is closed, so idle sockets cannot starve the server."""
        if len(self.app._conns) >= self.app.cfg.max_connections:
            self.app.metrics.answered("connection", 503)
            try:
                body = error_body(f"the server holds {self.app.cfg.max_connections} connections (max_connections); retry shortly")
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up mid-request is routine; anything else gets one line, not a traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        self.app.log(f"gendd serve: error on a connection from {client_address[0]}: {type(exc).__name__}: {exc}")

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS query); the name is not needed
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients such as tritonclient reuse connections
    server_version = f"{SERVER_NAME}/{__version__}"
    timeout = 60  # seconds an idle keep-alive connection is kept
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would add 40 ms
    server: _HTTPServer

    def setup(self) -> None:
        self.timeout = self.server.app.cfg.idle_timeout_s  # before StreamRequestHandler applies it
        super().setup()
        self.server.app._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.server.app._track(self.connection, add=False)

    def log_message(self, format: str, *args) -> None:  # no access log on stderr
        pass

    def handle_one_request(self) -> None:
        """The wait for a request's first byte is the idle timeout (keep-alive); from that byte the
        request line and headers must all arrive within [serve] header_timeout_s."""
        app = self.server.app
        try:
            first = self.rfile.peek(1)
        except (OSError, ValueError):
            first = b""
        if not first:
            self.close_connection = True
            return
        app._deadline(self.connection, app.cfg.header_timeout_s)
        try:
            super().handle_one_request()
        finally:
            app._deadline(self.connection, None)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.app._deadline(self.connection, None)  # headers are in: the header deadline is met
        return ok

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors of http.server (bad request line, unknown method) as JSON."""
        body = error_body(message or HTTPStatus(code).phrase)
        self.request_version = "HTTP/1.1"  # an unparsable request line leaves 0.9, which has no status line
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass
        self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_HEAD(self) -> None:
        self._send(_Response(405, b"", "text/plain", headers={"Allow": "GET, POST"}), close=False)  # no body to a HEAD

    def do_OPTIONS(self) -> None:
        self._send(_Response(405, error_body("OPTIONS is not supported; use GET or POST"), headers={"Allow": "GET, POST"}), close=False)

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        app = self.server.app
        try:
            path = unquote(urlsplit(self.path).path)
        except ValueError:  # e.g. 'http://[::1': an unclosed IPv6 host in an absolute target
            self._send(_error(400, f"malformed request target {self.path[:80]!r}"), close=True)
            app.metrics.answered("other", 400)
            return
        endpoint = endpoint_label(path)
        app._enter()
        try:
            try:
                resp = self._body_then_route(app, method, path)
            except Exception as e:  # a bug must not take the server down
                resp = _error(500, f"internal error: {type(e).__name__}: {e}")
            app.metrics.answered(endpoint, resp.status)  # before the answer leaves: a client that reads /metrics next sees it
            self._send(resp, close=resp.close or app.stopping)
        finally:
            app._leave()

    def _body_then_route(self, app: "HttpFrontend", method: str, path: str) -> _Response:
        body = b""
        if self.headers.get("Transfer-Encoding"):
            return self._refuse(411, "chunked request bodies are not supported; send Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None and method in ("POST", "PUT"):
            return self._refuse(411, "missing Content-Length header")
        if length_text is not None:  # read even a GET's body, or the keep-alive connection goes out of step
            try:
                length = int(length_text)
                if length < 0:
                    raise ValueError
            except ValueError:
                return self._refuse(400, f"bad Content-Length {length_text!r}")
            limit = int(app.cfg.max_body_mb * 1024 * 1024)
            if length > limit:
                self._linger(length)
                return self._refuse(413, f"request body of {length} bytes is over the limit of {limit} bytes (max_body_mb = {app.cfg.max_body_mb:g})")
            app._deadline(self.connection, app.cfg.body_timeout_s)
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                return self._refuse(408, f"timed out after {self.timeout} s reading the request body")
            except OSError:  # shut down by the body deadline
                return self._refuse(408, f"the request body did not arrive within {app.cfg.body_timeout_s:g} s (body_timeout_s)")
            finally:
                app._deadline(self.connection, None)
            if len(body) != length:
                return self._refuse(400, f"request body ended after {len(body)} of {length} bytes")
        return app.route(method, path, self.headers, body)

    def _refuse(self, status: int, message: str) -> _Response:
        """An error after which the connection cannot be reused (the body was not read)."""
        return _Response(status, error_body(message), close=True)

    def _linger(self, length: int) -> None:
        """Read (bounded) what the client is already sending, so it sees our answer, not a reset."""
        self.connection.settimeout(0.2)
        left = min(length, _LINGER_BYTES)
        try:
            while left > 0:
                chunk = self.rfile.read1(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _send(self, resp: _Response, close: bool) -> None:
        try:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.content_type)
            self.send_header("Content-Length", str(len(resp.body)))
            for k, v in resp.headers.items():
                self.send_header(k, str(v))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(resp.body)
            self.wfile.flush()
        except OSError:  # the client went away
            self.close_connection = True


class HttpFrontend:
    """REST over the standard library's threading HTTP server, for the models of `core`:
    `start()` binds and serves (live at once; ready when the core is), `close_listener()` stops
    accepting, `finish(deadline)` waits for answers being written and closes the connections."""

    def __init__(self, core: ServingCore):
        self.core = core
        self.cfg = core.cfg
        self.metrics = core.metrics
        self.log = core.log
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._active = 0  # requests being handled right now
        self._lock = threading.Lock()
        # total deadlines (monotonic s) for reading a request's headers or body, per connection: a
        # client that drips a byte every few seconds resets a per-read timeout forever, not these
        self._deadlines: dict[socket.socket, float] = {}

    @property
    def stopping(self) -> bool:
        return self.core.stopping

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd else self.cfg.port

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> "HttpFrontend":
        try:
            self._httpd = _HTTPServer((self.cfg.host, self.cfg.port), self)
        except OSError as e:
            raise UsageError(f"cannot listen on {self.cfg.host}:{self.cfg.port} ({e.strerror or e}); pick another --port") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="gendd-http", daemon=True)
        self._thread.start()
        threading.Thread(target=self._enforce_deadlines, name="gendd-deadlines", daemon=True).start()
        return self

    def close_listener(self, grace_s: float = 0.0) -> None:
        """The accept loop ends; open connections still get answers."""
        if self._httpd is not None:
            self._httpd.shutdown()

    def finish(self, deadline: float) -> bool:
        """Wait (until the monotonic `deadline`) for responses being written, then close every
        connection and the socket. True when no request was still being handled."""
        if self._httpd is None:
            return True
        while self._active > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            idle = list(self._conns)
        for sock in idle:  # wakes threads waiting on idle keep-alive connections
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        end = time.monotonic() + 2.0
        while self._conns and time.monotonic() < end:
            time.sleep(0.01)
        self._httpd = None
        return self._active == 0

    def abort(self) -> None:
        """Close at once (a start that failed)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(sock)
            if not add:
                self._deadlines.pop(sock, None)

    def _deadline(self, sock: socket.socket, seconds: float | None) -> None:
        """From now, reading on `sock` must be done within `seconds` (None: no deadline)."""
        with self._lock:
            if seconds is None:
                self._deadlines.pop(sock, None)
            else:
                self._deadlines[sock] = time.monotonic() + seconds

    def _enforce_deadlines(self) -> None:
        """One thread for all connections: past its deadline a connection is shut down, which ends
        the blocked read in its handler thread and frees its slot. Ends once the server has stopped."""
        while not (self.stopping and self._httpd is None):
            time.sleep(0.2)
            now = time.monotonic()
            with self._lock:
                late = [sk for sk, dl in self._deadlines.items() if dl < now]
                for sk in late:
                    del self._deadlines[sk]
            for sk in late:
                self.metrics.answered("connection", 408)
                try:
                    sk.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _enter(self) -> None:
        with self._lock:
            self._active += 1

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1

    # ---- routes ------------------------------------------------------------------------------

    def route(self, method: str, path: str, headers, body: bytes) -> _Response:
        core = self.core
        if path == "/metrics":
            return self._only(method, "GET") or _Response(200, self.metrics.render(), METRICS_CONTENT_TYPE)
        if path in ("/v2", "/v2/"):
            return self._only(method, "GET") or _json(200, {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})
        if path == "/v2/health/live":
            return self._only(method, "GET") or _json(200, {"live": True})
        if path == "/v2/health/ready":
            return self._only(method, "GET") or self._readiness({"ready": core.ready})
        if path.rstrip("/") == "/v2/models/stats":  # Triton: the statistics of every model
            return self._only(method, "GET") or _json(200, core.statistics())
        m = _MODEL_PATH.match(path)
        if not m:
            return _error(404, f"no route {path}; see GET /v2 and /v2/models/<name> for {core.listing()}")
        try:
            served = core.find(m["name"], m["version"])
        except ProtocolError as e:
            return _error(e.status, e.message)
        action = m["action"]
        if action == "/infer":
            return self._only(method, "POST") or self._infer(served, headers, body)
        if action == "/ready":
            return self._only(method, "GET") or self._readiness({"name": served.model.name, "ready": core.ready})
        if action == "/config":
            return self._only(method, "GET") or _json(200, served.model.config())
        if action == "/stats":
            return self._only(method, "GET") or _json(200, core.statistics(m["name"], m["version"]))
        return self._only(method, "GET") or _json(200, core.metadata(served))

    @staticmethod
    def _only(method: str, allowed: str) -> _Response | None:
        if method == allowed:
            return None
        return _Response(405, error_body(f"method {method} not allowed here; use {allowed}"), headers={"Allow": allowed})

    def _readiness(self, obj: dict) -> _Response:
        if self.core.ready:
            return _json(200, obj)
        return _json(503, {**obj, "error": self.core.not_ready})

    def _infer(self, served: Served, headers, body: bytes) -> _Response:
        t0 = time.perf_counter()
        resp = self._infer_once(served, headers, body)
        self.core.account(served, resp.status, time.perf_counter() - t0)
        return resp

    def _infer_once(self, served: Served, headers, body: bytes) -> _Response:
        if not self.core.ready:
            return _error(503, f"{self.core.not_ready}; retry later")
        encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            return _error(400, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
        header_text = headers.get("Inference-Header-Content-Length")
        if header_text is not None and not (header_text.strip().isdigit() and len(header_text.strip()) <= 19):
            return _error(400, f"bad Inference-Header-Content-Length {header_text[:40]!r}: expected a byte count")
        try:
            header_length = None if header_text is None else int(header_text)
            req = parse_infer_request(served.model, body, header_length, max_json_bytes=int(self.cfg.max_json_mb * 1024 * 1024))
        except ProtocolError as e:
            return _error(e.status, e.message)
        try:
            logits = self.core.predict(served, req)
            payload, json_length = build_infer_response(served.model, req, logits)
        except ProtocolError as e:
            return _error(e.status, e.message, **({"id": req.id} if req.id is not None else {}))
        extra = {"Inference-Header-Content-Length": json_length} if json_length is not None else {}
        ctype = "application/json" if json_length is None else "application/octet-stream"
        return _Response(200, payload, ctype, extra)
