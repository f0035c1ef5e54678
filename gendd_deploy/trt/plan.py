"""What an engine build will do, decided without TensorRT: precision plan, profile, timing-cache key.
(Whether a built engine fits this machine is gendd_deploy/runtime/tensorrt.py: check_compatible.)

Everything here is pure (numpy and onnx at most) so it is tested on any machine:

- `precision_plan(trt_major, precision)`: TensorRT 10 reaches fp16 / bf16 through builder flags on
  a weakly typed network; TensorRT 11 removed those flags and every network is strongly typed, so
  the precision is written into the ONNX graph first (trt/precision.py) and the builder is told
  nothing about it.
- `profile_shapes(spec.onnx_io(onnx_path), build_cfg)`: one (min, opt, max) shape per graph
  input, the batch dim from the recipe, every other dim fixed by the graph.
- `GATE_HINT`: what the build's parity gates (runtime/parity.py) suggest when they fail.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from gendd_deploy.errors import UsageError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str  # what the recipe asked for: fp32 | fp16 | bf16 | int8
    trt_major: int
    builder_flags: tuple[str, ...]  # trt.BuilderFlag members to set (TensorRT 10 only)
    onnx_conversion: str | None  # fp16 | bf16: rewrite the ONNX graph before parsing (TensorRT 11)
    strongly_typed: bool  # tensor types come from the graph, not from the builder
    network_flags: tuple[str, ...]  # trt.NetworkDefinitionCreationFlag members to set

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.precision == "int8":
            how = "the export's QDQ graph (explicit quantization), strongly typed network, no precision flags"
        elif self.onnx_conversion:
            how = f"ONNX graph converted to {self.onnx_conversion} (inputs/outputs stay float32), strongly typed network"
        elif self.builder_flags:
            how = f"builder flag {', '.join(self.builder_flags)} on a weakly typed network"
        else:
            how = "float32 graph" + (", strongly typed network" if self.strongly_typed else "")
        return f"{self.precision} on TensorRT {self.trt_major}: {how}"


def precision_plan(trt_major: int, precision: str) -> PrecisionPlan:
    """How `precision` is reached on this TensorRT major version (10 or 11; later majors as 11)."""
    if precision not in PRECISIONS:
        raise UsageError(f"[build] precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if trt_major < 10:
        raise UsageError(f"TensorRT {trt_major} is not supported; gendd builds with TensorRT 10.x or 11.x")
    if precision == "int8":  # explicit quantization: the Q/DQ nodes carry it; TensorRT asks for strong typing and no flags
        return PrecisionPlan(precision, trt_major, (), None, True, ("STRONGLY_TYPED",))
    if trt_major == 10:
        flags = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",)}[precision]
        return PrecisionPlan(precision, trt_major, flags, None, False, ())
    # 11+: the precision flags are gone; the graph carries its types. STRONGLY_TYPED is accepted
    # (and ignored, strong typing being always on) by 11.x, so it is set only where it still exists.
    conversion = None if precision == "fp32" else precision
    return PrecisionPlan(precision, trt_major, (), conversion, True, ("STRONGLY_TYPED",))


# ---- graph inputs and the optimization profile ------------------------------------------------

def _inputs_of(io: Any) -> list[dict]:
    """Accept spec.onnx_io()'s dict, a list of input entries, or a {name: shape} mapping."""
    if isinstance(io, Mapping) and "inputs" in io:
        return list(io["inputs"])
    if isinstance(io, Mapping):
        return [{"name": k, "shape": list(v)} for k, v in io.items()]
    return list(io)


def _is_fixed(dim: Any) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim > 0


def profile_shapes(io: Any, build_cfg: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """One optimization-profile entry per graph input (images and noise alike): name -> (min, opt, max).

    Dim 0 is the batch and takes the recipe's min / opt / max batch; every other dim must be fixed
    in the graph (an image size or a noise shape), else the input cannot be profiled from a recipe.
    """
    out = {}
    for inp in _inputs_of(io):
        name, shape = inp["name"], list(inp["shape"])
        if not shape:
            raise UsageError(f"graph input '{name}' is a scalar; a profile needs a leading batch dim")
        if _is_fixed(shape[0]):
            raise UsageError(
                f"graph input '{name}' has a fixed batch dim {shape[0]} ({shape}); re-export with a dynamic batch dim ('gendd export')"
            )
        rest = shape[1:]
        if not all(_is_fixed(d) for d in rest):
            raise UsageError(f"graph input '{name}' has a dynamic non-batch dim ({shape}); only the batch dim may vary")
        rest_t = tuple(int(d) for d in rest)
        b = (build_cfg.min_batch, build_cfg.opt_batch, build_cfg.max_batch)
        out[name] = tuple((n,) + rest_t for n in b)
    if not out:
        raise UsageError("the ONNX graph has no inputs to profile")
    return out


def profile_to_json(shapes: Mapping) -> dict:
    return {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for name, s in shapes.items()}


# ---- engine identity and compatibility -------------------------------------------------------



def timing_cache_key(here: Mapping) -> dict:
    """What a timing cache is valid for: GPU model, compute capability and exact TensorRT version."""
    return {"gpu": here.get("gpu"), "gpu_capability": here.get("gpu_capability"), "tensorrt": here.get("tensorrt")}


# ---- parity gate (runtime/parity.py) ---------------------------------------------------------

GATE_HINT = "loosen [build] atol / min_agreement only if this is acceptable, or use precision = 'fp32'"


# ---- parser errors ---------------------------------------------------------------------------


def format_parser_error(i: int, err: Mapping) -> str:
    """One line per ONNX parser error: index, node (number, name, op), description, code."""
    where = []
    if err.get("node", -1) is not None and err.get("node", -1) >= 0:
        where.append(f"node {err['node']}")
    if err.get("node_name"):
        where.append(f"'{err['node_name']}'")
    if err.get("node_operator"):
        where.append(f"({err['node_operator']})")
    loc = " ".join(where) or "graph"
    code = f" [{err['code']}]" if err.get("code") else ""
    return f"{i}. {loc}: {err.get('desc', '?')}{code}"


def format_parser_errors(path: str | Path, errors: Iterable[Mapping]) -> str:
    errors = list(errors)
    lines = [format_parser_error(i + 1, e) for i, e in enumerate(errors)]
    return f"TensorRT's ONNX parser rejected {path} with {len(lines)} error(s):\n  " + "\n  ".join(lines)
