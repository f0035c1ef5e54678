"""The gRPC half of the Open Inference Protocol: KServe v2's `GRPCInferenceService` on grpcio.

It serves the same models as the HTTP frontend, through the same core (serve/core.py), and reads
requests with the same validation: a `ModelInferRequest`'s fields become the request header (a
dict) and its tensors the binary blobs that `protocol.parse_infer_head` reads, with no JSON in
between, so both halves accept and refuse exactly the same things. Inputs may come as `raw_input_contents` or as typed `contents`
(fp32_contents for `images`, bytes_contents for `image_bytes`); outputs always go back as
`raw_output_contents`, which tritonclient.grpc decodes with `as_numpy`.

The service stubs are Triton's own (`tritonclient.grpc.service_pb2_grpc`, the `serve` extra),
so the wire format is the one Triton's clients, perf_analyzer included, already speak.
Protocol refusals map to gRPC codes: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE,
anything else INTERNAL.
"""

from __future__ import annotations

import time
from concurrent import futures
from typing import TYPE_CHECKING

import numpy as np

from gendd_deploy import __version__
from gendd_deploy.errors import MissingDependency, UsageError
from gendd_deploy.serve.protocol import EXTENSIONS, IMAGE_INPUT, SERVER_NAME, ProtocolError, build_infer_result, parse_infer_head, serialize_bytes

try:  # optional: the [serve] extra
    import grpc
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - exercised where the extra is absent
    raise MissingDependency(f"the gRPC server needs grpcio and tritonclient[grpc] ({e.name} is missing); pip install 'gendd-deploy[serve]', or set [serve] grpc_port = -1") from None

if TYPE_CHECKING:
    from gendd_deploy.serve.core import Served, ServingCore

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
        return serialize_bytes(list(t.contents.bytes_contents))
    return b""  # any other datatype: the parser names the datatype the model wants


def request_head(request) -> tuple[dict, dict[int, bytes]]:
    """(header, blobs) of a ModelInferRequest: its fields as the protocol's request header and each
    input's raw bytes by index; every output is asked for in binary (raw_output_contents)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input")
    inputs, blobs = [], {}
    for i, t in enumerate(request.inputs):
        blobs[i] = raw[i] if raw else _typed_to_raw(t)
        inputs.append({"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "parameters": {k: _value(v) for k, v in t.parameters.items()}})
    params = {k: _value(v) for k, v in request.parameters.items()}
    params["binary_data_output"] = True
    head: dict = {"inputs": inputs, "parameters": params}
    if request.id:
        head["id"] = request.id
    if request.outputs:
        head["outputs"] = [{"name": o.name, "parameters": {**{k: _value(v) for k, v in o.parameters.items()}, "binary_data": True}} for o in request.outputs]
    return head, blobs


def grpc_response(head: dict, blobs: list[bytes]) -> "pb.ModelInferResponse":
    """An answer's header and binary outputs (protocol.build_infer_result) as a ModelInferResponse."""
    resp = pb.ModelInferResponse(model_name=head["model_name"], model_version=head["model_version"], id=head.get("id", ""))
    for k, v in (head.get("parameters") or {}).items():
        resp.parameters[k].CopyFrom(_param(v))
    for o, blob in zip(head["outputs"], blobs):
        resp.outputs.add(name=o["name"], datatype=o["datatype"], shape=o["shape"])
        resp.raw_output_contents.append(blob)
    return resp


class _Service(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: "ServingCore"):
        self.app = app

    def _model(self, name: str, version: str, context) -> "Served":
        try:
            return self.app.find(name, version or None)
        except ProtocolError as e:
            context.abort(CODES.get(e.status, grpc.StatusCode.INTERNAL), e.message)

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
            self._model(request.name, request.version, context)  # an unknown model is NOT_FOUND
        stats = self.app.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    def ModelInfer(self, request, context):
        served = self._model(request.model_name, request.model_version, context)
        t0 = time.perf_counter()
        try:
            head, blobs = request_head(request)
            req = parse_infer_head(served.model, head, blobs=blobs)
            resp = grpc_response(*build_infer_result(served.model, req, self.app.predict(served, req)))
        except ProtocolError as e:
            self._answered(served, e.status, t0)
            context.abort(CODES.get(e.status, grpc.StatusCode.INTERNAL), e.message)
        except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as e:  # a message the parser's checks did not foresee
            self._answered(served, 400, t0)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {type(e).__name__}: {str(e)[:200]}")
        self._answered(served, 200, t0)
        return resp

    def _answered(self, served: "Served", status: int, t0: float) -> None:
        self.app.account(served, status, time.perf_counter() - t0)
        self.app.metrics.answered("grpc_infer", status)


class GrpcFrontend:
    """grpcio server for the models of the serving core `app` on [serve] host:grpc_port (0 picks a free port)."""

    def __init__(self, app: "ServingCore"):
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

    def close_listener(self, grace_s: float) -> None:
        """Refuse new calls; calls in flight get up to `grace_s` to finish (the core answers them as it drains)."""
        self._stopped = self.server.stop(grace_s)

    def finish(self, deadline: float) -> bool:
        """Wait, until the monotonic `deadline`, for the calls in flight; True when they all ended."""
        stopped = getattr(self, "_stopped", None) or self.server.stop(0)
        return stopped.wait(max(0.0, deadline - time.monotonic()) + 1.0)

    def stop(self, grace_s: float) -> None:
        self.close_listener(grace_s)
        self.finish(time.monotonic() + grace_s)


__all__ = ["GrpcFrontend", "IMAGE_INPUT", "grpc_response", "request_head"]
