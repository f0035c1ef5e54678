"""The inference server: the real HTTP server on a free 127.0.0.1 port, spoken to with http.client
(and tritonclient.http where installed), over a tiny ONNX conv net run by onnxruntime."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gendd_deploy.config import ServeConfig
from gendd_deploy.imaging import decode_image, make_spec, preprocess_image
from gendd_deploy.runtime.base import Runner
from gendd_deploy.serve import InferenceServer

REPO = Path(__file__).resolve().parents[1]
SPEC = make_spec(1, 8, [0.5], [0.25], "torch")
CLASSES = [f"digit_{i}" for i in range(10)]
TIMEOUT = 20.0  # seconds for any single HTTP exchange


# ---- the model ---------------------------------------------------------------------------------


def export_tiny_onnx(path: Path) -> Path:
    """images (B, 1, 8, 8) float32 -> logits (B, 10), dynamic batch."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript exporter: 20x faster than dynamo for this
            torch.onnx.export(net, (x,), str(path), input_names=["images"], output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        except Exception:
            torch.onnx.export(net, (x,), str(path), input_names=["images"], output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True)
    return path


def ort_runner(path: Path) -> Runner:
    from gendd_deploy.runtime.ort import OrtRunner

    return OrtRunner(path, providers=["CPUExecutionProvider"], intra_op_threads=1)


class SlowRunner(Runner):
    """Wraps a runner: once armed (after the server's warm-up), sleeps `delay` per call and records batch sizes."""

    name = "slow"

    def __init__(self, inner: Runner, delay: float, armed: bool = False):
        super().__init__(inner.noise_shape_tail)
        self.inner, self.delay, self.batches, self.armed = inner, delay, [], armed

    def run(self, images, noise=None):
        if self.armed:
            self.batches.append(images.shape[0])
            time.sleep(self.delay)
        return self.inner.run(images, noise)


class NoiseRunner(Runner):
    """A sampler-like model: logits depend on the image and on its noise."""

    name = "noise"

    def __init__(self):
        super().__init__((2, 3))

    def run(self, images, noise=None):
        assert noise is not None and noise.shape == (images.shape[0], 2, 3)
        base = images.reshape(images.shape[0], -1)[:, :10]
        return (base + noise.reshape(noise.shape[0], -1).sum(1, keepdims=True)).astype(np.float32)


class GatedRunner(Runner):
    """Its first call (the warm-up) waits for `gate`: the server is live but not ready meanwhile."""

    name = "gated"

    def __init__(self, inner: Runner):
        super().__init__(None)
        self.inner, self.gate = inner, threading.Event()

    def run(self, images, noise=None):
        assert self.gate.wait(TIMEOUT)
        return self.inner.run(images, noise)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    return export_tiny_onnx(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def runner(onnx_path) -> Runner:
    return ort_runner(onnx_path)


META = {"name": "tiny", "version": "3", "preprocess": SPEC, "class_names": CLASSES}


@contextmanager
def running(runner: Runner, meta: dict | None = None, **cfg):
    cfg = ServeConfig(**{"host": "127.0.0.1", "port": 0, "grpc_port": -1, "max_batch": 8, "max_delay_ms": 2.0, **cfg})
    server = InferenceServer(runner, meta or META, cfg, request_timeout_s=TIMEOUT, log=lambda msg: None).start()
    if isinstance(runner, SlowRunner):
        runner.armed = True
    try:
        yield server
    finally:
        server.stop(drain_timeout_s=TIMEOUT)


@pytest.fixture(scope="module")
def server(runner):
    """One server for the tests that do not change its settings (max_body_mb small for the 413 test)."""
    with running(runner, max_body_mb=0.05) as s:
        yield s


# ---- an HTTP client ----------------------------------------------------------------------------


def call(port: int, method: str, path: str, body=None, headers: dict | None = None, conn: http.client.HTTPConnection | None = None):
    """(status, headers dict, parsed JSON or raw bytes)."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
    finally:
        if conn is None:
            c.close()
    if hdrs.get("content-type", "").startswith("application/json"):
        data = json.loads(data)
    return r.status, hdrs, data


def infer(port: int, body, **kw):
    """POST to the model that takes the request's input: 'tiny' (images) or 'tiny_image' (image_bytes)."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    encoded = isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict) and inputs[0].get("name") == "image_bytes"
    return call(port, "POST", f"/v2/models/{'tiny_image' if encoded else 'tiny'}/infer", body, **kw)


def tensor_request(x: np.ndarray, nested: bool = False, **extra) -> dict:
    data = x.tolist() if nested else x.ravel().tolist()
    return {"inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": data}], **extra}


def image_request(blobs: list[bytes], **extra) -> dict:
    data = [base64.b64encode(b).decode() for b in blobs]
    return {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [len(blobs)], "data": data}], **extra}


def logits_of(resp: dict) -> np.ndarray:
    out = next(o for o in resp["outputs"] if o["name"] == "logits")
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def sample_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    gray = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L")
    rgb_big = Image.fromarray(rng.integers(0, 256, (20, 13, 3), dtype=np.uint8), "RGB")  # converted, resized, cropped
    return [encode(gray, "PNG"), encode(gray, "JPEG"), encode(rgb_big, "PNG")]


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples `name` whose labels include `labels`, read as Prometheus reads the text."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(cond, timeout: float = TIMEOUT) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


# ---- health, metadata --------------------------------------------------------------------------


def test_health_and_metadata(server):
    p = server.port
    assert call(p, "GET", "/v2/health/live")[::2] == (200, {"live": True})
    assert call(p, "GET", "/v2/health/ready")[::2] == (200, {"ready": True})
    status, _, meta = call(p, "GET", "/v2")
    assert status == 200 and meta["name"] == "gendd" and "binary_tensor_data" in meta["extensions"]
    for path in ("/v2/models/tiny", "/v2/models/tiny/versions/3"):
        status, _, m = call(p, "GET", path)
        assert status == 200
        assert m["name"] == "tiny" and m["versions"] == ["3"]
        # exactly the inputs and outputs a request may use, each usable as listed
        assert m["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert m["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        assert m["parameters"]["class_names"] == CLASSES
    status, _, m = call(p, "GET", "/v2/models/tiny_image")  # the encoded-image sibling
    assert status == 200 and m["inputs"] == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1, 1]}]
    assert m["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert call(p, "GET", "/v2/models/tiny/ready")[0] == 200
    assert call(p, "GET", "/v2/models/tiny/versions/3/ready")[0] == 200


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/v2/models/other", 404),
        ("GET", "/v2/models/other/ready", 404),
        ("POST", "/v2/models/other/infer", 404),
        ("GET", "/v2/models/tiny/versions/7", 404),
        ("GET", "/nope", 404),
        ("GET", "/v2/models/tiny/infer", 405),
        ("POST", "/v2/health/ready", 405),
        ("DELETE", "/v2/models/tiny", 405),
    ],
)
def test_unknown_model_path_or_method(server, method, path, status):
    got, _, body = call(server.port, method, path, body=b"{}" if method == "POST" else None)
    assert got == status and "error" in body
    if "other" in path:
        assert "unknown model 'other'" in body["error"] and "'tiny'" in body["error"]


def test_live_but_not_ready_until_warmed_up(runner):
    gated = GatedRunner(runner)
    cfg = ServeConfig(host="127.0.0.1", port=0, grpc_port=-1)
    srv = InferenceServer(gated, META, cfg, log=lambda m: None)
    starter = threading.Thread(target=srv.start, daemon=True)
    starter.start()
    try:
        assert wait_for(lambda: srv.running)
        assert call(srv.port, "GET", "/v2/health/live")[0] == 200
        assert call(srv.port, "GET", "/v2/health/ready")[0] == 503
        assert call(srv.port, "GET", "/v2/models/tiny/ready")[0] == 503
        status, _, body = infer(srv.port, tensor_request(np.zeros((1, 1, 8, 8), np.float32)))
        assert status == 503 and "warming up" in body["error"]
        gated.gate.set()
        starter.join(TIMEOUT)
        assert call(srv.port, "GET", "/v2/health/ready")[0] == 200
        assert infer(srv.port, tensor_request(np.zeros((1, 1, 8, 8), np.float32)))[0] == 200
    finally:
        gated.gate.set()
        starter.join(TIMEOUT)
        srv.stop(TIMEOUT)


# ---- inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_tensor_infer_equals_runner(server, runner, nested):
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    status, _, resp = infer(server.port, tensor_request(x, nested=nested, id="req-42"))
    assert status == 200, resp
    assert resp["id"] == "req-42" and resp["model_name"] == "tiny" and resp["model_version"] == "3"
    out = next(o for o in resp["outputs"] if o["name"] == "logits")
    assert out["datatype"] == "FP32" and out["shape"] == [3, 10]
    np.testing.assert_allclose(logits_of(resp), runner.run(x), rtol=0, atol=1e-6)
    assert [o["name"] for o in resp["outputs"]] == ["logits"]  # top_k only on request


def test_image_infer_equals_preprocess_then_runner(server, runner):
    blobs = sample_images()
    status, _, resp = infer(server.port, image_request(blobs, id="img"))
    assert status == 200, resp
    x = np.stack([preprocess_image(decode_image(b), SPEC) for b in blobs])
    np.testing.assert_allclose(logits_of(resp), runner.run(x), rtol=0, atol=1e-6)


def test_binary_tensor_extension(server, runner):
    """Triton's binary tensors, in and out: JSON header, then raw bytes."""
    x = np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(np.float32)
    head = json.dumps(
        {
            "inputs": [{"name": "images", "datatype": "FP32", "shape": [2, 1, 8, 8], "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, hdrs, body = infer(server.port, head + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})
    assert status == 200
    n = int(hdrs["inference-header-content-length"])
    meta = json.loads(body[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    got = np.frombuffer(body[n:], dtype="<f4").reshape(2, 10)
    np.testing.assert_allclose(got, runner.run(x), rtol=0, atol=1e-6)
    # encoded images as binary BYTES: uint32 length + bytes per element
    blobs = sample_images()[:2]
    raw = b"".join(struct.pack("<I", len(b)) + b for b in blobs)
    head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}]}).encode()
    status, _, resp = call(server.port, "POST", "/v2/models/tiny_image/infer", head + raw, headers={"Inference-Header-Content-Length": str(len(head))})
    assert status == 200, resp
    xi = np.stack([preprocess_image(decode_image(b), SPEC) for b in blobs])
    np.testing.assert_allclose(logits_of(resp), runner.run(xi), rtol=0, atol=1e-6)


def _parse_classes(strings) -> tuple[np.ndarray, np.ndarray, list]:
    parts = [s.split(":", 2) for s in strings]
    return np.array([float(p[0]) for p in parts]), np.array([int(p[1]) for p in parts]), [p[2] for p in parts]


@pytest.mark.parametrize("where", ["request", "output"])
def test_top_k(server, runner, where):
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
    if where == "request":
        body = tensor_request(x, parameters={"top_k": 3})
    else:
        body = tensor_request(x, outputs=[{"name": "top_k", "parameters": {"top_k": 3}}])
    status, _, resp = infer(server.port, body)
    assert status == 200, resp
    names = [o["name"] for o in resp["outputs"]]
    assert names == (["logits", "top_k"] if where == "request" else ["top_k"])
    top = next(o for o in resp["outputs"] if o["name"] == "top_k")
    assert top["datatype"] == "BYTES" and top["shape"] == [2, 3]
    logits = runner.run(x).astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for i in range(2):
        scores, idx, labels = _parse_classes(top["data"][i * 3 : (i + 1) * 3])
        np.testing.assert_array_equal(idx, np.argsort(-probs[i])[:3])
        np.testing.assert_allclose(scores, probs[i, idx], atol=1e-6)
        assert labels == [CLASSES[j] for j in idx] and np.all(np.diff(scores) <= 0)


def test_triton_classification_extension(server, runner):
    """`class_count` in tritonclient: the logits output as 'logit:index:label' strings."""
    x = np.random.default_rng(4).standard_normal((1, 1, 8, 8)).astype(np.float32)
    status, _, resp = infer(server.port, tensor_request(x, outputs=[{"name": "logits", "parameters": {"classification": 2}}]))
    assert status == 200, resp
    out = resp["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 2]
    scores, idx, _ = _parse_classes(out["data"])
    logits = runner.run(x)[0]
    np.testing.assert_array_equal(idx, np.argsort(-logits)[:2])
    np.testing.assert_allclose(scores, logits[idx], atol=1e-6)


def _good(port: int, runner: Runner) -> None:
    x = np.ones((1, 1, 8, 8), np.float32)
    status, _, resp = infer(port, tensor_request(x))
    assert status == 200, resp
    np.testing.assert_allclose(logits_of(resp), runner.run(x), atol=1e-6)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


PNG = sample_images()[0]
BAD_REQUESTS = [
    ("malformed JSON", b'{"inputs": [', 400, "malformed JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("no inputs", {"id": "x"}, 400, "missing input"),
    ("empty inputs", {"inputs": []}, 400, "missing input"),
    ("unknown input", {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}, 400, "unknown input 'pixels'"),
    ("two inputs", {"inputs": [tensor_request(np.zeros((1, 1, 8, 8)))["inputs"][0], image_request([PNG])["inputs"][0]]}, 400, "goes to model 'tiny_image'"),
    ("wrong shape", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 7], "data": [0.0] * 56}]}, 400, "shape [1, 1, 8, 7]"),
    ("wrong rank", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [64], "data": [0.0] * 64}]}, 400, "expected [-1, 1, 8, 8]"),
    ("zero batch", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [0, 1, 8, 8], "data": []}]}, 400, "N >= 1"),
    ("wrong dtype", {"inputs": [{"name": "images", "datatype": "FP64", "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}, 400, "datatype 'FP64'"),
    ("count mismatch", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 63}]}, 400, "63 values"),
    ("ragged data", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [[0.0] * 32, [0.0] * 31]}]}, 400, "regular array"),
    ("strings as FP32", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": ["a"] * 64}]}, 400, "must be numbers"),
    ("no data", {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8]}]}, 400, "neither 'data'"),
    ("image not base64", {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}, 400, "not valid base64"),
    ("undecodable image", image_request([b"this is no image"]), 400, "undecodable image"),
    ("truncated image", image_request([PNG[: len(PNG) // 2]]), 400, "undecodable image"),
    ("image as FP32", {"inputs": [{"name": "image_bytes", "datatype": "FP32", "shape": [1], "data": [_b64(PNG)]}]}, 400, "BYTES"),
    ("image count", {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2], "data": [_b64(PNG)]}]}, 400, "needs 2"),
    ("unknown output", tensor_request(np.zeros((1, 1, 8, 8)), outputs=[{"name": "probs"}]), 400, "unknown output 'probs'"),
    ("top_k too big", tensor_request(np.zeros((1, 1, 8, 8)), parameters={"top_k": 11}), 400, "between 1 and 10"),
    ("top_k not int", tensor_request(np.zeros((1, 1, 8, 8)), parameters={"top_k": "3"}), 400, "must be an integer"),
    ("top_k output without k", tensor_request(np.zeros((1, 1, 8, 8)), outputs=[{"name": "top_k"}]), 400, "needs k"),
    ("id not a string", tensor_request(np.zeros((1, 1, 8, 8)), id=5), 400, "'id' must be a string"),
    ("seed negative", tensor_request(np.zeros((1, 1, 8, 8)), parameters={"seed": -1}), 400, "seed"),
]


@pytest.mark.parametrize("case, body, status, message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_refused_and_server_keeps_serving(server, runner, case, body, status, message):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        got, hdrs, resp = infer(server.port, body, conn=conn)
        assert got == status and message in resp["error"], resp
        assert hdrs["content-type"] == "application/json"
        _good(server.port, runner)
        # the same keep-alive connection is still usable after a 400
        x = np.zeros((1, 1, 8, 8), np.float32)
        assert infer(server.port, tensor_request(x), conn=conn)[0] == 200
    finally:
        conn.close()


def test_binary_extension_errors(server, runner):
    x = np.zeros((1, 1, 8, 8), np.float32)
    head = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "parameters": {"binary_data_size": 256}}]}).encode()
    cases = [
        (head + x.tobytes(), {"Inference-Header-Content-Length": "abc"}, "Inference-Header-Content-Length"),
        (head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head) + 10_000)}, "does not fit"),
        (head + x.tobytes()[:100], {"Inference-Header-Content-Length": str(len(head))}, "binary bytes follow"),
        (head + x.tobytes() + b"xx", {"Inference-Header-Content-Length": str(len(head))}, "belong to no input"),
        (tensor_request(x), {"Content-Encoding": "gzip"}, "Content-Encoding"),
    ]
    for body, headers, message in cases:
        status, _, resp = infer(server.port, body, headers=headers)
        assert status == 400 and message in resp["error"], resp
    _good(server.port, runner)


def test_oversized_body_refused_before_reading(server, runner):
    limit = int(0.05 * 1024 * 1024)
    status, hdrs, resp = infer(server.port, b"x" * (limit + 1))
    assert status == 413 and f"limit of {limit} bytes" in resp["error"] and hdrs.get("connection") == "close"
    _good(server.port, runner)


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        chunks = []
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
    return b"".join(chunks)


def test_no_content_length_and_garbage_request_line(server, runner):
    reply = _raw(server.port, b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length" in reply
    reply = _raw(server.port, b"\x00\x01garbage\r\n\r\n")
    assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0]
    _good(server.port, runner)


# ---- batching, queue, metrics, noise -----------------------------------------------------------


def _blast(port: int, xs: list[np.ndarray], workers: int, body_of=tensor_request) -> list[tuple[int, dict]]:
    def one(x):
        status, _, resp = infer(port, body_of(x))
        return status, resp

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, xs, timeout=60))


def test_batching_batches_and_routes_rows_back(runner):
    slow = SlowRunner(runner, delay=0.03)
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1 + i % 2, 1, 8, 8)).astype(np.float32) for i in range(48)]
    with running(slow, max_batch=16, max_delay_ms=20.0) as srv:
        results = _blast(srv.port, xs, workers=16)
        text = call(srv.port, "GET", "/metrics")[2].decode()
    for x, (status, resp) in zip(xs, results):
        assert status == 200
        np.testing.assert_allclose(logits_of(resp), runner.run(x), rtol=0, atol=1e-5)  # each client gets its own rows
    assert max(slow.batches) > 2 and max(slow.batches) <= 16 and sum(slow.batches) == sum(x.shape[0] for x in xs)
    singles = metric(text, "gendd_batch_size_bucket", model="tiny", le="1.0")
    assert metric(text, "gendd_batch_size_count") - singles > 0  # the histogram shows batches > 1


@pytest.mark.parametrize("settings", [{"max_batch": 1, "max_delay_ms": 5.0}, {"max_batch": 8, "max_delay_ms": 0.0}])
def test_batching_off(runner, settings):
    slow = SlowRunner(runner, delay=0.01)
    xs = [np.full((1, 1, 8, 8), i, np.float32) for i in range(12)]
    with running(slow, **settings) as srv:
        assert all(s == 200 for s, _ in _blast(srv.port, xs, workers=6))
    assert slow.batches == [1] * 12


def test_request_larger_than_max_batch_runs_in_chunks(runner):
    slow = SlowRunner(runner, delay=0.0)
    x = np.random.default_rng(6).standard_normal((10, 1, 8, 8)).astype(np.float32)
    with running(slow, max_batch=4) as srv:
        status, _, resp = infer(srv.port, tensor_request(x))
    assert status == 200 and slow.batches == [4, 4, 2]
    np.testing.assert_allclose(logits_of(resp), runner.run(x), atol=1e-5)


def test_queue_full_answers_503_and_keeps_serving(runner):
    slow = SlowRunner(runner, delay=0.15)
    xs = [np.zeros((1, 1, 8, 8), np.float32)] * 12
    with running(slow, max_batch=1, queue_size=2) as srv:
        results = _blast(srv.port, xs, workers=12)
        codes = sorted(s for s, _ in results)
        assert set(codes) == {200, 503} and codes.count(503) >= 3
        assert all("queue full" in r["error"] for s, r in results if s == 503)
        slow.delay = 0.0
        _good(srv.port, runner)
        text = call(srv.port, "GET", "/metrics")[2].decode()
    assert metric(text, "gendd_requests_total", endpoint="infer", code="503") == codes.count(503)
    assert metric(text, "gendd_infer_requests_total", model="tiny", version="3", code="503") == codes.count(503)


def test_metrics_move(server, runner):
    before = call(server.port, "GET", "/metrics")[2].decode()
    _good(server.port, runner)
    infer(server.port, b"not json")
    status, hdrs, text = call(server.port, "GET", "/metrics")
    text = text.decode()
    assert status == 200 and hdrs["content-type"].startswith("text/plain; version=0.0.4")
    from prometheus_client.parser import text_string_to_metric_families

    kinds = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in [("gendd_requests", "counter"), ("gendd_request_duration_seconds", "histogram"), ("gendd_batch_size", "histogram"),
                       ("gendd_queue_duration_seconds", "histogram"), ("gendd_batch_duration_seconds", "histogram"), ("gendd_queue_depth", "gauge")]:
        assert kinds.get(name) == kind, (name, kinds.get(name))
    ok, bad = {"endpoint": "infer", "code": "200"}, {"endpoint": "infer", "code": "400"}
    assert metric(text, "gendd_requests_total", **ok) == metric(before, "gendd_requests_total", **ok) + 1
    assert metric(text, "gendd_requests_total", **bad) == metric(before, "gendd_requests_total", **bad) + 1
    model = {"model": "tiny", "version": "3"}  # per model: latency, queue time vs compute time, batch sizes
    assert metric(text, "gendd_request_duration_seconds_count", **model) == metric(before, "gendd_request_duration_seconds_count", **model) + 2
    assert metric(text, "gendd_batch_size_count", **model) == metric(before, "gendd_batch_size_count", **model) + 1
    assert metric(text, "gendd_queue_duration_seconds_count", **model) == metric(before, "gendd_queue_duration_seconds_count", **model) + 1
    assert metric(text, "gendd_queue_depth", **model) == 0
    assert metric(text, "gendd_request_duration_seconds_bucket", le="+Inf", **model) >= 2


def test_each_model_has_its_own_series(runner):
    """Two models behind one server: batches, queue and request counts are labelled by model."""
    other = {**META, "name": "other", "version": "1"}
    x = np.zeros((2, 1, 8, 8), np.float32)
    cfg = ServeConfig(host="127.0.0.1", port=0, grpc_port=-1)
    srv = InferenceServer(runner, META, cfg, more=[(runner, other)], log=lambda m: None).start()
    try:
        assert infer(srv.port, tensor_request(x))[0] == 200
        for _ in range(2):
            assert call(srv.port, "POST", "/v2/models/other/infer", tensor_request(x))[0] == 200
        text = call(srv.port, "GET", "/metrics")[2].decode()
    finally:
        srv.stop(drain_timeout_s=TIMEOUT)
    assert metric(text, "gendd_images_total", model="tiny", version="3") == 2
    assert metric(text, "gendd_images_total", model="other", version="1") == 4
    assert metric(text, "gendd_infer_requests_total", model="other", code="200") == 2


def test_noise_comes_from_the_request_seed(runner):
    noisy = NoiseRunner()
    meta = {"name": "tiny", "input_shape": (1, 8, 8)}
    x = np.random.default_rng(7).standard_normal((2, 1, 8, 8)).astype(np.float32)
    with running(noisy, meta, max_batch=8, max_delay_ms=20.0) as srv:
        assert call(srv.port, "GET", "/v2/models/tiny")[2]["parameters"]["needs_noise"] is True
        status, _, r7 = infer(srv.port, tensor_request(x, parameters={"seed": 7}))
        assert status == 200 and r7["parameters"] == {"seed": 7}
        np.testing.assert_allclose(logits_of(r7), noisy.run(x, noisy.noise(2, 7)), atol=1e-6)
        assert infer(srv.port, tensor_request(x))[2]["parameters"] == {"seed": 0}  # documented default
        # batched with others, a request still gets exactly its own seed's noise
        results = _blast(srv.port, [x] * 12, workers=12, body_of=lambda a: tensor_request(a, parameters={"seed": 7}))
        for status, resp in results:
            assert status == 200
            np.testing.assert_allclose(logits_of(resp), logits_of(r7), atol=1e-6)
        assert not np.allclose(logits_of(infer(srv.port, tensor_request(x, parameters={"seed": 8}))[2]), logits_of(r7))
        # no preprocessing spec: no encoded-image model, and the tensor model refuses them by name
        assert call(srv.port, "GET", "/v2/models/tiny_image")[0] == 404
        status, _, resp = call(srv.port, "POST", "/v2/models/tiny/infer", image_request([PNG]))
        assert status == 400 and "unknown input 'image_bytes'" in resp["error"]


def test_runner_failure_is_500_and_server_keeps_serving(runner):
    class Flaky(Runner):
        name = "flaky"
        fail = False

        def run(self, images, noise=None):
            if self.fail:
                raise RuntimeError("device lost")
            return runner.run(images)

    flaky = Flaky()
    with running(flaky) as srv:
        flaky.fail = True
        status, _, resp = infer(srv.port, tensor_request(np.zeros((1, 1, 8, 8), np.float32)))
        assert status == 500 and "device lost" in resp["error"]
        flaky.fail = False
        _good(srv.port, runner)


# ---- shutdown ----------------------------------------------------------------------------------


def test_stop_drains_queued_requests(runner):
    slow = SlowRunner(runner, delay=0.2)
    xs = [np.full((1, 1, 8, 8), i, np.float32) for i in range(6)]
    srv = InferenceServer(slow, META, ServeConfig(host="127.0.0.1", port=0, grpc_port=-1, max_batch=1), log=lambda m: None).start()
    slow.armed = True
    port = srv.port
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(infer, port, tensor_request(x)) for x in xs]
        assert wait_for(lambda: srv.metrics.sample("gendd_queued_requests_total", model="tiny", version="3") == 6)  # all in; at most one has run
        assert srv.batcher.pending() >= 2  # something left to drain
        assert srv.stop(drain_timeout_s=TIMEOUT)
        results = [f.result(timeout=TIMEOUT) for f in futures]
    for x, (status, _, resp) in zip(xs, results):
        assert status == 200
        np.testing.assert_allclose(logits_of(resp), runner.run(x), atol=1e-6)
    with pytest.raises(OSError):
        call(port, "GET", "/v2/health/live")


SERVE_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from test_serve import ort_runner, SlowRunner, META
from gendd_deploy.config import ServeConfig
from gendd_deploy.serve import serve
from pathlib import Path
serve(SlowRunner(ort_runner(Path({onnx!r})), 0.2, armed=True), META, ServeConfig(host="127.0.0.1", port=0, grpc_port=-1, max_batch=1))
print("serve returned", flush=True)
"""


@contextmanager
def child_server(cmd: list[str], env: dict, pattern: str = r"on http://127\.0\.0\.1:(\d+)"):
    """A server in a child process: yields (process, its HTTP port, the stderr lines read so far).
    On leaving, a child still running is killed, and the rest of its stderr joins the same list."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr] + [lines.put(None)], daemon=True).start()
    seen: list[str] = []
    try:
        port, end = None, time.monotonic() + 60
        while port is None and time.monotonic() < end:
            try:
                line = lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if m := re.search(pattern, line):
                port = int(m.group(1))
        assert port, "".join(seen)
        yield proc, port, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        while (line := lines.get(timeout=5)) is not None:
            seen.append(line)


def test_sigterm_drains_then_exits_zero(onnx_path, runner, tmp_path):
    script = tmp_path / "serve_child.py"
    script.write_text(SERVE_SCRIPT.format(tests=str(REPO / "tests"), onnx=str(onnx_path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # keep the caller's path
    with child_server([sys.executable, str(script)], env) as (proc, port, seen):
        xs = [np.full((1, 1, 8, 8), i, np.float32) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(infer, port, tensor_request(x)) for x in xs]
            queued = lambda: metric(call(port, "GET", "/metrics")[2].decode(), "gendd_queued_requests_total")  # noqa: E731
            assert wait_for(lambda: queued() == 4)  # all in; at most one has run (0.2 s each)
            proc.send_signal(signal.SIGTERM)
            results = [f.result(timeout=TIMEOUT) for f in futures]
        proc.wait(TIMEOUT)
        out = proc.stdout.read()
    err = "".join(seen)
    assert proc.returncode == 0, err
    assert "serve returned" in out and "draining" in err
    for x, (status, _, resp) in zip(xs, results):
        assert status == 200
        np.testing.assert_allclose(logits_of(resp), runner.run(x), atol=1e-6)


# ---- a stock Triton client ---------------------------------------------------------------------


def test_tritonclient_metadata_and_infer(server, runner):
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=TIMEOUT)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        meta = client.get_model_metadata("tiny")
        assert meta["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
        x = np.random.default_rng(8).standard_normal((2, 1, 8, 8)).astype(np.float32)
        inp = httpclient.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # binary tensor extension by default
        result = client.infer("tiny", [inp], request_id="tc-1")
        assert result.get_response()["id"] == "tc-1"
        np.testing.assert_allclose(result.as_numpy("logits"), runner.run(x), atol=1e-6)
        # encoded images as BYTES, and the classification extension (class_count)
        blobs = sample_images()
        img = httpclient.InferInput("image_bytes", [len(blobs)], "BYTES")
        img.set_data_from_numpy(np.array(blobs, dtype=np.object_))
        out = httpclient.InferRequestedOutput("logits", class_count=3)
        result = client.infer("tiny_image", [img], outputs=[out])
        top = result.as_numpy("logits")
        assert top.shape == (3, 3)
        xi = np.stack([preprocess_image(decode_image(b), SPEC) for b in blobs])
        assert [int(s.decode().split(":")[1]) for s in top[:, 0]] == list(runner.run(xi).argmax(1))
    finally:
        client.close()


# ---- from the artifact store -------------------------------------------------------------------


def _publish_onnx(ctx, onnx_path: Path, stage: str = "onnx"):
    with ctx.store.draft(ctx.pipeline, stage, "f" * 64 if stage == "onnx" else "e" * 64, {}, []) as d:
        d.path("model.onnx").write_bytes(onnx_path.read_bytes())
        d.info.update(
            {
                "io": {"inputs": [{"name": "images", "shape": ["batch", 1, 8, 8]}], "outputs": [{"name": "logits", "shape": ["batch", 10]}]},
                "needs_noise": False,
                "noise_shape_tail": None,
                "preprocess": SPEC,
                "class_names": CLASSES,
            }
        )
        return d.publish()


def test_load_artifact_model_errors_name_the_fix(tiny_context, onnx_path):
    from gendd_deploy.errors import ArtifactError, UsageError
    from gendd_deploy.serve import load_artifact_model

    ctx = tiny_context()
    with pytest.raises(ArtifactError, match="no onnx artifact for pipeline 'tiny'.*run 'gendd export"):
        load_artifact_model(ctx, "onnxruntime")
    other = _publish_onnx(ctx, onnx_path, stage="student")
    with pytest.raises(UsageError, match="is a student artifact"):
        load_artifact_model(ctx, "onnxruntime", version=other.ref)
    with pytest.raises(UsageError, match="no artifact 'v999'"):
        load_artifact_model(ctx, "onnxruntime", version="v999")
    _publish_onnx(ctx, onnx_path)
    with pytest.raises(ArtifactError, match="no AOTInductor package made from tiny/onnx/v001 .*; run 'gendd export --aoti"):
        load_artifact_model(ctx, "aoti")
    with pytest.raises(ArtifactError, match="no TensorRT engine made from tiny/onnx/v001 .*; run 'gendd build"):
        load_artifact_model(ctx, "tensorrt")


def test_a_registered_runtime_is_seen_by_config_serve_bench_and_the_triton_writer(tiny_context, onnx_path, tmp_path):
    """Adding a runtime is one module and one register() call (docs/extending.md): a toy runtime of
    ONNX graphs is then accepted by the config, served by `gendd serve`, measured by `gendd bench`
    and written by the Triton writer with its own platform."""
    import torch

    from gendd_deploy.bench.runtime import _runner as bench_runner
    from gendd_deploy.config import ServeConfig
    from gendd_deploy.runtime import RuntimeEntry, register, runtime_status, unregister
    from gendd_deploy.runtime.ort import OrtRunner
    from gendd_deploy.serve import load_artifact_model
    from gendd_deploy.triton import write_triton_repo

    class ToyRunner(OrtRunner):
        name = "toy"

    made = []

    def toy(path=None, spec=None, **_):
        made.append(path)
        return ToyRunner(path, providers=["CPUExecutionProvider"], intra_op_threads=1, spec=spec)

    with pytest.raises(ValueError, match="unknown runtime 'toy'"):
        ServeConfig(runtime="toy")
    register(RuntimeEntry("toy", "onnx", "model.onnx", "toy_onnx", "export", toy, lambda: None, what="ONNX graph"))
    try:
        assert ServeConfig(runtime="toy").runtime == "toy" and runtime_status()["toy"] is None
        ctx = tiny_context()
        art = _publish_onnx(ctx, onnx_path)
        runner, model = load_artifact_model(ctx, "toy")  # serve: the onnx artifact's file, by the toy runtime
        assert isinstance(runner, ToyRunner) and made[-1] == art.file("model.onnx")
        assert model.platform == "toy_onnx" and model.extra["runtime"] == "toy"
        x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(runner.run(x), ort_runner(onnx_path).run(x), atol=1e-6)

        from test_export import tiny_student  # bench: a model exported to ONNX and run by the toy runtime

        from gendd_deploy.models.deployed import DeployedModel, SamplerSetting

        model_ = DeployedModel(tiny_student(), SamplerSetting.probe()).eval()
        got = bench_runner("toy", model_, tmp_path, torch.randn(2, 1, 8, 8), name="tiny", device=torch.device("cpu"))
        assert isinstance(got, ToyRunner) and made[-1] == tmp_path / "tiny.onnx"

        version = write_triton_repo(art, None, tmp_path / "repo", "tiny", runtime="toy")  # the writer: its platform
        assert 'platform: "toy_onnx"' in (version.parent / "config.pbtxt").read_text() and (version / "model.onnx").is_file()
    finally:
        unregister("toy")


def test_serve_artifacts_serves_the_latest_onnx(tiny_context, onnx_path, runner):
    from rich.console import Console

    from gendd_deploy.serve import load_artifact_model, serve_artifacts

    ctx = tiny_context("serve.port=0", "serve.grpc_port=0", "serve.model_name='digits'")
    _publish_onnx(ctx, onnx_path)
    art = _publish_onnx(ctx, onnx_path)  # v002: the latest is served
    got_runner, model = load_artifact_model(ctx)
    assert (model.name, model.version, model.preprocess, model.class_names) == ("digits", "2", SPEC, tuple(CLASSES))
    assert model.extra["artifact"] == art.ref == "tiny/onnx/v002"
    log = io.StringIO()
    ctx.console = Console(file=log, width=400)
    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=serve_artifacts, args=(ctx, "onnxruntime", None, ready, stop), daemon=True)
    t.start()
    try:
        assert ready.wait(TIMEOUT)
        port = int(re.search(r"on http://127\.0\.0\.1:(\d+)", log.getvalue()).group(1))
        assert call(port, "GET", "/v2/models/digits/versions/2")[2]["parameters"]["artifact"] == "tiny/onnx/v002"
        blobs = sample_images()
        assert re.search(r"gRPC on 127\.0\.0\.1:(\d+)", log.getvalue())  # both halves of the protocol
        status, _, resp = call(port, "POST", "/v2/models/digits_image/infer", image_request(blobs))
        assert status == 200, resp
        x = np.stack([preprocess_image(decode_image(b), SPEC) for b in blobs])
        np.testing.assert_allclose(logits_of(resp), runner.run(x), atol=1e-6)
    finally:
        stop.set()
        t.join(TIMEOUT)
    assert not t.is_alive() and "stopped" in log.getvalue()


def test_serve_load_benchmark_runs_end_to_end(onnx_path, tmp_path):
    """benchmarks/serve_load.py starts a server, drives it, prints its table and writes JSON."""
    out = tmp_path / "load.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--onnx", str(onnx_path), "--concurrency", "1", "2",
         "--duration", "0.3", "--warmup", "0.1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]
    assert {(x["batching"], x["concurrency"]) for x in rows} == {("on", 1), ("on", 2), ("off", 1), ("off", 2)}
    assert all(x["errors"] == 0 and x["req_per_s"] > 0 for x in rows)
    assert all(x["mean_batch"] >= 1 for x in rows)  # read from /metrics: nan if the series are not found
