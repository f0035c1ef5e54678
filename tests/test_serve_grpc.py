"""The gRPC half of the protocol, Triton's model config and statistics, and several models in one
server, driven by Triton's own clients (tritonclient.grpc and tritonclient.http) on loopback."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from gendd_deploy.config import ServeConfig
from gendd_deploy.imaging import decode_image, preprocess_image
from gendd_deploy.serve import InferenceServer
from test_serve import CLASSES, META, SPEC, TIMEOUT, call, metric, onnx_path, runner, sample_images  # noqa: F401 - fixtures


class Shifted:
    """A second model: the same graph with its logits shifted, so answers tell the models apart."""

    def __init__(self, inner, shift: float):
        self.inner, self.shift = inner, shift
        self.needs_noise, self.noise_shape_tail, self.name = False, None, "onnxruntime"

    def noise(self, batch, seed):
        return None

    def run(self, images, noise=None):
        return self.inner.run(images) + self.shift

    def describe(self):
        return {**self.inner.describe(), "runtime": "onnxruntime"}

    def providers(self):
        return self.inner.providers()


@pytest.fixture(scope="module")
def both(runner):
    """Model 'tiny' versions 3 and 4 (4 shifted by +1) and model 'other' (+2), HTTP and gRPC."""
    cfg = ServeConfig(host="127.0.0.1", port=0, grpc_port=0, max_batch=8, max_delay_ms=2.0)
    more = [(Shifted(runner, 1.0), {**META, "version": "4"}), (Shifted(runner, 2.0), {**META, "name": "other", "version": "1"})]
    srv = InferenceServer(runner, META, cfg, more=more, request_timeout_s=TIMEOUT, log=lambda m: None).start()
    try:
        yield srv
    finally:
        srv.stop(drain_timeout_s=TIMEOUT)


@pytest.fixture
def client(both):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{both.grpc_port}")
    yield c
    c.close()


def images(n=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def test_grpc_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "gendd" and "classification" in meta.extensions
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "3") and client.is_model_ready("other")
    m = client.get_model_metadata("tiny", as_json=True)
    assert m["versions"] == ["3", "4"] and m["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"], t["shape"]) for t in m["inputs"]] == [("images", "FP32", ["-1", "1", "8", "8"])]
    assert [(t["name"], t["shape"]) for t in m["outputs"]] == [("logits", ["-1", "10"])]
    mi = client.get_model_metadata("tiny_image", as_json=True)
    assert [(t["name"], t["datatype"]) for t in mi["inputs"]] == [("image_bytes", "BYTES")]


def test_grpc_infer_raw_contents_every_model_and_version(client, runner):
    x = images()
    want = runner.run(x)
    for model, version, shift in [("tiny", "3", 0.0), ("tiny", "4", 1.0), ("tiny", "", 1.0), ("other", "", 2.0)]:
        inp = grpcclient.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # tritonclient.grpc sends raw_input_contents
        result = client.infer(model, [inp], model_version=version, request_id="g-1")
        assert result.get_response().id == "g-1"
        np.testing.assert_allclose(result.as_numpy("logits"), want + shift, atol=1e-5)


def test_grpc_infer_typed_contents(both, runner):
    x = images(2, seed=1)
    with grpc.insecure_channel(f"127.0.0.1:{both.grpc_port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = pb.ModelInferRequest(model_name="tiny", model_version="3")
        t = req.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
        t.contents.fp32_contents.extend(x.ravel().tolist())
        resp = stub.ModelInfer(req, timeout=TIMEOUT)
    (out,) = resp.outputs
    got = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(list(out.shape))
    np.testing.assert_allclose(got, runner.run(x), atol=1e-5)


def test_grpc_classification_on_encoded_images(client, runner):
    blobs = sample_images()
    img = grpcclient.InferInput("image_bytes", [len(blobs)], "BYTES")
    img.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    result = client.infer("tiny_image", [img], outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)])
    top = result.as_numpy("logits")
    assert top.shape == (len(blobs), 3)
    xi = np.stack([preprocess_image(decode_image(b), SPEC) for b in blobs])
    best = runner.run(xi).argmax(1)
    assert [int(s.decode().split(":")[1]) for s in top[:, 0]] == list(best)
    assert [s.decode().split(":")[2] for s in top[:, 0]] == [CLASSES[i] for i in best]


def test_grpc_errors_carry_codes_and_reasons(client):
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert "NOT_FOUND" in str(e.value.status()) and "unknown model 'nope'" in e.value.message()
    bad = grpcclient.InferInput("images", [1, 1, 4, 4], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [bad])
    assert "INVALID_ARGUMENT" in str(e.value.status()) and "expected [-1, 1, 8, 8]" in e.value.message()
    wrong = grpcclient.InferInput("image_bytes", [1], "BYTES")
    wrong.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [wrong])
    assert "goes to model 'tiny_image'" in e.value.message()


def test_config_and_stats_over_both_protocols(both, client):
    x = images(2)
    inp = grpcclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    client.infer("other", [inp])
    cfg = client.get_model_config("other").config
    assert cfg.name == "other" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert list(cfg.input[0].dims) == [1, 8, 8] and cfg.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(cfg.output[0].dims) == [10] and cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    # REST /config is the same ModelConfig, as Triton's protobuf reads it
    status, _, rest = call(both.port, "GET", "/v2/models/other/config")
    assert status == 200 and json_format.ParseDict(rest, model_config_pb2.ModelConfig()) == cfg
    stats = client.get_inference_statistics("other", as_json=True)["model_stats"][0]
    assert stats["name"] == "other" and int(stats["inference_count"]) >= 2 and int(stats["execution_count"]) >= 1
    assert int(stats["inference_stats"]["success"]["count"]) >= 1 and int(stats["inference_stats"]["queue"]["ns"]) > 0
    h = httpclient.InferenceServerClient(f"127.0.0.1:{both.port}")
    try:
        rs = h.get_inference_statistics("other")["model_stats"][0]
        assert rs["name"] == "other" and rs["inference_count"] >= 2
        assert h.get_model_config("other")["max_batch_size"] == 8
        assert {m["name"] for m in h.get_inference_statistics()["model_stats"]} == {"tiny", "tiny_image", "other", "other_image"}
    finally:
        h.close()


def test_grpc_calls_are_counted_in_metrics(both, client):
    x = images(1)
    inp = grpcclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    before = call(both.port, "GET", "/metrics")[2].decode()
    client.infer("tiny", [inp])
    status, _, text = call(both.port, "GET", "/metrics")
    text = text.decode()
    for name, labels in [("gendd_requests_total", {"endpoint": "grpc_infer", "code": "200"}), ("gendd_infer_requests_total", {"model": "tiny", "code": "200"})]:
        assert status == 200 and metric(text, name, **labels) == metric(before, name, **labels) + 1, name


def test_same_name_and_version_twice_is_refused(runner):
    with pytest.raises(Exception, match="same name and version"):
        InferenceServer(runner, META, ServeConfig(port=0, grpc_port=-1), more=[(runner, META)])


def test_grpc_requests_are_bounded_like_http_bodies(runner):
    """[serve] max_body_mb bounds a gRPC request too: a larger one is refused before parsing."""
    cfg = ServeConfig(host="127.0.0.1", port=0, grpc_port=0, max_body_mb=0.01, max_batch=8)
    srv = InferenceServer(runner, META, cfg, request_timeout_s=TIMEOUT, log=lambda m: None).start()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    try:
        x = images(64)  # 64 * 64 floats = 16 KiB > 10 KiB
        inp = grpcclient.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as e:
            client.infer("tiny", [inp])
        assert "RESOURCE_EXHAUSTED" in str(e.value.status())
        small = grpcclient.InferInput("images", [1, 1, 8, 8], "FP32")
        small.set_data_from_numpy(x[:1])
        np.testing.assert_allclose(client.infer("tiny", [small]).as_numpy("logits"), runner.run(x[:1]), atol=1e-5)
    finally:
        client.close()
        srv.stop(drain_timeout_s=TIMEOUT)


def test_grpc_5000_digit_version_is_not_found(client):
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("tiny", model_version="9" * 5000)
    assert "NOT_FOUND" in str(e.value.status()) and "unknown model" in e.value.message()
    x = grpcclient.InferInput("images", [1, 1, 8, 8], "FP32")
    x.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("tiny", [x], model_version="9" * 5000)
    assert "NOT_FOUND" in str(e.value.status())


# ---- fuzzing the gRPC half -------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# UNKNOWN / INTERNAL would mean an exception the server did not map to a code
_ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED}
_names = st.sampled_from(["tiny", "tiny_image", "other", "", "nope", "9" * 5000])
_versions = st.sampled_from(["", "3", "4", "v003", "-1", "9" * 5000, "x"])
_dtypes = st.sampled_from(["FP32", "BYTES", "INT64", "FP16", "", "BOOL"])


@st.composite
def _requests(draw):
    req = pb.ModelInferRequest(model_name=draw(_names), model_version=draw(_versions), id=draw(st.text(max_size=8)))
    for _ in range(draw(st.integers(0, 2))):
        t = req.inputs.add(name=draw(st.sampled_from(["images", "image_bytes", "x", ""])), datatype=draw(_dtypes))
        t.shape.extend(draw(st.lists(st.integers(-3, 70), max_size=5)))
        if draw(st.booleans()):
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=70)))
        else:
            t.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=40), max_size=3)))
        if draw(st.booleans()):
            t.parameters["binary_data_size"].int64_param = draw(st.integers(-2, 10**6))
    if draw(st.booleans()):
        req.raw_input_contents.extend(draw(st.lists(st.binary(max_size=300), max_size=3)))
    for key in draw(st.lists(st.sampled_from(["seed", "classification", "top_k", "binary_data_output", "zzz"]), max_size=2)):
        p = req.parameters[key]
        choice = draw(st.integers(0, 2))
        if choice == 0:
            p.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif choice == 1:
            p.string_param = draw(st.text(max_size=10))
        else:
            p.bool_param = draw(st.booleans())
    for name in draw(st.lists(st.sampled_from(["logits", "top_k", "nope"]), max_size=2)):
        o = req.outputs.add(name=name)
        if draw(st.booleans()):
            o.parameters["classification"].int64_param = draw(st.integers(-5, 20))
    return req


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=_requests())
def test_fuzzed_grpc_requests_get_a_mapped_code(both, req):
    with grpc.insecure_channel(f"127.0.0.1:{both.grpc_port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        try:
            stub.ModelInfer(req, timeout=TIMEOUT)
        except grpc.RpcError as e:
            assert e.code() in _ALLOWED, (e.code(), e.details())
        for call_ in (lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=req.model_name, version=req.model_version), timeout=TIMEOUT),
                      lambda: stub.ModelReady(pb.ModelReadyRequest(name=req.model_name, version=req.model_version), timeout=TIMEOUT)):
            try:
                call_()
            except grpc.RpcError as e:
                assert e.code() in _ALLOWED, (e.code(), e.details())
