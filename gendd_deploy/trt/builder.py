"""ONNX -> serialized TensorRT plan, on TensorRT 10 or 11 (needs TensorRT and a GPU).

    built = EngineBuilder(workspace_mb=4096).build("model.onnx", plan, shapes, timing_cache=old_bytes)
    Path("model.plan").write_bytes(built.plan)

The precision comes from a `PrecisionPlan` (plan.py): builder flags on TensorRT 10, an already
converted graph on a strongly typed network on TensorRT 11. One optimization profile covers every
input (images and noise). The timing cache goes in as bytes and comes back grown, so the caller can
keep it as an artifact and hand it to the next build on the same GPU and TensorRT version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from gendd_deploy.errors import ArtifactError, UsageError
from gendd_deploy.trt import import_tensorrt
from gendd_deploy.trt.plan import PrecisionPlan, format_parser_errors


class OnnxParseError(ArtifactError):
    """TensorRT's ONNX parser rejected the graph; `errors` holds one formatted line per parser error."""

    def __init__(self, message: str, errors: list[str]):
        super().__init__(message)
        self.errors = errors


@dataclass
class BuiltEngine:
    plan: bytes  # the serialized engine, a plain TensorRT plan file
    timing_cache: bytes  # the timing cache after this build (input cache + new tactics)
    build_s: float
    log: list[str] = field(default_factory=list)  # TensorRT warnings and errors, in order


def _parser_error_fields(err) -> dict:
    """An IParserError as a dict; accessors differ a little between TensorRT versions."""

    def get(name, default=None):
        fn = getattr(err, name, None)
        try:
            return fn() if callable(fn) else default
        except Exception:  # noqa: BLE001
            return default

    code = get("code")
    return {
        "desc": get("desc", str(err)),
        "code": getattr(code, "name", code),
        "node": get("node", -1),
        "node_name": get("node_name"),
        "node_operator": get("node_operator"),
    }


class EngineBuilder:
    def __init__(self, workspace_mb: int = 4096, verbose: bool = False):
        trt = import_tensorrt()
        self.trt = trt
        self.workspace_mb = workspace_mb
        self.messages: list[str] = []
        min_sev = trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING
        messages = self.messages

        class _Logger(trt.ILogger):  # keep TensorRT's warnings / errors for the error message
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if int(severity) <= int(min_sev):
                    messages.append(f"[{getattr(severity, 'name', severity)}] {msg}")

        self.logger = _Logger()
        self.builder = trt.Builder(self.logger)

    def _network(self, plan: PrecisionPlan):
        trt = self.trt
        flags = 0
        for name in plan.network_flags:
            member = getattr(trt.NetworkDefinitionCreationFlag, name, None)
            if member is not None:  # STRONGLY_TYPED may disappear after 11.x, where it is always on
                flags |= 1 << int(member)
        return self.builder.create_network(flags)

    def parse(self, network, onnx_path: str | Path) -> None:
        parser = self.trt.OnnxParser(network, self.logger)
        # parse_from_file resolves external data next to the graph
        if not parser.parse_from_file(str(onnx_path)):
            errors = [_parser_error_fields(parser.get_error(i)) for i in range(parser.num_errors)]
            message = format_parser_errors(onnx_path, errors)
            raise OnnxParseError(message, [line.strip() for line in message.splitlines()[1:]])
        self._parser = parser  # the network references parser-owned weights until the build ends

    def build(
        self,
        onnx_path: str | Path,
        plan: PrecisionPlan,
        shapes: Mapping[str, tuple],
        timing_cache: bytes | None = None,
    ) -> BuiltEngine:
        trt = self.trt
        t0 = time.perf_counter()
        network = self._network(plan)
        self.parse(network, onnx_path)
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        if set(names) != set(shapes):
            raise UsageError(f"profile shapes cover {sorted(shapes)} but the network inputs are {sorted(names)}")

        config = self.builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_mb) << 20)
        for flag in plan.builder_flags:
            member = getattr(trt.BuilderFlag, flag, None)
            if member is None:
                raise UsageError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag}; precision plan {plan.describe()} does not fit it")
            config.set_flag(member)

        profile = self.builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

        cache = config.create_timing_cache(timing_cache or b"")
        # a cache from another GPU or TensorRT version is refused rather than mixed in (the artifact key
        # should prevent that); the build then starts from an empty cache and says so in its log
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            self.messages.append("[WARNING] gendd: the timing cache did not match this GPU / TensorRT; started an empty one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

        serialized = self.builder.build_serialized_network(network, config)
        if serialized is None:
            errors = [m for m in self.messages if m.startswith(("[ERROR]", "[INTERNAL_ERROR]"))]
            raise ArtifactError(
                f"TensorRT could not build an engine from {onnx_path} ({plan.describe()}): "
                + ("; ".join(errors[-3:]) if errors else "no error was logged; rerun with verbose=True")
            )
        new_cache = config.get_timing_cache().serialize()
        return BuiltEngine(bytes(serialized), bytes(new_cache), time.perf_counter() - t0, list(self.messages))


def fp32_engine(onnx_path: str | Path, max_batch: int = 256) -> Path:
    """An fp32 engine (batch 1 to max_batch) built from `onnx_path` and written beside it as .plan:
    how `gendd bench` and the runtime tests run TensorRT on a graph that has no engine artifact."""
    from types import SimpleNamespace

    from gendd_deploy.runtime.tensorrt import require_tensorrt, trt_major
    from gendd_deploy.spec import onnx_io
    from gendd_deploy.trt.plan import precision_plan, profile_shapes

    here = require_tensorrt("the TensorRT runtime")
    batches = SimpleNamespace(min_batch=1, opt_batch=min(32, max_batch), max_batch=max_batch)
    built = EngineBuilder().build(onnx_path, precision_plan(trt_major(here["tensorrt"]), "fp32"), profile_shapes(onnx_io(onnx_path), batches))
    out = Path(onnx_path).with_suffix(".plan")
    out.write_bytes(built.plan)
    return out
