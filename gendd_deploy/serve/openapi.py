"""`GET /openapi.json`: the REST API as an OpenAPI 3.1 document.

Written out here rather than derived from handlers: the request and response bodies are the
Open Inference Protocol's (KServe v2 REST), which protocol.py parses by hand, and this document
says the same things to tools (Swagger UI, schemathesis, client generators). A test checks that
every route the app serves is documented here and every documented path answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gendd_deploy import __version__

if TYPE_CHECKING:
    from gendd_deploy.serve.core import ServingCore

PATH = "/openapi.json"

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}, "id": {"type": "string"}}}
_TENSOR_META = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {"name": {"type": "string"}, "datatype": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}}},
}
_PARAMETERS = {"type": "object", "additionalProperties": True}
_INFER_INPUT = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "description": "'images' (FP32 [n, C, H, W]) or, on '<model>_image', 'image_bytes' (BYTES [n], base64 in JSON)"},
        "datatype": {"type": "string", "enum": ["FP32", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"description": "row-major values, flat or nested; left out with the binary tensor extension", "type": "array"},
        "parameters": {**_PARAMETERS, "description": "binary_data_size: bytes of this tensor after the JSON head"},
    },
}
_INFER_OUTPUT_REQUEST = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "parameters": {**_PARAMETERS, "description": "classification: k (Triton's class_count); binary_data: bool"}},
}
_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/InferInput"}, "minItems": 1},
        "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/InferOutputRequest"}},
        "parameters": {**_PARAMETERS, "description": "seed: int (sampler noise, default 0); binary_data_output: bool"},
    },
}
_INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "parameters": _PARAMETERS,
        "outputs": {"type": "array", "items": {**_TENSOR_META, "properties": {**_TENSOR_META["properties"], "data": {"type": "array"}, "parameters": _PARAMETERS}}},
    },
}
_MODEL_METADATA = {
    "type": "object",
    "required": ["name", "versions", "platform", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": _TENSOR_META},
        "outputs": {"type": "array", "items": _TENSOR_META},
        "parameters": _PARAMETERS,
    },
}
_SERVER_METADATA = {
    "type": "object",
    "required": ["name", "version", "extensions"],
    "properties": {"name": {"type": "string"}, "version": {"type": "string"}, "extensions": {"type": "array", "items": {"type": "string"}}},
}
_STATS = {"type": "object", "required": ["model_stats"], "properties": {"model_stats": {"type": "array", "items": {"type": "object"}}}}
_READY = {"type": "object", "properties": {"ready": {"type": "boolean"}, "name": {"type": "string"}, "error": {"type": "string"}}}


def _json_body(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    reasons = {
        400: "bad request: shape, datatype, missing input, undecodable image, malformed JSON",
        404: "unknown model or version",
        408: "the body was not sent in time",
        411: "no Content-Length (chunked bodies are refused)",
        413: "body over [serve] max_body_mb",
        500: "the model failed",
        503: "not ready, queue full, shutting down, timed out waiting, or too many connections",
    }
    return {str(c): _json_body({"$ref": "#/components/schemas/Error"}, reasons[c]) for c in codes}


def _get(summary: str, ok: dict, *codes: int) -> dict:
    return {"get": {"summary": summary, "responses": {"200": ok, **_errors(*codes)}}}


def _model_paths(prefix: str, params: list[dict]) -> dict:
    versioned = " (this version)" if "{version}" in prefix else " (its highest version)"
    return {
        prefix: {"parameters": params, **_get("model metadata" + versioned, _json_body({"$ref": "#/components/schemas/ModelMetadata"}, "metadata"), 404)},
        prefix + "/ready": {"parameters": params, **_get("model readiness", _json_body(_READY, "ready"), 404, 503)},
        prefix + "/config": {"parameters": params, **_get("Triton's ModelConfig, JSON form", _json_body({"type": "object"}, "ModelConfig"), 404)},
        prefix + "/stats": {"parameters": params, **_get("Triton's inference statistics", _json_body({"$ref": "#/components/schemas/Statistics"}, "statistics"), 404)},
        prefix + "/infer": {
            "parameters": params,
            "post": {
                "summary": "inference" + versioned,
                "description": "JSON, or a JSON head of Inference-Header-Content-Length bytes followed by binary tensors (Triton's binary tensor extension)",
                "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0}}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}, "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                },
                "responses": {
                    "200": {
                        "description": "outputs; application/octet-stream with Inference-Header-Content-Length when binary outputs were asked for",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferResponse"}}, "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **_errors(400, 404, 408, 411, 413, 500, 503),
                },
            },
        },
    }


def document(core: "ServingCore | None" = None) -> dict:
    """The OpenAPI document; with a serving core, its description names the models it serves."""
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}, "description": "'3' (Triton) or 'v003'"}
    serves = f" This server serves {core.listing()}." if core is not None else ""
    paths = {
        "/v2": _get("server metadata", _json_body({"$ref": "#/components/schemas/ServerMetadata"}, "metadata")),
        "/v2/health/live": _get("liveness", _json_body({"type": "object", "properties": {"live": {"type": "boolean"}}}, "live")),
        "/v2/health/ready": _get("readiness (503 while warming up or shutting down)", _json_body(_READY, "ready"), 503),
        "/v2/models/stats": _get("inference statistics of every model", _json_body({"$ref": "#/components/schemas/Statistics"}, "statistics")),
        "/metrics": _get("Prometheus metrics", {"description": "text exposition format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}}),
        PATH: _get("this document", _json_body({"type": "object"}, "OpenAPI 3.1")),
        **_model_paths("/v2/models/{name}", [name]),
        **_model_paths("/v2/models/{name}/versions/{version}", [name, version]),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gendd serve",
            "version": __version__,
            "description": "The Open Inference Protocol v2 (KServe / Triton REST) over a distilled image classifier. Each model '<m>' takes "
            "preprocessed FP32 tensors; '<m>_image' takes encoded images." + serves,
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": _ERROR,
                "InferInput": _INFER_INPUT,
                "InferOutputRequest": _INFER_OUTPUT_REQUEST,
                "InferRequest": _INFER_REQUEST,
                "InferResponse": _INFER_RESPONSE,
                "ModelMetadata": _MODEL_METADATA,
                "ServerMetadata": _SERVER_METADATA,
                "Statistics": _STATS,
            }
        },
    }
