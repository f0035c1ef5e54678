"""ONNX -> ONNX precision conversion (fp16 / bf16), with its own parity gate vs the fp32 graph.

TensorRT 11 builds strongly typed networks only, so reduced precision must already be in the graph
(TensorRT 10 uses builder flags instead; see plan.py). This step is versioned (`CONVERSION_VERSION`,
part of the engine fingerprint) and keeps the graph's inputs and outputs float32, so clients and
Triton configs do not change with the precision.

- fp16: onnxconverter-common's float16 converter when installed (with fp16's real finite range;
  its default clamps constants to 1e4, which breaks diffusion-sampler constants), else the small
  built-in converter below.
- bf16: the built-in converter (onnxconverter-common has none), on a graph upgraded to opset 22
  (the first opset whose Conv accepts bfloat16; TensorRT 10.x/11.x parse opset 22).

The gate runs both graphs on ONNX Runtime CPU. ORT CPU runs fp16 graphs, so fp16 is gated in full.
ORT CPU has no bf16 kernels for most ops; then only what can be checked on a CPU is gated: the
converted graph must type-check, and the fp32 graph with its weights rounded to bf16 must pass the
parity bounds (the weight-rounding error). bf16 activations are first measured by the engine's own
parity gate on the GPU. The report says which gate ran.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from gendd_deploy.errors import UsageError
from gendd_deploy.runtime import make_runner
from gendd_deploy.runtime.parity import compare, figures, gate
from gendd_deploy.trt.plan import GATE_HINT

CONVERSION_VERSION = 1
FP16_MAX = 65504.0
FP16_MIN_POSITIVE = 5.96e-8  # smallest fp16 subnormal
BF16_MIN_OPSET = 22
# ops kept in float32 by the built-in converter: index / coordinate math and samplers
BLOCK_OPS = frozenset(
    {"Resize", "Upsample", "Range", "TopK", "NonMaxSuppression", "RoiAlign", "CumSum",
     "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
)
_TYPE_AGNOSTIC = frozenset({"Shape", "Size", "Cast"})  # their float inputs need no cast


def _converter_available() -> str | None:
    try:
        import onnxconverter_common  # noqa: F401 - optional ([trt] extra), probed here

        return metadata.version("onnxconverter-common")
    except Exception:  # noqa: BLE001
        return None


def converter_identity(precision: str, tool: str = "auto") -> dict:
    """What produced a converted graph; goes into the engine fingerprint so a new converter rebuilds."""
    if precision not in ("fp16", "bf16"):
        raise UsageError(f"ONNX precision conversion is for fp16 / bf16, not '{precision}'")
    version = _converter_available()
    if tool == "auto":
        tool = "onnxconverter-common" if precision == "fp16" and version else "builtin"
    if tool == "onnxconverter-common" and not version:
        raise UsageError("onnxconverter-common is not installed: pip install onnxconverter-common (or use tool='builtin')")
    return {
        "step": "onnx-precision",
        "version": CONVERSION_VERSION,
        "precision": precision,
        "tool": tool,
        "tool_version": version if tool == "onnxconverter-common" else None,
        "io": "float32",
    }


def convert_precision(src: str | Path, dst: str | Path, precision: str, tool: str = "auto") -> dict:
    """Write `src` converted to `precision` at `dst` (float32 inputs/outputs); return what was done."""

    ident = converter_identity(precision, tool)
    model = onnx.load(str(src))
    if ident["tool"] == "onnxconverter-common":
        from onnxconverter_common import float16  # optional ([trt] extra): only an fp16 conversion needs it

        with warnings.catch_warnings():  # it warns once per clamped constant
            warnings.simplefilter("ignore")
            out = float16.convert_float_to_float16(
                model, keep_io_types=True, max_finite_val=FP16_MAX, min_positive_val=FP16_MIN_POSITIVE
            )
    else:
        if precision == "bf16":
            model = _at_least_opset(model, BF16_MIN_OPSET)
        out = convert_builtin(model, precision)
    _type_check(out, precision)
    onnx.save(out, str(dst))
    kept = sorted({n.op_type for n in out.graph.node if n.op_type in BLOCK_OPS})
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), None)
    return {**ident, "kept_fp32_ops": kept, "nodes": len(out.graph.node), "opset": opset}


def _at_least_opset(model, opset: int):
    """bfloat16 Conv / MatMul-family types enter the ONNX spec at opset 22: upgrade older graphs."""
    have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if have >= opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as e:  # noqa: BLE001
        raise UsageError(
            f"bf16 needs ONNX opset {opset} (bfloat16 Conv etc.) but the graph is opset {have} and could not be upgraded "
            f"({str(e).splitlines()[0]}); re-export with --set export.opset={opset} or use precision = 'fp16'"
        ) from None


def _type_check(model, precision: str) -> None:

    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"the {precision} ONNX graph does not type-check ({str(e).splitlines()[0]}); keep precision = 'fp32'") from None


# ---- the built-in converter -------------------------------------------------------------------


def _low_dtype(precision: str):
    if precision == "fp16":
        return np.float16
    import ml_dtypes  # optional: only a bf16 conversion needs it (it comes with onnx >= 1.17)

    return ml_dtypes.bfloat16


def _to_low(arr: np.ndarray, precision: str) -> np.ndarray:
    if precision == "fp16":
        arr = np.clip(arr, -FP16_MAX, FP16_MAX)
    return arr.astype(_low_dtype(precision))


def convert_builtin(model, precision: str):
    """Every float32 tensor becomes fp16 / bf16, except graph inputs / outputs (cast at the edge) and BLOCK_OPS.

    Walks the nodes in their (topological) order, tracking each tensor's type after conversion and
    inserting a Cast wherever a node needs the other type. Control-flow subgraphs are refused.
    """
    F = TensorProto.FLOAT
    LOW = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    suffix = precision
    model = copy.deepcopy(model)
    g = model.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise UsageError(f"node '{node.name}' ({node.op_type}) has a subgraph; the built-in converter handles flat graphs only")
    inferred = onnx.shape_inference.infer_shapes(model)
    orig: dict[str, int] = {}
    for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        orig[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        orig[t.name] = t.data_type

    consumers: dict[str, list] = defaultdict(list)
    for node in g.node:
        for i in node.input:
            consumers[i].append(node)
    cur = {name: orig[name] for name in orig}  # type of each tensor after conversion

    for t in g.initializer:
        if t.data_type == F and any(n.op_type not in BLOCK_OPS for n in consumers[t.name]):
            t.CopyFrom(numpy_helper.from_array(_to_low(numpy_helper.to_array(t), precision), t.name))
            cur[t.name] = LOW

    out_names = {o.name for o in g.output if o.type.tensor_type.elem_type == F}
    rename: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    nodes, tail = [], []

    def as_type(name: str, want: int) -> str:
        name = rename.get(name, name)
        if not name or cur.get(name) == want or cur.get(name) not in (F, LOW):
            return name
        key = (name, want)
        if key not in casts:
            casts[key] = f"{name}__{'fp32' if want == F else suffix}"
            nodes.append(helper.make_node("Cast", [name], [casts[key]], to=want, name=f"{casts[key]}__cast"))
            cur[casts[key]] = want
        return casts[key]

    for node in g.node:
        blocked = node.op_type in BLOCK_OPS
        want = F if blocked else LOW
        for k, name in enumerate(node.input):
            if node.op_type in _TYPE_AGNOSTIC:
                node.input[k] = rename.get(name, name)
            else:
                node.input[k] = as_type(name, want)
        if not blocked:
            if node.op_type == "Cast":
                to = next(a for a in node.attribute if a.name == "to")
                if to.i == F:
                    to.i = LOW
            elif node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
                # the default value is float32 zero
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, _low_dtype(precision)))))
            elif node.op_type in ("Constant", "ConstantOfShape"):
                for a in node.attribute:
                    if a.name == "value" and a.t.data_type == F:
                        a.t.CopyFrom(numpy_helper.from_array(_to_low(numpy_helper.to_array(a.t), precision), a.t.name))
                    elif a.name in ("value_float", "value_floats"):
                        vals = np.array(a.f if a.name == "value_float" else list(a.floats), dtype=np.float32)
                        new = helper.make_attribute("value", numpy_helper.from_array(_to_low(vals, precision)))
                        a.CopyFrom(new)
        for k, name in enumerate(node.output):
            if orig.get(name) is None and name:
                raise UsageError(f"cannot infer the type of '{name}' (output of {node.op_type} '{node.name}'); the graph cannot be converted")
            cur[name] = LOW if (orig.get(name) == F and not blocked) else orig.get(name)
            if name in out_names and cur[name] == LOW:
                low_name = f"{name}__{suffix}"
                node.output[k] = low_name
                rename[name] = low_name
                cur[low_name] = LOW
                tail.append(helper.make_node("Cast", [low_name], [name], to=F, name=f"{name}__cast_out"))
        nodes.append(node)

    del g.node[:]
    g.node.extend(nodes + tail)
    del g.value_info[:]  # stale types; recomputed by whoever needs them
    return model


# ---- running and gating on ONNX Runtime CPU ----------------------------------------------------


def _cpu_runner(model_or_path):
    return make_runner("onnxruntime", path=model_or_path, device="cpu")


def ort_logits(model_or_path, images: np.ndarray, noise: np.ndarray | None, batch: int = 64, runner=None) -> np.ndarray:
    """float32 logits of an ONNX graph (a file or in memory) on ORT CPU, in batches."""
    runner = runner or _cpu_runner(model_or_path)
    if runner.noise_name and noise is None:
        raise UsageError(f"the graph takes a '{runner.noise_name}' input but no noise was given")
    outs = []
    for s in range(0, len(images), batch):
        z = noise[s : s + batch] if runner.noise_name else None
        outs.append(np.asarray(runner.run(images[s : s + batch], z), dtype=np.float32))
    return np.concatenate(outs)


def round_weights(model, precision: str):
    """The fp32 graph with every float weight rounded to `precision` and back (weights-only error)."""

    model = copy.deepcopy(model)
    low = _low_dtype(precision)
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    for t in tensors:
        if t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array(_to_low(arr, precision).astype(low).astype(np.float32), t.name))
    return model


def gate_conversion(
    src: str | Path,
    converted: str | Path,
    images: np.ndarray,
    noise: np.ndarray | None,
    precision: str,
    *,
    atol: float,
    min_agreement: float,
    batch: int = 64,
    ref: np.ndarray | None = None,
) -> dict:
    """Parity of the converted graph vs the fp32 graph on ORT CPU; GateError when out of bounds.

    Returns {'gate': 'full' | 'weights_only', 'cpu_runnable', 'reason', max_abs_diff, top1_agreement, ...}.
    """

    if ref is None:
        ref = ort_logits(src, images, noise, batch)
    try:
        runner = _cpu_runner(converted)
    except Exception as e:  # noqa: BLE001 - ORT raises its own NOT_IMPLEMENTED / Fail types
        runner, reason = None, str(e).splitlines()[0][:300]
    if runner is not None:
        got = ort_logits(None, images, noise, batch, runner=runner)
        report = {"gate": "full", "cpu_runnable": True, "reason": None, **compare(ref, got)}
        gate(report, atol, min_agreement, f"{precision} ONNX conversion (ONNX Runtime CPU)", images="calibration images", hint=GATE_HINT)
        return figures(report)
    if precision == "fp16":  # ORT CPU runs fp16 graphs; failing to load one is a real error
        raise UsageError(f"ONNX Runtime CPU cannot load the fp16 graph: {reason}")
    rounded = round_weights(onnx.load(str(src)), precision)
    got = ort_logits(rounded, images, noise, batch)
    report = {
        "gate": "weights_only",
        "cpu_runnable": False,
        "reason": f"ONNX Runtime CPU cannot run the {precision} graph ({reason}); gated here: type check and "
        f"{precision}-rounded weights in a float32 graph; {precision} activations are gated by the engine parity gate on the GPU",
        **compare(ref, got),
    }
    gate(report, atol, min_agreement, f"{precision} weight rounding (ONNX Runtime CPU)", images="calibration images", hint=GATE_HINT)
    return figures(report)
