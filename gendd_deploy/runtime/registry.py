"""The runtime registry: every inference runtime gendd knows, in one table.

    entry = get("onnxruntime")          # name, stage "onnx", file "model.onnx", Triton platform ...
    runner = make_runner("onnxruntime", path="model.onnx")
    runner = make_runner("torch", model=deployed_model)

An entry says which artifact stage it runs (and which file in it), its Triton platform, the command
that makes that artifact, how to build a runner from a file (or, for torch, from the PyTorch
model), and why it is unavailable on this machine. Everything that names runtimes reads this table:
the config's `runtime` fields, `gendd bench`, calibrate's timing, `gendd serve` (loaders.py), the
server's metadata and the Triton writer. Adding a runtime is one module with its `Runner` and one
`register(RuntimeEntry(...))` call; see docs/extending.md.

Runner modules are imported when a runner is made, so reading the table is cheap (the config
validates against it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from gendd_deploy.errors import MissingDependency, UsageError


@dataclass(frozen=True)
class RuntimeEntry:
    name: str  # what users type: --runtime onnxruntime
    stage: str | None  # the artifact stage whose file it runs; None: the PyTorch model an export was made from
    file: str | None  # the payload file in that artifact
    triton_platform: str  # Triton's name for the backend that serves the same file
    made_by: str | None  # the gendd command (after 'gendd ') that makes the stage's artifact
    runner: Callable[..., object]  # (path=None, spec=None, device=None, **options) -> Runner; torch: model= instead of path=
    unavailable: Callable[[], str | None]  # None when usable here, else the reason it is not
    native_code: bool = False  # loads compiled code: served only with a trusted signature (signing.py)
    what: str = ""  # what its file is, for messages: "ONNX graph", "TensorRT engine"
    bench_default: bool = True  # measured by a plain `gendd bench` (AOTInductor compiles for minutes: asked for by name)
    doc: str = ""


RUNTIMES: dict[str, RuntimeEntry] = {}


def register(entry: RuntimeEntry) -> RuntimeEntry:
    """Add (or replace) a runtime; returns the entry."""
    if entry.stage is not None and entry.file is None:
        raise ValueError(f"runtime '{entry.name}' runs {entry.stage} artifacts but names no file in them")
    RUNTIMES[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    RUNTIMES.pop(name, None)


def get(name: str) -> RuntimeEntry:
    """The entry for `name`; an unknown name is a UsageError listing the registered ones."""
    entry = RUNTIMES.get(name)
    if entry is None:
        raise UsageError(f"unknown runtime '{name}'; choose one of: {', '.join(RUNTIMES)}")
    return entry


def get_or_none(name: str) -> RuntimeEntry | None:
    return RUNTIMES.get(name)


def for_stage(stage: str) -> RuntimeEntry | None:
    """The runtime that runs artifacts of `stage` (onnx -> onnxruntime), None if none does."""
    return next((e for e in RUNTIMES.values() if e.stage == stage), None)


def servable_stages() -> list[str]:
    return [e.stage for e in RUNTIMES.values() if e.stage is not None]


def triton_platform(name: str) -> str:
    entry = RUNTIMES.get(name)
    return entry.triton_platform if entry is not None else name


def runtime_status() -> dict[str, str | None]:
    """Every registered runtime -> None if usable here, else why not (for skip reasons and `bench`)."""
    return {name: entry.unavailable() for name, entry in RUNTIMES.items()}


def available_runtimes() -> list[str]:
    return [name for name, why in runtime_status().items() if why is None]


def make_runner(kind: str, *, path=None, model=None, spec=None, device=None, **options):
    """A runner of `kind`: from `path` (the runtime's file: model.onnx, model.pt2, model.plan) or,
    for torch, from `model` (a DeployedModel). `spec` (spec.DeployedSpec) describes the model where
    the file's own inputs and outputs do not; `device` None is the runtime's default (onnxruntime:
    TensorRT > CUDA > CPU providers as available; "cpu" pins the CPU)."""
    entry = get(kind)
    why = entry.unavailable()
    if why is not None:
        raise MissingDependency(f"runtime '{kind}' is not available here: {why}")
    if entry.stage is None and model is None:
        raise ValueError(f"runtime '{kind}' needs model=... (a DeployedModel)")
    if entry.stage is not None and path is None:
        raise ValueError(f"runtime '{kind}' needs path=... (its {entry.file})")
    if entry.stage is None:
        return entry.runner(model=model, spec=spec, device=device, **options)
    return entry.runner(path=path, spec=spec, device=device, **options)


# ---- the built-in runtimes -------------------------------------------------------------------------


def _needs_module(module: str, install: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{module} is not installed ({install})"
        return None

    return check


def _torch(model=None, device=None, **_):
    from gendd_deploy.runtime.torch_runner import TorchRunner

    return TorchRunner(model, device=device or "cpu")


def _onnxruntime(path=None, spec=None, device=None, providers=None, **options):
    from gendd_deploy.runtime.ort import OrtRunner

    if providers is None and device is not None:  # an explicit cpu request must not land on a GPU provider
        providers = ["CPUExecutionProvider"] if str(device) == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return OrtRunner(path, providers=providers, spec=spec, **options)


def _aoti(path=None, spec=None, device=None, **_):
    from gendd_deploy.runtime.aoti import AotiRunner

    return AotiRunner(path, spec=spec, device=device or "cpu")


def _aoti_unavailable() -> str | None:
    from gendd_deploy.runtime.aoti import aoti_unavailable

    return aoti_unavailable()


def _tensorrt(path=None, spec=None, **options):
    from gendd_deploy.runtime.tensorrt import TrtRunner

    return TrtRunner(path, spec=spec, **options)


def _tensorrt_unavailable() -> str | None:
    from gendd_deploy.runtime.tensorrt import tensorrt_unavailable

    return tensorrt_unavailable()


register(RuntimeEntry("torch", None, None, "pytorch_libtorch", None, _torch, lambda: None, what="PyTorch model",
                      doc="PyTorch eager: the model an onnx or aoti artifact was exported from; the parity reference"))
register(RuntimeEntry("onnxruntime", "onnx", "model.onnx", "onnxruntime_onnx", "export", _onnxruntime,
                      _needs_module("onnxruntime", "pip install onnxruntime"), what="ONNX graph", doc="ONNX Runtime on its best available providers"))
register(RuntimeEntry("aoti", "aoti", "model.pt2", "torch_aoti", "export --aoti", _aoti, _aoti_unavailable, native_code=True, what="AOTInductor package", bench_default=False,
                      doc="an AOTInductor package: compiled C++ for the CPU (or GPU) it was built on"))
register(RuntimeEntry("tensorrt", "engine", "model.plan", "tensorrt_plan", "build", _tensorrt, _tensorrt_unavailable, native_code=True, what="TensorRT engine",
                      doc="a TensorRT engine for the GPU and TensorRT version it was built with"))
