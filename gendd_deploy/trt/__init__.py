"""TensorRT engines: precision plan, ONNX precision conversion, builder and runner.

TensorRT is optional and GPU-only. Nothing in this package imports `tensorrt` at import time:
`require_tensorrt()` is the one place that looks for it (and for a GPU) and refuses with a single
line naming what is missing and how to install it, before any stage opens a draft.

    ident = require_tensorrt()          # {"tensorrt": "10.9.0", "tensorrt_cuda": "12", "cuda": "12.8", "gpu": ..., "gpu_capability": "9.0"}
    plan = precision_plan(trt_major(ident["tensorrt"]), "fp16")
    built = EngineBuilder(workspace_mb=4096).build("model.onnx", plan, shapes, timing_cache=None)
    logits = TrtRunner(engine_artifact).run(images, noise)
"""

from __future__ import annotations

import importlib
from importlib import metadata

import torch

from gendd_deploy.errors import MissingDependency
from gendd_deploy.trt.plan import trt_major

INSTALL_HINT = "pip install 'gendd-deploy[trt]'"
SUPPORTED_MAJORS = (10, 11)


def import_tensorrt():
    """The `tensorrt` module; raises ImportError (or OSError for missing CUDA libraries)."""
    return importlib.import_module("tensorrt")


def _gpu() -> tuple[str | None, str | None, str | None]:
    """(name, compute capability 'M.m', CUDA runtime version) of GPU 0, or Nones without one."""

    if not torch.cuda.is_available():
        return None, None, None
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"{major}.{minor}", torch.version.cuda


def _tensorrt_cuda() -> str | None:
    """CUDA major version of the installed TensorRT wheels ('12' for tensorrt-cu12), if known."""

    for major in ("13", "12", "11"):
        for dist in (f"tensorrt-cu{major}", f"tensorrt_cu{major}_libs"):
            try:
                metadata.version(dist)
                return major
            except metadata.PackageNotFoundError:
                continue
    return None


def local_identity() -> dict:
    """What an engine is tied to, on this machine; None where absent (no TensorRT, no GPU)."""
    try:
        version = import_tensorrt().__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        version = None
    gpu, capability, cuda = _gpu()
    return {"tensorrt": version, "tensorrt_cuda": _tensorrt_cuda(), "cuda": cuda, "gpu": gpu, "gpu_capability": capability}


def require_tensorrt(command: str = "gendd build") -> dict:
    """`local_identity()` when TensorRT 10/11 and a CUDA GPU are both usable, else MissingDependency (one line)."""
    missing = []
    version = None
    try:
        version = import_tensorrt().__version__
    except Exception as e:  # noqa: BLE001
        missing.append(f"TensorRT is not installed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'import failed'})")
    if version is not None:
        if trt_major(version) not in SUPPORTED_MAJORS:
            missing.append(f"TensorRT {version} is installed but gendd supports TensorRT 10.x and 11.x")
    gpu, capability, cuda = _gpu()
    if gpu is None:
        missing.append("no NVIDIA GPU is visible (torch.cuda.is_available() is False)")
    if missing:
        raise MissingDependency(
            f"{command} needs TensorRT 10/11 and an NVIDIA GPU: {'; '.join(missing)}. "
            f"Install TensorRT with {INSTALL_HINT} and run on a machine with an NVIDIA GPU and its driver "
            f"(export to ONNX and serve with ONNX Runtime work without them)"
        )
    # cuda: the CUDA runtime torch runs on; tensorrt_cuda: the CUDA build of the TensorRT wheels
    return {"tensorrt": version, "tensorrt_cuda": _tensorrt_cuda(), "cuda": cuda, "gpu": gpu, "gpu_capability": capability}


__all__ = ["INSTALL_HINT", "SUPPORTED_MAJORS", "import_tensorrt", "local_identity", "require_tensorrt"]
