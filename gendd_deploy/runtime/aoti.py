"""AOTInductor: `export_aoti` compiles a DeployedModel into a `.pt2` package (torch.export +
`aoti_compile_and_package`); `AotiRunner` loads it with `aoti_load_package` and runs it without
the model's Python code. The package carries its own io description as AOTI metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from torch._inductor import config

from gendd_deploy.errors import MissingDependency
from gendd_deploy.models.deployed import DeployedModel
from gendd_deploy.runtime.base import Runner
from gendd_deploy.runtime.onnx_export import traceable
from gendd_deploy.spec import DeployedSpec

MAX_BATCH = 1024  # largest batch the compiled package accepts
_META_KEY = "gendd_io"


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor would use on the CPU, if one is on PATH."""

    name = config.cpp.cxx[0] if isinstance(config.cpp.cxx, tuple) else config.cpp.cxx
    for cand in [c for c in (name, os.environ.get("CXX"), "g++", "c++", "clang++") if c]:
        if shutil.which(cand):
            return cand
    return None


def aoti_unavailable() -> str | None:
    """None when AOTInductor packages can be built and run here, else why not."""
    if not hasattr(torch._inductor, "aoti_load_package"):
        return f"torch {torch.__version__} has no AOTInductor packages"
    if cxx_compiler() is None:
        return "AOTInductor needs a C++ compiler (g++ / clang++) to build packages"
    return None


def export_aoti(model: DeployedModel, path: str | Path, example_images: torch.Tensor, max_batch: int = MAX_BATCH) -> dict:
    """Compile `model` for the device of its parameters into the package `path` (written atomically)."""
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        raise MissingDependency(f"torch {torch.__version__} has no AOTInductor packaging; use torch >= 2.6")
    device = next(iter(model.parameters()), torch.empty(0)).device
    if device.type == "cpu" and cxx_compiler() is None:
        raise MissingDependency("AOTInductor needs a C++ compiler on the CPU (g++ or clang++); install one or skip --aoti")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module, inputs, outputs, args = traceable(model, example_images)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    t0 = time.perf_counter()
    with torch.no_grad():
        num_classes = int(module(*args).shape[1])
        ep = torch.export.export(module, args, dynamic_shapes={name: {0: batch} for name in inputs}, strict=False)
    io = {
        "inputs": [{"name": n, "dtype": "float32", "shape": ["batch", *a.shape[1:]]} for n, a in zip(inputs, args)],
        "outputs": [{"name": outputs[0], "dtype": "float32", "shape": ["batch", num_classes]}],
        "max_batch": max_batch,
        "device": device.type,
    }
    meta = {_META_KEY: json.dumps(io)}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part.pt2")
    try:
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs={"aot_inductor.metadata": meta})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    io.update(compile_s=round(time.perf_counter() - t0, 2), bytes=path.stat().st_size, torch=torch.__version__)
    return io


class AotiRunner(Runner):
    name = "aoti"

    def __init__(self, path: str | Path, spec: DeployedSpec | None = None, device: str | torch.device = "cpu"):
        """`spec`: the deployed model's description from its manifest; by default the io the
        package carries in its metadata (export_aoti writes it)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no AOTInductor package at {self.path}")
        self.device = torch.device(device)
        self.model = torch._inductor.aoti_load_package(str(self.path))
        self.io = self._io()
        self.spec = spec or DeployedSpec.from_io(self.io)
        super().__init__(self.spec.noise_tail)

    def _io(self) -> dict:
        try:
            return json.loads(self.model.get_metadata().get(_META_KEY, "{}"))
        except (AttributeError, RuntimeError, ValueError):
            return {}

    @torch.no_grad()
    def run(self, images: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        args = [torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)]
        if self.needs_noise:
            if noise is None:
                raise ValueError(f"{self.path.name} needs a noise input of shape (B, {', '.join(map(str, self.noise_shape_tail))})")
            args.append(torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32)).to(self.device))
        out = self.model(*args)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.float().cpu().numpy()

    def providers(self) -> list[str]:
        return [self.device.type.upper()]
