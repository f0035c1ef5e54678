"""The server under hostile input: connection floods, pixel bombs, deep JSON, non-finite outputs."""

from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest
from PIL import Image

from gendd_deploy.imaging import MAX_REQUEST_PIXELS
from gendd_deploy.runtime.base import Runner
from test_serve import _good, _raw, call, encode, image_request, infer, onnx_path, runner, running, server, tensor_request  # noqa: F401  (fixtures)

TIMEOUT = 30


def test_head_and_options_answer_405(server, runner):
    status, hdrs, _ = call(server.port, "HEAD", "/v2/health/ready")
    assert status == 405 and "GET" in hdrs["allow"]
    status, hdrs, _ = call(server.port, "OPTIONS", "/v2")
    assert status == 405
    _good(server.port, runner)


def test_deeply_nested_json_is_400(server, runner):
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with running(runner, max_body_mb=1.0) as s:
        status, _, resp = infer(s.port, body)
        assert status == 400 and "nests too deeply" in resp["error"]
        _good(s.port, runner)


class NaNRunner(Runner):
    name = "nan"

    def __init__(self):
        super().__init__(None)

    def run(self, images, noise=None):
        out = np.zeros((images.shape[0], 10), dtype=np.float32)
        out[:, 3] = np.nan
        return out


def test_non_finite_outputs_are_a_valid_json_error():
    with running(NaNRunner()) as s:
        status, hdrs, resp = infer(s.port, tensor_request(np.zeros((1, 1, 8, 8), dtype=np.float32)))
        assert status == 400 and "not finite" in resp["error"]  # parsed as JSON: no bare NaN


def test_request_pixel_budget(runner):
    side = 4000  # each image is under the per-image limit; together they are over the request budget
    blob = encode(Image.new("L", (side, side)), "PNG")
    n = MAX_REQUEST_PIXELS // (side * side) + 1
    with running(runner, max_body_mb=8.0) as s:
        t0 = time.perf_counter()
        status, _, resp = infer(s.port, image_request([blob] * n))
        assert status == 400 and "pixels in all" in resp["error"]
        assert time.perf_counter() - t0 < 5  # refused from the headers, before decoding
        _good(s.port, runner)


def test_unconvertible_image_mode_names_the_mode(server, runner):
    img = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8), "RGB").convert("LAB")
    blob = encode(img, "TIFF")
    status, _, resp = infer(server.port, image_request([blob]))
    assert status == 400 and "LAB" in resp["error"], resp
    _good(server.port, runner)


def test_idle_connections_cannot_starve_the_server(runner):
    with running(runner, max_connections=8, idle_timeout_s=30.0) as s:
        idle = [socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT) for _ in range(8)]
        try:
            deadline = time.monotonic() + 10
            while s.http.open_connections < 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            # the ninth connection is answered at once with 503, not left hanging
            t0 = time.perf_counter()
            reply = _raw(s.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 503") and time.perf_counter() - t0 < 5
        finally:
            for c in idle:
                c.close()
        deadline = time.monotonic() + 10
        while s.http.open_connections and time.monotonic() < deadline:
            time.sleep(0.05)
        _good(s.port, runner)  # served again once the idle sockets are gone


# ---- fuzzing the request parser --------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
_fields = st.sampled_from(["name", "datatype", "shape", "data", "parameters", "inputs", "outputs", "id", "binary_data_size", "class_count", "top_k"])
_good_body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}


def _mutate(draw_value, key, where):
    body = json.loads(json.dumps(_good_body))
    target = body if where == "top" else body["inputs"][0]
    target[key] = draw_value
    return body


_bodies = st.one_of(
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(_mutate, _json_values, _fields, st.sampled_from(["top", "input"])).map(lambda b: json.dumps(b).encode()),
    st.binary(max_size=200),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_bodies, binary_header=st.one_of(st.none(), st.integers(-5, 300)))
def test_fuzzed_requests_get_200_4xx_or_503(server, body, binary_header):
    headers = {} if binary_header is None else {"Inference-Header-Content-Length": str(binary_header)}
    status, _, _ = call(server.port, "POST", "/v2/models/tiny/infer", body, headers=headers)
    assert status == 200 or 400 <= status < 500 or status == 503


def test_server_answers_after_the_fuzzing(server, runner):
    _good(server.port, runner)


class CountingRunner(Runner):
    """Sleeps per call and counts the images it was given."""

    name = "counting"

    def __init__(self, delay_s: float):
        super().__init__(None)
        self.delay_s, self.images_run = delay_s, 0

    def run(self, images, noise=None):
        time.sleep(self.delay_s)
        self.images_run += images.shape[0]
        return np.zeros((images.shape[0], 10), dtype=np.float32)


def test_a_timed_out_request_stops_its_running_batch():
    from gendd_deploy.config import ServeConfig
    from gendd_deploy.serve.server import InferenceServer
    from test_serve import META

    slow = CountingRunner(delay_s=0.1)  # 40 images in chunks of 2: 20 calls, 2 s if run to the end
    cfg = ServeConfig(host="127.0.0.1", port=0, grpc_port=-1, max_batch=2, max_delay_ms=0.0)
    srv = InferenceServer(slow, META, cfg, request_timeout_s=0.35, log=lambda msg: None).start()
    try:
        status, _, resp = infer(srv.port, tensor_request(np.zeros((40, 1, 8, 8), dtype=np.float32)))
        assert status == 503 and "timed out" in resp["error"]
        time.sleep(1.0)  # long enough for the rest of the batch to run, had it not been stopped
        assert slow.images_run <= 12, slow.images_run  # stopped a chunk or two after the timeout
        assert "gendd_abandoned_images_total" in call(srv.port, "GET", "/metrics")[2].decode()
    finally:
        srv.stop(drain_timeout_s=5)


def test_a_5000_digit_version_is_404_not_500(server, runner):
    status, _, resp = call(server.port, "GET", "/v2/models/tiny/versions/" + "9" * 5000)
    assert status == 404 and "unknown model" in resp["error"]
    _good(server.port, runner)


@pytest.mark.parametrize("target", [b"http://[::1", b"http://", b"//x", b"*"])
def test_every_malformed_request_target_is_answered(server, runner, target):
    reply = _raw(server.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 4"), reply[:80]
    _good(server.port, runner)


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_slow_drip_clients_cannot_hold_every_slot(runner, phase):
    """Each of max_connections clients sends a byte every 0.5 s (under the idle timeout, so a
    per-read timeout never fires); the header / body deadline frees their slots and good
    requests are answered (was: 11 of 11 good requests got 503 for 45 s)."""
    import threading

    with running(runner, max_connections=6, idle_timeout_s=30.0, header_timeout_s=1.5, body_timeout_s=1.5) as s:
        stop = threading.Event()
        start = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" if phase == "headers" else b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"

        def drip():
            try:
                with socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT) as c:
                    c.sendall(start)
                    while not stop.wait(0.5):
                        c.sendall(b"X")
            except OSError:
                pass  # shut down by the server: what the deadline is for

        threads = [threading.Thread(target=drip, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            assert _raw(s.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 503")  # every slot held
            time.sleep(2.5)  # past the deadline
            _good(s.port, runner)
        finally:
            stop.set()
