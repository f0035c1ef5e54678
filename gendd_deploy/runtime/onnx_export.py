"""Export a DeployedModel to one ONNX graph: images (B, C, H, W) [, noise (B, steps+1, draws, n, d)]
-> logits (B, K), with a dynamic batch dimension named "batch" on every input and output.

The sampler is unrolled into the graph (python-int steps); noise, where the setting needs it, is an
input, never a Random* op: TensorRT's ONNX parser rejects RandomNormalLike and friends.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
import warnings
from pathlib import Path

import torch

from gendd_deploy.errors import GateError, MissingDependency
from gendd_deploy.models.deployed import DeployedModel
from gendd_deploy.spec import onnx_io

# ops that draw random numbers inside the graph (ONNX standard domain)
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"})
BATCH = "batch"
MAX_BATCH = 1 << 16  # upper bound of the symbolic batch dim during tracing (not a runtime limit)


class ExportError(GateError):
    """The exporter produced no graph, or a graph that violates the deployment contract."""


def _onnx():
    try:  # imported on use, so a missing onnx is a clear MissingDependency, not an ImportError at start
        import onnx
    except ImportError:
        raise MissingDependency("onnx is not installed; pip install onnx onnxscript") from None
    return onnx


def io_names(model: DeployedModel) -> tuple[list[str], list[str]]:
    return (["images", "noise"] if model.needs_noise else ["images"]), ["logits"]


def example_inputs(model: DeployedModel, example_images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(images[, noise]) with batch >= 2, so tracing keeps the batch dim symbolic (0/1 specialise)."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    x = example_images.detach().float().to(device)
    if x.shape[0] < 2:
        x = x.repeat(2, 1, 1, 1)[:2]
    if not model.needs_noise:
        return (x,)
    g = torch.Generator().manual_seed(0)
    return x, torch.randn(model.noise_shape(x.shape[0]), generator=g).to(device)


class _Images(torch.nn.Module):
    """forward(images) only, so the traced signature has no optional noise argument."""

    def __init__(self, model: DeployedModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _export_dynamo(module, args, tmp: Path, *, inputs: list[str], outputs: list[str], opset: int) -> None:
    batch = torch.export.Dim(BATCH, min=1, max=MAX_BATCH)
    dynamic = {name: {0: batch} for name in inputs}
    # the exporter prints progress lines and warns about the shared batch symbol: keep the CLI quiet
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(tmp), input_names=inputs, output_names=outputs, opset_version=opset,
            dynamo=True, dynamic_shapes=dynamic, external_data=False, optimize=True, verbose=False, report=False,
        )


def traceable(model: DeployedModel, example_images: torch.Tensor) -> tuple[torch.nn.Module, list[str], list[str], tuple[torch.Tensor, ...]]:
    """What every exporter traces (ONNX, AOTInductor): the module in eval mode, taking (images[,
    noise]) to logits, its input and output names, and example inputs."""
    model = model.eval()
    inputs, outputs = io_names(model)
    module = model if model.needs_noise else _Images(model)
    return module, inputs, outputs, example_inputs(model, example_images)


def export_onnx_fast(model: DeployedModel, path: str | Path, example_images: torch.Tensor, opset: int = 18) -> None:
    """The same graph as `export_onnx` (io, dynamic batch, unrolled sampler) through the TorchScript
    exporter, without the checks: seconds faster per graph, for latency measurements only.
    The shipped graph always comes from `export_onnx`."""
    module, inputs, outputs, args = traceable(model, example_images)
    with torch.no_grad():
        _export_torchscript(module, args, Path(path), inputs=inputs, outputs=outputs, opset=opset)


def _export_torchscript(module, args, tmp: Path, *, inputs: list[str], outputs: list[str], opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(tmp), input_names=inputs, output_names=outputs, opset_version=opset,
            dynamo=False, dynamic_axes={name: {0: BATCH} for name in inputs + outputs}, do_constant_folding=True,
        )


def _iter_nodes(graph):
    """Every node, including those in subgraphs (If / Loop / Scan bodies)."""
    onnx = _onnx()
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def random_ops(model_proto) -> list[str]:
    """Names of random-number ops anywhere in the model (main graph, subgraphs, local functions)."""
    found = [n.op_type for n in _iter_nodes(model_proto.graph) if n.op_type in RANDOM_OPS]
    for fn in model_proto.functions:
        found += [n.op_type for n in fn.node if n.op_type in RANDOM_OPS]
    return sorted(set(found))


def _name_batch_dims(model_proto) -> None:
    """Name dim 0 of every graph input and output "batch" (the dynamo exporter may call it s0)."""
    for v in list(model_proto.graph.input) + list(model_proto.graph.output):
        d0 = v.type.tensor_type.shape.dim[0]
        if d0.HasField("dim_value"):
            raise ExportError(f"'{v.name}' has a static batch dim {d0.dim_value}; the exporter specialised it")
        d0.dim_param = BATCH


def describe_onnx(path: str | Path) -> dict:
    """Inputs, outputs (name, dtype, shape with "batch"), opset and node count of an ONNX file."""
    onnx = _onnx()
    m = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        **onnx_io(path, m),
        "opset": opset,
        "nodes": sum(1 for _ in _iter_nodes(m.graph)),
    }


def export_onnx(model: DeployedModel, path: str | Path, example_images: torch.Tensor, *, opset: int = 18, exporter: str = "dynamo") -> dict:
    """Write `path` (atomically) and return its io description, opset, exporter and node count.

    exporter "dynamo" tries the dynamo exporter (torch.export based) first and falls back to the
    TorchScript exporter only when that raises; "torchscript" uses that one alone (seconds instead
    of tens of seconds per graph). The manifest records which one produced the file.
    """
    onnx = _onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module, inputs, outputs, args = traceable(model, example_images)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    errors = []
    try:
        chain = [("dynamo", _export_dynamo), ("torchscript", _export_torchscript)]
        if exporter == "torchscript":
            chain = chain[1:]
        exporter = None
        for name, fn in chain:
            try:
                with torch.no_grad():
                    fn(module, args, tmp, inputs=inputs, outputs=outputs, opset=opset)
                exporter = name
                break
            except Exception as e:  # noqa: BLE001 - any exporter failure: try the next, report all
                errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                tmp.unlink(missing_ok=True)
        if exporter is None:
            raise ExportError("ONNX export failed with every exporter: " + "; ".join(errors))
        proto = onnx.load(str(tmp))
        bad = random_ops(proto)
        if bad:
            raise ExportError(
                f"the exported graph contains random ops {bad}; TensorRT rejects them. "
                "Pass noise in as an input (noise = 'fresh') or use a deterministic sampler"
            )
        got_in = [v.name for v in proto.graph.input]
        got_out = [v.name for v in proto.graph.output]
        if got_in != inputs or got_out != outputs:
            raise ExportError(f"exported graph has inputs {got_in} and outputs {got_out}; expected {inputs} -> {outputs}")
        _name_batch_dims(proto)
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    info = describe_onnx(path)
    info.update(exporter=exporter, requested_opset=opset, bytes=path.stat().st_size)
    if errors:
        info["exporter_fallback_reason"] = errors[0]
    return info
