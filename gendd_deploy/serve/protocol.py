"""Open Inference Protocol v2 (KServe v2 / Triton) REST bodies: the served model, request parsing, responses.

Each deployed model is served as two models, each with the one input its metadata lists, so a
client that follows the metadata by the book works:

    <name>        images       FP32  [-1, C, H, W]  preprocessed tensors, JSON `data` (flat or
                                                    nested, row-major) or raw little-endian bytes
                                                    (Triton binary tensor extension)
    <name>_image  image_bytes  BYTES [-1, 1]        (when the manifest has a preprocessing spec;
                                                    [N] is accepted too)
                                      encoded images (PNG, JPEG, ...): in JSON each element is a
                                      base64 string; in the binary extension, Triton's 4-byte
                                      little-endian length + bytes per element. Decoded and
                                      preprocessed exactly as training data (`preprocess_image`
                                      with the manifest's spec). With tritonclient keep its
                                      default binary_data=True: its JSON mode sends UTF-8 text,
                                      which image bytes are not.

One output is listed, `logits` FP32 [-1, K]. Classification is Triton's standard way (below); the
older `top_k` output stays accepted but unlisted, since it needs a parameter to mean anything:

    top_k   BYTES [-1, k]  on request: `parameters: {"top_k": k}` on the request, or
                           `{"name": "top_k", "parameters": {"top_k": k}}` in `outputs`. Row i holds
                           the k most probable classes of image i, best first, each element the
                           string "score:index:label" (score = softmax probability; ":label" left out
                           when the model has no class names). This is the element format of
                           Triton's classification extension, so existing parsers work.

Triton's classification extension is also honoured as Triton does it: `{"name": "logits",
"parameters": {"classification": k}}` (tritonclient's `class_count=k`) returns `logits` as BYTES
[-1, k] strings "logit:index:label" (raw logits, not softmax). Binary outputs follow Triton:
`binary_data: true` on an output or `binary_data_output: true` on the request.

Noise: a model whose sampler takes fresh noise gets it from the server, drawn per request from
`parameters: {"seed": int}` (default 0, so the same request gives the same answer, however it was
batched); the response echoes the seed in its `parameters`.

The request's `id` is echoed in the response. Every refusal is a `ProtocolError` with the HTTP
status and a message naming the problem.

Example (curl):
    curl -s localhost:8000/v2/models/quickstart_image/infer -d '{"id": "1", "outputs": [{"name": "logits", "parameters": {"classification": 3}}],
      "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["'$(base64 -w0 seven.png)'"]}]}'

Longer than most modules (~470 lines): the whole request / response contract of the protocol
(shapes, datatypes, binary tensors, parameters, error bodies) in one place, so a reviewer can
check it against the specification without jumping between files.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from gendd_deploy.imaging import ImageRejected, decode_batch
from gendd_deploy.triton import ENSEMBLE_SUFFIX as ENCODED_SUFFIX  # model '<name>_image' takes encoded images
from gendd_deploy.triton import IMAGE_INPUT, model_config, triton_tensor
TOPK_OUTPUT = "top_k"
SERVER_NAME = "gendd"  # server metadata, both frontends
EXTENSIONS = ["binary_tensor_data", "classification"]
MAX_JSON_BYTES = 4 * 1024 * 1024  # default JSON part of a request ([serve] max_json_mb); tensors that large go binary
# Python objects a JSON text can make, counted on the bytes before json.loads builds any: every
# array / object costs ~60 bytes, every number ~30, so these bound one request's parse to ~40 MB.
MAX_JSON_CONTAINERS = 65_536
MAX_JSON_ELEMENTS = 1_048_576


class ProtocolError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str) -> ProtocolError:
    return ProtocolError(400, message)


@dataclass(frozen=True)
class ServedModel:
    """What the server says about the model it serves, and how it reads requests for it."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W) of one image
    num_classes: int | None = None  # None = found by the server's warm-up run
    version: str = "1"
    input_name: str = "images"  # FP32 [-1, C, H, W]
    output_name: str = "logits"
    class_names: tuple[str, ...] | None = None
    preprocess: dict | None = None  # data.preprocess spec; None = encoded images are refused
    needs_noise: bool = False
    platform: str = "onnxruntime_onnx"  # Triton's platform name (runtime/registry.py: triton_platform)
    max_batch: int = 32  # the server's dynamic batch limit: config.max_batch_size
    max_delay_ms: float = 5.0  # the batcher's wait: config.dynamic_batching
    encoded: bool = False  # the encoded-image sibling: its one input is image_bytes
    extra: dict = field(default_factory=dict)  # free-form, shown under metadata "parameters"

    @classmethod
    def from_meta(cls, meta: "ServedModel | dict") -> "ServedModel":
        """From a plain dict with the field names above; `input_shape` may come from `preprocess`."""
        if isinstance(meta, ServedModel):
            return meta
        meta = dict(meta)
        unknown = set(meta) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model_meta keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        spec = meta.get("preprocess")
        if meta.get("input_shape") is None:
            if not spec:
                raise ValueError("model_meta needs 'input_shape' (C, H, W) or a 'preprocess' spec")
            meta["input_shape"] = (spec["in_chans"], spec["image_size"], spec["image_size"])
        meta["input_shape"] = tuple(int(d) for d in meta["input_shape"])
        if len(meta["input_shape"]) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {meta['input_shape']}")
        if meta.get("class_names") is not None:
            meta["class_names"] = tuple(str(c) for c in meta["class_names"])
        meta["version"] = str(meta.get("version", "1"))
        model = cls(**meta)
        if model.class_names and model.num_classes and len(model.class_names) != model.num_classes:
            raise ValueError(f"{len(model.class_names)} class names for {model.num_classes} classes")
        return model

    def with_classes(self, num_classes: int) -> "ServedModel":
        if self.class_names and len(self.class_names) != num_classes:
            raise ValueError(f"the model returns {num_classes} logits but has {len(self.class_names)} class names")
        return replace(self, num_classes=num_classes)

    def has_version(self, version: str | None) -> bool:
        """URLs name the version by its number ('3'); the artifact's own spelling ('v003') works too."""
        if version is None or version == self.version:
            return True
        digits = self.version.lstrip("v")
        theirs = version.lstrip("v")
        if len(theirs) > 18:  # no version has that many digits (and int() refuses past 4300)
            return False
        return digits.isdigit() and theirs.isdigit() and int(digits) == int(theirs)

    def encoded_variant(self) -> "ServedModel":
        """The sibling model that takes encoded images (its one input is image_bytes)."""
        if not self.preprocess:
            raise ValueError(f"model '{self.name}' has no preprocessing spec, so no encoded-image input")
        return replace(self, name=f"{self.name}{ENCODED_SUFFIX}", encoded=True)

    @property
    def inputs(self) -> list[dict]:
        if self.encoded:
            # [batch, 1], as Triton spells a batched BYTES input (its ensemble '<name>_image' too); [N] is accepted
            return [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1, 1]}]
        return [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.input_shape]}]

    @property
    def outputs(self) -> list[dict]:
        k = self.num_classes if self.num_classes is not None else -1
        return [{"name": self.output_name, "datatype": "FP32", "shape": [-1, k]}]

    def config(self) -> dict:
        """GET /v2/models/<name>/config: Triton's ModelConfig (its JSON form, triton.model_config),
        what perf_analyzer and model_analyzer read. Dims exclude the batch dim; inputs and outputs
        as in metadata."""
        def tensor(t: dict) -> dict:
            return triton_tensor(t["name"], "TYPE_" + ("STRING" if t["datatype"] == "BYTES" else t["datatype"]), t["shape"][1:])

        return model_config(
            self.name, self.platform, [tensor(t) for t in self.inputs], [tensor(t) for t in self.outputs],
            max_batch=self.max_batch, max_delay_us=int(self.max_delay_ms * 1000),
            version_policy={"specific": {"versions": [int(self.version)] if self.version.isdigit() else []}},
        )

    def metadata(self) -> dict:
        """GET /v2/models/<name>: the protocol's model metadata (shapes with -1 for the batch)."""
        params = {
            "classification": "outputs [{'name': 'logits', 'parameters': {'classification': k}}] (tritonclient class_count=k) -> k strings 'logit:index:label' per image",
            "needs_noise": self.needs_noise,
            **self.extra,
        }
        if self.needs_noise:
            params["seed"] = "parameters {'seed': int} picks the sampler noise (default 0)"
        if self.class_names:
            params["class_names"] = list(self.class_names)
        return {"name": self.name, "versions": [self.version], "platform": self.platform, "inputs": self.inputs, "outputs": self.outputs, "parameters": params}


@dataclass
class OutputRequest:
    name: str
    binary: bool = False
    k: int | None = None  # top_k for 'top_k'; the classification count for 'logits'


@dataclass
class InferRequest:
    images: np.ndarray  # (n, C, H, W) float32
    id: str | None = None
    seed: int = 0
    outputs: list[OutputRequest] = field(default_factory=list)


# ---- parsing ----------------------------------------------------------------------------------


def _int_param(params: dict, key: str, where: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{where} parameter '{key}' must be an integer, got {value!r}")
    return value


def _bool_param(params: dict, key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise bad(f"{where} parameter '{key}' must be true or false, got {value!r}")
    return value


def _params(obj: dict, where: str) -> dict:
    p = obj.get("parameters") or {}
    if not isinstance(p, dict):
        raise bad(f"{where} 'parameters' must be a JSON object")
    return p


def _shape(tensor: dict, name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"input '{name}' needs 'shape', a list of non-negative integers, got {shape!r}")
    return shape


def _split_binary(inputs: list[dict], binary: bytes) -> dict[int, bytes]:
    """Triton binary tensor extension: the bytes after the JSON header, in input order."""
    chunks, offset = {}, 0
    for i, tensor in enumerate(inputs):
        size = _int_param(_params(tensor, f"input {i}"), "binary_data_size", f"input {i}")
        if size is None:
            continue
        if size < 0 or offset + size > len(binary):
            raise bad(f"input {i} declares binary_data_size {size} but only {len(binary) - offset} binary bytes follow the JSON header")
        chunks[i] = binary[offset : offset + size]
        offset += size
    if offset != len(binary):
        raise bad(f"{len(binary) - offset} bytes after the JSON header belong to no input (check binary_data_size)")
    return chunks


def _float_tensor(model: ServedModel, tensor: dict, raw: bytes | None) -> np.ndarray:
    name = model.input_name
    if tensor.get("datatype") != "FP32":
        raise bad(f"input '{name}' has datatype {tensor.get('datatype')!r}; this model takes FP32")
    shape = _shape(tensor, name)
    want = [-1, *model.input_shape]
    if len(shape) != 4 or tuple(shape[1:]) != model.input_shape or shape[0] < 1:
        raise bad(f"input '{name}' has shape {shape}; expected {want} (N >= 1 images)")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise bad(f"input '{name}' has {len(raw)} binary bytes; shape {shape} in FP32 needs {count * 4}")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=True).reshape(shape)
    if "data" not in tensor:
        raise bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
    try:
        arr = np.asarray(tensor["data"])
    except ValueError as e:  # ragged nesting
        raise bad(f"input '{name}' data is not a regular array: {e}") from None
    if arr.dtype.kind not in "fiu":
        raise bad(f"input '{name}' data must be numbers (FP32), got {arr.dtype.name} values")
    if arr.size != count:
        raise bad(f"input '{name}' has {arr.size} values; shape {shape} needs {count}")
    return arr.astype(np.float32).reshape(shape)


def _deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    """Triton BYTES serialisation: for each element a uint32 little-endian length, then the bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad(f"input '{name}': truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise bad(f"input '{name}': BYTES element at byte {offset} claims {length} bytes, {len(raw) - offset} left")
        out.append(raw[offset : offset + length])
        offset += length
    return out


def _flatten_strings(data: Any, name: str) -> list[str]:
    out: list[str] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise bad(f"input '{name}' elements must be base64 strings, got {type(item).__name__}")
    return out


def decode_images(model: ServedModel, blobs: list[bytes]) -> np.ndarray:
    """Encoded images -> (n, C, H, W) float32, as `preprocess_image` makes them for training data
    (imaging.decode_batch: the same code as Triton's image model)."""
    if not model.preprocess:
        raise bad(f"this model has no preprocessing spec; send '{model.input_name}' FP32 tensors instead of '{IMAGE_INPUT}'")
    try:
        arr = decode_batch(blobs, model.preprocess)  # imaging's per-image and per-request pixel limits
    except ImageRejected as e:
        raise bad(f"input '{IMAGE_INPUT}' {e}") from None
    if arr.shape[1:] != model.input_shape:
        raise ProtocolError(500, f"preprocessing made {arr.shape[1:]}, the model takes {model.input_shape}; the manifest's spec does not fit the model")
    return arr


def _image_tensor(model: ServedModel, tensor: dict, raw: bytes | None) -> np.ndarray:
    if tensor.get("datatype") != "BYTES":
        raise bad(f"input '{IMAGE_INPUT}' has datatype {tensor.get('datatype')!r}; encoded images are BYTES")
    shape = _shape(tensor, IMAGE_INPUT)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise bad(f"input '{IMAGE_INPUT}' has shape {shape}; expected [N] or [N, 1] (N >= 1 images)")
    if raw is not None:
        blobs = _deserialize_bytes(raw, IMAGE_INPUT)
    else:
        if "data" not in tensor:
            raise bad(f"input '{IMAGE_INPUT}' has neither 'data' nor parameters.binary_data_size")
        blobs = []
        for i, s in enumerate(_flatten_strings(tensor["data"], IMAGE_INPUT)):
            try:
                blobs.append(base64.b64decode(s, validate=True))
            except (binascii.Error, ValueError):
                raise bad(f"input '{IMAGE_INPUT}' element {i} is not valid base64") from None
    if len(blobs) != shape[0]:
        raise bad(f"input '{IMAGE_INPUT}' has {len(blobs)} elements; shape {shape} needs {shape[0]}")
    return decode_images(model, blobs)


def _outputs(model: ServedModel, body: dict, params: dict) -> list[OutputRequest]:
    binary_all = _bool_param(params, "binary_data_output", "request")
    top_k = _int_param(params, "top_k", "request")
    K = model.num_classes or 0

    def check_k(k: int, what: str) -> int:
        if not 1 <= k <= K:
            raise bad(f"{what} must be between 1 and {K} (the number of classes), got {k}")
        return k

    requested = body.get("outputs")
    if requested is None:
        outs = [OutputRequest(model.output_name, binary_all)]
    else:
        if not isinstance(requested, list):
            raise bad("'outputs' must be a list of {'name': ...} objects")
        outs = []
        for o in requested:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise bad("each entry of 'outputs' must be an object with a 'name'")
            name = o["name"]
            p = _params(o, f"output '{name}'")
            binary = _bool_param(p, "binary_data", f"output '{name}'") if "binary_data" in p else binary_all
            if name == model.output_name:
                k = _int_param(p, "classification", f"output '{name}'")
                outs.append(OutputRequest(name, binary, None if k is None else check_k(k, "classification")))
            elif name == TOPK_OUTPUT:
                k = _int_param(p, "top_k", f"output '{name}'") or top_k
                if k is None:
                    raise bad(f"output '{TOPK_OUTPUT}' needs k: parameters {{'top_k': k}} on the output or the request")
                outs.append(OutputRequest(name, binary, check_k(k, "top_k")))
            else:
                raise bad(f"unknown output '{name}'; this model has: {model.output_name}, {TOPK_OUTPUT}")
            if sum(x.name == name for x in outs) > 1:
                raise bad(f"output '{name}' is requested twice")
    if top_k is not None and not any(o.name == TOPK_OUTPUT for o in outs):
        outs.append(OutputRequest(TOPK_OUTPUT, binary_all, check_k(top_k, "top_k")))
    return outs


def missing_input_message(model: ServedModel) -> str:
    return f"missing input: model '{model.name}' takes '{model.inputs[0]['name']}'"


def check_json_budget(head: bytes, max_bytes: int = MAX_JSON_BYTES) -> None:
    """Refuse a JSON text whose parse would cost more memory than any valid request needs, from
    byte counts alone (C-speed scans, before any Python object exists): its size, its arrays and
    objects (`[[],[],...]` makes ~60 bytes per 3 bytes sent), its elements (commas)."""
    if len(head) > max_bytes:
        raise ProtocolError(
            413, f"the JSON part of the request is {len(head)} bytes, over the limit of {max_bytes} (max_json_mb); send large tensors "
            "as binary data (Inference-Header-Content-Length)",
        )
    containers = head.count(b"[") + head.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        raise bad(f"the JSON request nests too deeply or holds too many arrays / objects ({containers} > {MAX_JSON_CONTAINERS}); send a flat 'data' list or binary data")
    if head.count(b",") > MAX_JSON_ELEMENTS:
        raise bad(f"the JSON request holds more than {MAX_JSON_ELEMENTS} elements; send large tensors as binary data")


def parse_infer_request(model: ServedModel, body: bytes, header_length: int | None = None, *, max_json_bytes: int = MAX_JSON_BYTES) -> InferRequest:
    """An infer request body (JSON, or JSON + binary tensors when `header_length` is given)."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise bad(f"Inference-Header-Content-Length {header_length} does not fit a body of {len(body)} bytes")
        head, binary = body[:header_length], body[header_length:]
    else:
        head, binary = body, b""
    check_json_budget(head, max_json_bytes)
    try:
        req = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"malformed JSON request body: {e}") from None
    except RecursionError:
        raise bad("the JSON request nests too deeply; no valid request does") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (Python's int limit)
        raise bad(f"malformed JSON request body: {e}") from None
    if not isinstance(req, dict):
        raise bad("the request body must be a JSON object with 'inputs'")
    return parse_infer_head(model, req, binary=binary)


def parse_infer_head(model: ServedModel, req: dict, *, binary: bytes = b"", blobs: dict[int, bytes] | None = None) -> InferRequest:
    """An infer request from its header (the JSON object's content, as a dict) and its binary
    tensors: `binary`, the bytes after a REST request's JSON header, split by each input's
    binary_data_size; or `blobs`, input index -> raw bytes, as gRPC carries them (no JSON)."""
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad(f"'id' must be a string, got {rid!r}")
    params = _params(req, "request")
    seed = _int_param(params, "seed", "request")
    if seed is not None and not 0 <= seed < 2**63:
        raise bad(f"request parameter 'seed' must be in [0, 2**63), got {seed}")
    inputs = req.get("inputs")
    if inputs is None or inputs == []:
        raise bad(missing_input_message(model))
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise bad("'inputs' must be a list of tensor objects {'name', 'datatype', 'shape', 'data'}")
    chunks = _split_binary(inputs, binary) if blobs is None else blobs
    known = model.inputs[0]["name"]
    names = [t.get("name") for t in inputs]
    for n in names:
        if n == IMAGE_INPUT and not model.encoded and model.preprocess:
            raise bad(f"input '{IMAGE_INPUT}' goes to model '{model.name}{ENCODED_SUFFIX}'; model '{model.name}' takes '{known}'")
        if n != known:
            raise bad(f"unknown input {n!r}; model '{model.name}' takes '{known}'")
    if len(inputs) != 1:
        raise bad(f"send one input ('{known}'), got {len(inputs)}: {', '.join(map(str, names))}")
    tensor = inputs[0]
    if not model.encoded:
        images = _float_tensor(model, tensor, chunks.get(0))
    else:
        images = _image_tensor(model, tensor, chunks.get(0))
    return InferRequest(images=images, id=rid, seed=seed or 0, outputs=_outputs(model, req, params))


# ---- responses --------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _class_strings(model: ServedModel, values: np.ndarray, k: int) -> np.ndarray:
    """(n, K) scores -> (n, k) strings 'score:index[:label]', best first."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    rows = []
    for r, idx in enumerate(order):
        row = []
        for j in idx:
            s = f"{float(values[r, j]):.9g}:{int(j)}"
            if model.class_names:
                s += f":{model.class_names[j]}"
            row.append(s)
        rows.append(row)
    return np.array(rows, dtype=object).reshape(len(rows), k)


def serialize_bytes(elements: list[bytes]) -> bytes:
    """Triton BYTES serialisation (both frontends): each element's uint32 little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def build_infer_response(model: ServedModel, req: InferRequest, logits: np.ndarray) -> tuple[bytes, int | None]:
    """(body, json_length) of a REST answer: json_length is set when binary outputs follow the JSON header."""
    resp, blobs = build_infer_result(model, req, logits)
    head = json.dumps(resp, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def build_infer_result(model: ServedModel, req: InferRequest, logits: np.ndarray) -> tuple[dict, list[bytes]]:
    """(header, binary outputs) of an answer: the header as a dict (JSON for REST, protobuf fields
    for gRPC), and the raw bytes of each output the request asked for in binary, in order."""
    logits = np.asarray(logits, dtype=np.float32)
    if not np.isfinite(logits).all():  # JSON has no NaN / Inf; say so instead of writing invalid JSON
        raise bad("the model's output for this input is not finite (NaN or Inf); check the input values (normalised pixels, not extremes)")
    outputs, blobs = [], []
    for o in req.outputs:
        if o.name == model.output_name and o.k is None:
            datatype, shape, values = "FP32", list(logits.shape), logits
        elif o.name == model.output_name:  # Triton classification: raw logits
            datatype, shape, values = "BYTES", [logits.shape[0], o.k], _class_strings(model, logits, o.k)
        else:
            datatype, shape, values = "BYTES", [logits.shape[0], o.k], _class_strings(model, softmax(logits), o.k)
        entry: dict[str, Any] = {"name": o.name, "datatype": datatype, "shape": shape}
        if o.binary:
            blob = np.ascontiguousarray(values, dtype="<f4").tobytes() if datatype == "FP32" else serialize_bytes([s.encode() for s in values.ravel()])
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values.ravel().tolist()
        outputs.append(entry)
    resp: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if req.id is not None:
        resp["id"] = req.id
    if model.needs_noise:
        resp["parameters"] = {"seed": req.seed}
    resp["outputs"] = outputs
    return resp, blobs


def error_body(message: str, **extra) -> bytes:
    return json.dumps({"error": message, **extra}).encode()
