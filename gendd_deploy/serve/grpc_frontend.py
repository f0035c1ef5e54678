"""The gRPC half of the Open Inference Protocol: KServe v2's `GRPCInferenceService` on grpcio.

It serves the same models as the HTTP server, through the same batchers, and reads requests with
the same validation: a `ModelInferRequest` is turned into the equivalent REST request (JSON head
plus binary tensors) and parsed by `protocol.parse_infer_request`, so both halves accept and
refuse exactly the same things. Inputs may come as `raw_input_contents` or as typed `contents`
(fp32_contents for `images`, bytes_contents for `image_bytes`); outputs always go back as
`raw_output_contents`, which tritonclient.grpc decodes with `as_numpy`.

The service stubs are Triton's own (`tritonclient.grpc.service_pb2_grpc`, the `serve` extra),
so the wire format is the one Triton's clients, perf_analyzer included, already speak.
Protocol refusals map to gRPC codes: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE,
anything else INTERNAL.
"""

from __future__ import annotations

import json
import struct
import time
from concurrent import futures
from typing import TYPE_CHECKING

import numpy as np

from gendd_deploy import __version__
from gendd_deploy.errors import MissingDependency, UsageError
from gendd_deploy.serve.protocol import EXTENSIONS, IMAGE_INPUT, SERVER_NAME, ProtocolError, build_infer_response, parse_infer_request

try:  # optional: the [serve] extra
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - exercised where the extra is absent
    raise MissingDependency(f"the gRPC server needs grpcio and tritonclient[grpc] ({e.name} is missing); pip install 'gendd-deploy[serve]', or set [serve] grpc_port = -1") from None

if TYPE_CHECKING:
    from gendd_deploy.serve.server import InferenceServer, Served

CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
MAX_RESPONSE_MB = 64  # responses are logits or class strings: far below this


def _value(p) -> object:
    """An InferParameter as a plain python value."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _param(value) -> "pb.InferParameter":
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    return pb.InferParameter(string_param=str(value))


def _typed_to_raw(t) -> bytes:
    """Typed `contents` in the raw layout the REST binary extension uses."""
    if t.datatype == "FP32":
        return np.asarray(t.contents.fp32_contents, dtype="<f4").tobytes()
    if t.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in t.contents.bytes_contents)
    return b""  # any other datatype: the parser names the datatype the model wants


def rest_request(request) -> tuple[bytes, int]:
    """(body, header_length) of the REST request equivalent to a ModelInferRequest."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input")
    inputs, blobs = [], []
    for i, t in enumerate(request.inputs):
        blob = raw[i] if raw else _typed_to_raw(t)
        params = {k: _value(v) for k, v in t.parameters.items()}
        params["binary_data_size"] = len(blob)
        inputs.append({"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "parameters": params})
        blobs.append(blob)
    params = {k: _value(v) for k, v in request.parameters.items()}
    params["binary_data_output"] = True
    body: dict = {"inputs": inputs, "parameters": params}
    if request.id:
        body["id"] = request.id
    if request.outputs:
        body["outputs"] = [{"name": o.name, "parameters": {**{k: _value(v) for k, v in o.parameters.items()}, "binary_data": True}} for o in request.outputs]
    head = json.dumps(body).encode()
    return head + b"".join(blobs), len(head)


def grpc_response(payload: bytes, header_length: int) -> "pb.ModelInferResponse":
    """The REST response (JSON head + binary outputs) as a ModelInferResponse."""
    head = json.loads(payload[:header_length])
    resp = pb.ModelInferResponse(model_name=head["model_name"], model_version=head["model_version"], id=head.get("id", ""))
    for k, v in (head.get("parameters") or {}).items():
        resp.parameters[k].CopyFrom(_param(v))
    offset = header_length
    for o in head["outputs"]:
        resp.outputs.add(name=o["name"], datatype=o["datatype"], shape=o["shape"])
        size = o["parameters"]["binary_data_size"]
        resp.raw_output_contents.append(payload[offset : offset + size])
        offset += size
    return resp


class _Service(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: "InferenceServer"):
        self.app = app

    def _model(self, name: str, version: str, context) -> "Served":
        served = self.app.lookup(name, version or None)
        if served is None:
            want = f"'{name}'" + (f" version '{version}'" if version else "")
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {want}; this server serves {self.app.listing()}")
        return served

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.app.ready)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    def ModelReady(self, request, context):
        self._model(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self.app.ready)

    def ModelMetadata(self, request, context):
        m = self.app.metadata(self._model(request.name, request.version, context))
        tensors = lambda ts: [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in ts]  # noqa: E731
        return pb.ModelMetadataResponse(name=m["name"], versions=m["versions"], platform=m["platform"], inputs=tensors(m["inputs"]), outputs=tensors(m["outputs"]))

    def ModelConfig(self, request, context):
        config = json_format.ParseDict(self._model(request.name, request.version, context).model.config(), model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    def ModelStatistics(self, request, context):
        if request.name:
            served = self._model(request.name, request.version, context)
            chosen = [served] if request.version else list(self.app.routes[request.name].values())
        else:
            chosen = self.app.served()
        stats = {"model_stats": [s.stats.to_dict(s.model.name, s.model.version) for s in chosen]}
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    def ModelInfer(self, request, context):
        served = self._model(request.model_name, request.model_version, context)
        t0 = time.perf_counter()
        try:
            body, header_length = rest_request(request)
            req = parse_infer_request(served.model, body, header_length, max_json_bytes=int(self.app.cfg.max_json_mb * 1024 * 1024))
            payload, json_length = build_infer_response(served.model, req, self.app.predict(served, req))
            resp = grpc_response(payload, json_length)
        except ProtocolError as e:
            served.stats.request(False, time.perf_counter() - t0)
            self.app.metrics.requests.inc(endpoint="grpc_infer", code=str(e.status))
            context.abort(CODES.get(e.status, grpc.StatusCode.INTERNAL), e.message)
        except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as e:  # a message the parser's checks did not foresee
            served.stats.request(False, time.perf_counter() - t0)
            self.app.metrics.requests.inc(endpoint="grpc_infer", code="400")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {type(e).__name__}: {str(e)[:200]}")
        served.stats.request(True, time.perf_counter() - t0)
        self.app.metrics.requests.inc(endpoint="grpc_infer", code="200")
        self.app.metrics.latency.observe(time.perf_counter() - t0)
        return resp


class GrpcFrontend:
    """grpcio server for `app`'s models on [serve] host:grpc_port (0 picks a free port)."""

    def __init__(self, app: "InferenceServer"):
        self.app = app
        cfg = app.cfg
        # a request may be as large as an HTTP body ([serve] max_body_mb); grpcio refuses a larger
        # message with RESOURCE_EXHAUSTED before it reaches the parser
        receive = int(cfg.max_body_mb * 1024 * 1024)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max(8, cfg.max_batch), thread_name_prefix="gendd-grpc"),
            options=[("grpc.max_receive_message_length", receive), ("grpc.max_send_message_length", MAX_RESPONSE_MB * 1024 * 1024)],
            maximum_concurrent_rpcs=cfg.max_connections,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Service(app), self.server)
        host = cfg.host if ":" not in cfg.host else f"[{cfg.host}]"
        try:
            self.port = self.server.add_insecure_port(f"{host}:{cfg.grpc_port}")
        except RuntimeError as e:
            raise UsageError(f"cannot listen for gRPC on {cfg.host}:{cfg.grpc_port} ({e}); pick another --grpc-port, or -1 for none") from None
        if self.port == 0:
            raise UsageError(f"cannot listen for gRPC on {cfg.host}:{cfg.grpc_port}; pick another --grpc-port, or -1 for none")

    def start(self) -> "GrpcFrontend":
        self.server.start()
        return self

    def stop(self, grace_s: float) -> None:
        """Refuse new calls; calls in flight get up to `grace_s` to finish."""
        self.server.stop(grace_s).wait(grace_s + 1.0)


__all__ = ["GrpcFrontend", "IMAGE_INPUT", "grpc_response", "rest_request"]
