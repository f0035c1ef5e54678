"""The ASGI REST frontend (`[serve] http_server = "asgi"`: Starlette on uvicorn) answers as the
stdlib frontend does, and holds its limits on uvicorn's own knobs."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

pytest.importorskip("uvicorn", reason="the ASGI frontend needs uvicorn and starlette (pip install 'gendd-deploy[serve]')")

from gendd_deploy.serve.openapi import PATH as OPENAPI_PATH  # noqa: E402
from test_serve import CLASSES, META, call, image_request, logits_of, metric, onnx_path, runner, running, sample_images, tensor_request  # noqa: E402,F401  (fixtures)

X = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)

# (method, path, body, headers): good requests and every kind of refusal the router and the infer path give
EXCHANGES = [
    ("GET", "/v2", None, {}),
    ("GET", "/v2/health/live", None, {}),
    ("GET", "/v2/health/ready", None, {}),
    ("GET", "/v2/models/tiny", None, {}),
    ("GET", "/v2/models/tiny/versions/3", None, {}),
    ("GET", "/v2/models/tiny/versions/v003/ready", None, {}),
    ("GET", "/v2/models/tiny/config", None, {}),
    ("GET", "/v2/models/tiny_image", None, {}),
    ("GET", "/v2/models/nope", None, {}),
    ("GET", "/v2/models/tiny/versions/9", None, {}),
    ("GET", "/nope", None, {}),
    ("POST", "/v2/health/ready", b"{}", {}),
    ("GET", "/v2/models/tiny/infer", None, {}),
    ("HEAD", "/v2/health/ready", None, {}),
    ("OPTIONS", "/v2", None, {}),
    ("POST", "/v2/models/tiny/infer", tensor_request(X), {}),
    ("POST", "/v2/models/tiny/versions/3/infer", tensor_request(X, outputs=[{"name": "logits", "parameters": {"classification": 3}}]), {}),
    ("POST", "/v2/models/tiny/infer", tensor_request(X, parameters={"top_k": 2}), {}),
    ("POST", "/v2/models/tiny/infer", tensor_request(X[:, :, :4]), {}),  # wrong shape
    ("POST", "/v2/models/tiny/infer", b"{not json", {}),
    ("POST", "/v2/models/tiny/infer", {"inputs": []}, {}),
    ("POST", "/v2/models/tiny/infer", tensor_request(X), {"Content-Encoding": "gzip"}),
    ("POST", "/v2/models/tiny/infer", tensor_request(X), {"Inference-Header-Content-Length": "x"}),
    ("POST", "/v2/models/tiny_image/infer", image_request(sample_images()), {}),
    ("POST", "/v2/models/tiny_image/infer", image_request([b"not an image"]), {}),
]


def test_same_answers_as_the_stdlib_frontend(runner):
    """Every exchange: the same status and the same JSON (or bytes) from both frontends."""
    with running(runner) as old, running(runner, http_server="asgi") as new:
        for method, path, body, headers in EXCHANGES:
            a, b = call(old.port, method, path, body, headers), call(new.port, method, path, body, headers)
            assert (a[0], a[2]) == (b[0], b[2]), (method, path, a, b)
            if a[0] == 405:
                assert a[1]["allow"] == b[1]["allow"]
        ok = call(new.port, "POST", "/v2/models/tiny/infer", tensor_request(X))[2]
        np.testing.assert_allclose(logits_of(ok), runner.run(X), atol=1e-6)
        stats = call(new.port, "GET", "/v2/models/tiny/stats")[2]["model_stats"][0]
        assert stats["inference_count"] >= 1 and stats["execution_count"] >= 1


def test_tritonclient_http_infers_with_binary_tensors(runner):
    httpclient = pytest.importorskip("tritonclient.http")
    with running(runner, http_server="asgi") as s:
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
    with running(runner, http_server="asgi") as s:
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
    with running(runner, http_server="asgi", max_body_mb=0.05, body_timeout_s=0.5) as s:
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
    with running(runner, http_server="asgi", max_connections=4) as s:
        held = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(4)]
        try:
            time.sleep(0.2)
            status, _, _ = call(s.port, "GET", "/v2/health/ready")
            assert status == 503
        finally:
            for c in held:
                c.close()
        deadline = time.monotonic() + 5
        while call(s.port, "GET", "/v2/health/ready")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert call(s.port, "GET", "/v2/health/ready")[0] == 200


def test_two_thousand_idle_connections_do_not_delay_a_good_request(runner):
    """The event loop holds idle connections for a few bytes each: a new request still gets its answer within 1 s."""
    with running(runner, http_server="asgi", max_connections=4096, idle_timeout_s=30.0) as s:
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
    with running(runner, http_server="asgi") as s:
        port = s.port
        assert call(port, "POST", "/v2/models/tiny/infer", json.dumps(tensor_request(X)).encode())[0] == 200
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_keep_alive_request_is_not_held_by_delayed_acks(runner):
    """uvicorn writes a response's head and body separately: without TCP_NODELAY on the accepted
    sockets each answer waited out the client's delayed ACK (p50 48 ms for a health check)."""
    import http.client

    with running(runner, http_server="asgi") as s:
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        times = []
        for _ in range(21):
            t0 = time.perf_counter()
            c.request("GET", "/v2/health/ready")
            c.getresponse().read()
            times.append(time.perf_counter() - t0)
        c.close()
        assert sorted(times)[10] < 0.025, sorted(times)
