"""The REST frontend (Starlette on uvicorn) answers every route and refusal as the protocol says,
and holds its limits on uvicorn's own knobs and the deadlines added to them."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from gendd_deploy.serve.openapi import PATH as OPENAPI_PATH
from test_serve import CLASSES, META, _raw, call, image_request, logits_of, metric, onnx_path, runner, running, sample_images, tensor_request  # noqa: F401  (fixtures)

X = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)

# (method, path, body, headers, status, words the JSON error must hold): good requests and every kind of
# refusal the router and the infer path give, as the earlier standard-library frontend answered them
EXCHANGES = [
    ("GET", "/v2", None, {}, 200, None),
    ("GET", "/v2/health/live", None, {}, 200, None),
    ("GET", "/v2/health/ready", None, {}, 200, None),
    ("GET", "/v2/models/tiny", None, {}, 200, None),
    ("GET", "/v2/models/tiny/versions/3", None, {}, 200, None),
    ("GET", "/v2/models/tiny/versions/v003/ready", None, {}, 200, None),
    ("GET", "/v2/models/tiny/config", None, {}, 200, None),
    ("GET", "/v2/models/tiny_image", None, {}, 200, None),
    ("GET", "/v2/models/nope", None, {}, 404, "unknown model 'nope'"),
    ("GET", "/v2/models/tiny/versions/9", None, {}, 404, "unknown model 'tiny' version '9'"),
    ("GET", "/nope", None, {}, 404, "no route /nope"),
    ("POST", "/v2/health/ready", b"{}", {}, 405, "use GET"),
    ("GET", "/v2/models/tiny/infer", None, {}, 405, "use POST"),
    ("HEAD", "/v2/health/ready", None, {}, 405, None),
    ("OPTIONS", "/v2", None, {}, 405, "OPTIONS is not supported"),
    ("POST", "/v2/models/tiny/infer", tensor_request(X), {}, 200, None),
    ("POST", "/v2/models/tiny/versions/3/infer", tensor_request(X, outputs=[{"name": "logits", "parameters": {"classification": 3}}]), {}, 200, None),
    ("POST", "/v2/models/tiny/infer", tensor_request(X, parameters={"top_k": 2}), {}, 200, None),
    ("POST", "/v2/models/tiny/infer", tensor_request(X[:, :, :4]), {}, 400, "has shape [3, 1, 4, 8]"),
    ("POST", "/v2/models/tiny/infer", b"{not json", {}, 400, "malformed JSON"),
    ("POST", "/v2/models/tiny/infer", {"inputs": []}, {}, 400, "missing input"),
    ("POST", "/v2/models/tiny/infer", tensor_request(X), {"Content-Encoding": "gzip"}, 400, "Content-Encoding 'gzip'"),
    ("POST", "/v2/models/tiny/infer", tensor_request(X), {"Inference-Header-Content-Length": "x"}, 400, "bad Inference-Header-Content-Length"),
    ("POST", "/v2/models/tiny_image/infer", image_request(sample_images()), {}, 200, None),
    ("POST", "/v2/models/tiny_image/infer", image_request([b"not an image"]), {}, 400, "undecodable image"),
]


def test_every_route_and_refusal_answers_as_before(runner):
    """Each exchange: the status and JSON error the standard-library frontend gave before the switch."""
    with running(runner) as s:
        for method, path, body, headers, status, words in EXCHANGES:
            got, hdrs, answer = call(s.port, method, path, body, headers)
            assert got == status, (method, path, got, answer)
            if words is not None:
                assert words in answer["error"], (method, path, answer)
            if got == 405:
                assert hdrs["allow"] in ("GET", "POST", "GET, POST"), hdrs
        ok = call(s.port, "POST", "/v2/models/tiny/infer", tensor_request(X))[2]
        np.testing.assert_allclose(logits_of(ok), runner.run(X), atol=1e-6)
        stats = call(s.port, "GET", "/v2/models/tiny/stats")[2]["model_stats"][0]
        assert stats["inference_count"] >= 1 and stats["execution_count"] >= 1


def test_tritonclient_http_infers_with_binary_tensors(runner):
    httpclient = pytest.importorskip("tritonclient.http")
    with running(runner) as s:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{s.port}")
        try:
            assert client.is_server_ready() and client.get_model_metadata("tiny")["versions"] == ["3"]
            inp = httpclient.InferInput("images", list(X.shape), "FP32")
            inp.set_data_from_numpy(X, binary_data=True)
            out = [httpclient.InferRequestedOutput("logits", binary_data=True), httpclient.InferRequestedOutput("logits", binary_data=False, class_count=2)][:1]
            res = client.infer("tiny", [inp], outputs=out)
            np.testing.assert_allclose(res.as_numpy("logits"), runner.run(X), atol=1e-6)
            top = client.infer("tiny", [inp], outputs=[httpclient.InferRequestedOutput("logits", class_count=2)]).as_numpy("logits")
            assert top.shape == (3, 2) and all(s.decode().split(":")[2] in CLASSES for s in top[:, 0])
        finally:
            client.close()


def test_metrics_and_openapi_are_served(runner):
    with running(runner) as s:
        call(s.port, "POST", "/v2/models/tiny/infer", tensor_request(X))
        status, hdrs, text = call(s.port, "GET", "/metrics")
        text = text.decode()
        assert status == 200 and hdrs["content-type"].startswith("text/plain")
        assert metric(text, "gendd_requests_total", endpoint="infer", code="200") == 1 and metric(text, "gendd_batch_size_count", model="tiny") == 1
        from prometheus_client.parser import text_string_to_metric_families  # what a Prometheus server reads

        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert {"gendd_requests", "gendd_batch_size", "gendd_queue_depth"} <= set(families)
        status, _, doc = call(s.port, "GET", OPENAPI_PATH)
        assert status == 200 and doc["openapi"].startswith("3.1") and "'tiny'" in doc["info"]["description"]
        documented = set(doc["paths"])
        served = {r.path for r in s.http.uvicorn.config.app.app.routes}
        assert served == documented, (served ^ documented)


def test_body_limits_hold_before_and_while_reading(runner):
    with running(runner, max_body_mb=0.05, body_timeout_s=0.5) as s:
        # over max_body_mb: refused from Content-Length, before the body is read
        status, hdrs, body = call(s.port, "POST", "/v2/models/tiny/infer", b"x" * 100_000)
        assert status == 413 and "max_body_mb" in body["error"] and hdrs.get("connection") == "close"
        # chunked bodies: 411
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            assert c.recv(4096).startswith(b"HTTP/1.1 411")
        # a body that does not arrive in time: 408 within body_timeout_s, not the idle timeout
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            t0 = time.monotonic()
            c.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            answer = c.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 3.0
        # request line + headers over 64 KiB: refused, the connection closed
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
            assert c.recv(4096).split(b" ")[1] == b"431"


def test_connections_past_max_connections_get_503(runner):
    with running(runner, max_connections=4) as s:
        held = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(4)]
        try:
            time.sleep(0.2)
            status, hdrs, body = call(s.port, "GET", "/v2/health/ready")
            assert status == 503 and "max_connections" in body["error"] and hdrs["retry-after"] == "1"
        finally:
            for c in held:
                c.close()
        deadline = time.monotonic() + 5
        while call(s.port, "GET", "/v2/health/ready")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert call(s.port, "GET", "/v2/health/ready")[0] == 200


def test_two_thousand_idle_connections_do_not_delay_a_good_request(runner):
    """The event loop holds idle connections for a few bytes each: a new request still gets its answer within 1 s."""
    with running(runner, max_connections=4096, idle_timeout_s=30.0) as s:
        idle = []
        try:
            for _ in range(2000):
                idle.append(socket.create_connection(("127.0.0.1", s.port), timeout=5))
            t0 = time.monotonic()
            status, _, resp = call(s.port, "POST", "/v2/models/tiny/infer", tensor_request(X))
            took = time.monotonic() - t0
            assert status == 200 and took < 1.0, took
            np.testing.assert_allclose(logits_of(resp), runner.run(X), atol=1e-6)
        finally:
            for c in idle:
                c.close()


def test_stop_answers_what_is_in_flight_and_frees_the_port(runner):
    with running(runner) as s:
        port = s.port
        assert call(port, "POST", "/v2/models/tiny/infer", json.dumps(tensor_request(X)).encode())[0] == 200
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_keep_alive_request_is_not_held_by_delayed_acks(runner):
    """uvicorn writes a response's head and body separately: without TCP_NODELAY on the accepted
    sockets each answer waited out the client's delayed ACK (p50 48 ms for a health check)."""
    import http.client

    with running(runner) as s:
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        times = []
        for _ in range(21):
            t0 = time.perf_counter()
            c.request("GET", "/v2/health/ready")
            c.getresponse().read()
            times.append(time.perf_counter() - t0)
        c.close()
        assert sorted(times)[10] < 0.025, sorted(times)


def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(runner):
    """uvicorn arms its keep-alive timer only after a first answer; the frontend arms it on connect,
    so silent connections cannot hold every slot for ever."""
    with running(runner, max_connections=4, idle_timeout_s=0.5) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            t0 = time.monotonic()
            assert c.recv(1) == b""  # closed by the server, without an answer
            assert 0.3 < time.monotonic() - t0 < 3.0
        assert metric(call(s.port, "GET", "/metrics")[2].decode(), "gendd_requests_total", endpoint="connection", code="408") >= 1


def test_an_unparsable_request_line_is_a_json_400(runner):
    with running(runner) as s:
        reply = _raw(s.port, b"GARBAGE\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and "malformed HTTP request" in json.loads(body)["error"]
        assert call(s.port, "GET", "/v2/health/live")[0] == 200
