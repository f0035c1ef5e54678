"""Inference runtimes behind one small interface (`runtime.base.Runner`).

    runner = make_runner("onnxruntime", onnx_path="model.onnx")
    logits = runner.run(images, runner.noise(len(images), seed=0))

`RUNTIMES` is the registry: name -> (factory, availability check). A new runtime registers itself
with `register_runtime` (TensorRT is registered below: its factory reads `engine_path=` or
`onnx_path=` from the keyword arguments of `make_runner`, and where TensorRT or a GPU is absent
`runtime_status()` says why); tests and `gendd bench` are parametrized over `available_runtimes()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from gendd_deploy.errors import MissingDependency, UsageError
from gendd_deploy.runtime.aoti import AotiRunner, cxx_compiler
from gendd_deploy.runtime.base import Runner, make_noise
from gendd_deploy.runtime.ort import OrtRunner
from gendd_deploy.runtime.torch_runner import TorchRunner
from gendd_deploy.trt import require_tensorrt


@dataclass(frozen=True)
class RuntimeSpec:
    factory: Callable[..., Runner]  # keyword arguments: model, onnx_path, aoti_path, device, ...
    unavailable: Callable[[], str | None]  # None when usable here, else the reason it is not


RUNTIMES: dict[str, RuntimeSpec] = {}


def register_runtime(name: str, factory: Callable[..., Runner], unavailable: Callable[[], str | None]) -> None:
    RUNTIMES[name] = RuntimeSpec(factory, unavailable)


def _need(kind: str, what: str, value):
    if value is None:
        raise ValueError(f"runtime '{kind}' needs {what}=...")
    return value


# ---- torch

def _torch_runner(model=None, device="cpu", **_):
    """From a DeployedModel (loaders.runner_for_artifact rebuilds one from an artifact)."""
    return TorchRunner(_need("torch", "model", model), device=device)


def _torch_unavailable() -> str | None:
    return None


# ---- onnxruntime

def _ort_runner(onnx_path=None, device="cpu", providers=None, spec=None, path=None, **_):
    if providers is None and str(device) == "cpu":
        providers = ["CPUExecutionProvider"]  # an explicit cpu request must not land on a GPU provider
    return OrtRunner(_need("onnxruntime", "onnx_path", onnx_path or path), providers=providers, spec=spec)


def _ort_unavailable() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    return None


# ---- AOTInductor

def _aoti_runner(aoti_path=None, device="cpu", spec=None, path=None, **_):
    return AotiRunner(_need("aoti", "aoti_path", aoti_path or path), spec=spec, device=device)


def _aoti_unavailable() -> str | None:
    if not hasattr(torch._inductor, "aoti_load_package"):
        return f"torch {torch.__version__} has no AOTInductor packages"
    if cxx_compiler() is None:
        return "AOTInductor needs a C++ compiler (g++ / clang++) to build packages"
    return None


# ---- TensorRT (optional, NVIDIA GPUs only)

def _trt_runner(engine_path=None, onnx_path=None, path=None, spec=None, max_batch: int = 256, **_):
    """From an engine (`engine_path`: a plan file or an engine artifact folder, as `gendd build`
    writes), or from `onnx_path`, built here into an fp32 engine beside it (batch 1 to max_batch)."""
    # imported on use: trt.runner imports runtime.base, which runs this package's __init__ first
    from gendd_deploy.trt.runner import TrtRunner

    engine = engine_path or path
    if engine is None:
        engine = _fp32_engine(_need("tensorrt", "engine_path or onnx_path", onnx_path), max_batch)
    return TrtRunner(engine, spec=spec)


def _fp32_engine(onnx_path, max_batch: int):
    from gendd_deploy.trt.builder import EngineBuilder  # imported on use, as trt.runner above
    from gendd_deploy.spec import onnx_io
    from gendd_deploy.trt.plan import precision_plan, profile_shapes, trt_major

    here = require_tensorrt("the TensorRT runtime")
    batches = SimpleNamespace(min_batch=1, opt_batch=min(32, max_batch), max_batch=max_batch)
    built = EngineBuilder().build(onnx_path, precision_plan(trt_major(here["tensorrt"]), "fp32"), profile_shapes(onnx_io(onnx_path), batches))
    out = Path(onnx_path).with_suffix(".plan")
    out.write_bytes(built.plan)
    return out


def _trt_unavailable() -> str | None:
    try:
        require_tensorrt("the TensorRT runtime")
    except MissingDependency as e:
        return str(e)
    return None


register_runtime("torch", _torch_runner, _torch_unavailable)
register_runtime("onnxruntime", _ort_runner, _ort_unavailable)
register_runtime("aoti", _aoti_runner, _aoti_unavailable)
register_runtime("tensorrt", _trt_runner, _trt_unavailable)


def runtime_status() -> dict[str, str | None]:
    """Every registered runtime -> None if usable here, else why not (for skip reasons and `bench`)."""
    return {name: spec.unavailable() for name, spec in RUNTIMES.items()}


def available_runtimes() -> list[str]:
    return [name for name, why in runtime_status().items() if why is None]


def make_runner(kind: str, *, model=None, onnx_path=None, aoti_path=None, device: str = "cpu", **kwargs) -> Runner:
    """A runner of `kind` ("torch", "onnxruntime", "aoti", or any registered runtime).

    torch takes `model` (or `artifact=` an onnx / aoti artifact); onnxruntime `onnx_path` (or `path`;
    device "cpu" pins the CPU provider, else TensorRT > CUDA > CPU as available, or `providers=`);
    aoti `aoti_path` (or `path`). `spec=` (spec.DeployedSpec) describes the model where the file's
    own inputs and outputs do not suffice.
    """
    if kind not in RUNTIMES:
        raise UsageError(f"unknown runtime '{kind}'; choose one of: {', '.join(RUNTIMES)}")
    why = RUNTIMES[kind].unavailable()
    if why is not None:
        raise MissingDependency(f"runtime '{kind}' is not available here: {why}")
    return RUNTIMES[kind].factory(model=model, onnx_path=onnx_path, aoti_path=aoti_path, device=device, **kwargs)


__all__ = ["RUNTIMES", "Runner", "available_runtimes", "make_noise", "make_runner", "register_runtime", "runtime_status"]
