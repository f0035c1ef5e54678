"""TensorRT at run time: what this machine has (`require_tensorrt`, `local_identity`), whether an
engine fits it (`check_compatible`), and `TrtRunner`, a `Runner` over execute_async_v3 on torch
CUDA tensors (TensorRT 10 / 11).

    ident = require_tensorrt()                   # {"tensorrt": "10.9.0", "cuda": "12.8", "gpu": ..., "gpu_capability": "9.0"}
    runner = TrtRunner(engine_artifact)          # or a model.plan path (its manifest.json is read if beside it)
    logits = runner.run(images, runner.noise(len(images), seed=0))

TensorRT is optional and GPU-only: nothing here imports `tensorrt` at import time, and
`require_tensorrt()` is the one place that looks for it (and for a GPU) and refuses with a single
line naming what is missing and how to install it. The engine builder (gendd_deploy/trt/) depends
on this module, never the reverse. An engine from an artifact (or a plan with its manifest beside
it) is checked against this machine first: another TensorRT version or GPU is refused with both
sides named. Batches larger than the profile's max are split; smaller than its min are zero-padded
and trimmed.
"""

from __future__ import annotations

import importlib
import json
import re
import threading
from importlib import metadata
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from gendd_deploy import seeds
from gendd_deploy.artifacts import MANIFEST, Artifact
from gendd_deploy.errors import ArtifactError, MissingDependency, UsageError
from gendd_deploy.runtime.base import Runner
from gendd_deploy.runtime.timing import summary
from gendd_deploy.spec import DeployedSpec

ENGINE_FILE = "model.plan"
IDENTITY_KEYS = ("tensorrt", "gpu", "gpu_capability")  # what an engine is tied to


def trt_major(version: str) -> int:
    """'10.9.0.34' -> 10."""
    m = re.match(r"^\s*(\d+)", str(version))
    if not m:
        raise UsageError(f"cannot read a TensorRT major version from '{version}'")
    return int(m.group(1))


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



def tensorrt_unavailable() -> str | None:
    """None when TensorRT 10/11 and a GPU are usable here, else why not (one line)."""
    try:
        require_tensorrt("the TensorRT runtime")
    except MissingDependency as e:
        return str(e)
    return None


# ---- whether an engine fits this machine


def _side(d: Mapping) -> str:
    gpu = d.get("gpu") or "no GPU"
    cap = f" (compute capability {d['gpu_capability']})" if d.get("gpu_capability") else ""
    trt = f"TensorRT {d['tensorrt']}" if d.get("tensorrt") else "no TensorRT"
    cuda = f", CUDA {d['cuda']}" if d.get("cuda") else ""
    return f"{trt}{cuda} on {gpu}{cap}"


def check_compatible(engine_info: Mapping, here: Mapping, rebuild_hint: str = "gendd build") -> None:
    """Refuse an engine built for another TensorRT version or GPU, naming both sides.

    Plans are tied to the exact TensorRT version and to the device they were tuned on; CUDA minor
    versions are recorded but not compared (TensorRT's own compatibility rules cover them).
    """
    missing = [k for k in IDENTITY_KEYS if not engine_info.get(k)]
    if missing:
        raise ArtifactError(f"engine manifest lacks {', '.join(missing)}; it cannot be checked against this machine; rebuild it: {rebuild_hint}")
    differ = [k for k in IDENTITY_KEYS if str(engine_info.get(k)) != str(here.get(k))]
    if differ:
        what = {"tensorrt": "TensorRT version", "gpu": "GPU", "gpu_capability": "compute capability"}
        raise ArtifactError(
            f"engine built with {_side(engine_info)} cannot run with {_side(here)} "
            f"(different {', '.join(what[k] for k in differ)}); rebuild it on this machine: {rebuild_hint}"
        )



# ---- the runner


def _torch_dtype(trt, dt):

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "BOOL": torch.bool, "UINT8": torch.uint8}
    name = getattr(dt, "name", str(dt).split(".")[-1])
    if name not in table:
        raise UsageError(f"engine tensor type {name} is not supported by the runner")
    return table[name]


def _engine_source(engine) -> tuple[Path, dict | None, str]:
    """(plan path, engine manifest info or None, rebuild hint)."""
    if isinstance(engine, Artifact):
        return engine.file(ENGINE_FILE), engine.manifest.get("info", {}), f"delete {engine.path} and run 'gendd build'"
    path = Path(engine)
    if path.is_dir():
        path = path / ENGINE_FILE
    if not path.is_file():
        raise UsageError(f"engine file {path} not found; build one with 'gendd build'")
    manifest = path.parent / MANIFEST
    info = json.loads(manifest.read_text()).get("info", {}) if manifest.is_file() else None
    return path, info, "gendd build"


class TrtRunner(Runner):
    name = "tensorrt"

    def __init__(self, engine, spec: DeployedSpec | None = None, check: bool = True, device: int = 0):
        """`spec`: the deployed model's description; by default the engine manifest's (as the build
        copied it from the onnx artifact), else the engine's own tensors."""
        require_tensorrt("the TensorRT runner")

        trt = import_tensorrt()
        self.trt = trt
        path, info, hint = _engine_source(engine)
        self.info = info or {}
        if check and info is not None:
            here = {"tensorrt": trt.__version__, "cuda": torch.version.cuda,
                    "gpu": torch.cuda.get_device_name(device),
                    "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(device)))}
            check_compatible(info, here, hint)

        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT {trt.__version__} could not deserialize {path}; it was built by another TensorRT version or is corrupt: rebuild with 'gendd build'")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
        if len(self.outputs) != 1:
            raise ArtifactError(f"engine {path} has outputs {self.outputs}; expected one (logits)")
        if spec is None and info:
            spec = DeployedSpec.from_manifest(info, str(path.parent))
        if spec is None:
            entry = lambda n: {"name": n, "dtype": "float32", "shape": list(self.engine.get_tensor_shape(n))}  # noqa: E731
            spec = DeployedSpec.from_io({"inputs": [entry(n) for n in self.inputs], "outputs": [entry(n) for n in self.outputs]})
        self.spec = spec
        if [t.name for t in spec.inputs] != self.inputs:
            raise UsageError(f"engine inputs are {self.inputs} but its description names {[t.name for t in spec.inputs]}; rebuild it with 'gendd build'")
        super().__init__(spec.noise_tail)
        self.images_name = spec.images.name
        self.noise_name = spec.noise.name if spec.noise else None
        lo, _, hi = self.engine.get_tensor_profile_shape(self.images_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self._lock = threading.Lock()  # one execution context: one batch at a time
        self._stream = torch.cuda.Stream(device=self.device)

    def providers(self) -> list[str]:

        return [f"TensorRT {self.trt.__version__} on {torch.cuda.get_device_name(self.device)}"]

    def run_torch(self, images, noise=None):
        """CUDA tensors in, CUDA float32 logits out; no host copies (for latency and serving on GPU)."""

        n = images.shape[0]
        if n > self.max_batch:
            parts = [self.run_torch(images[s : s + self.max_batch], None if noise is None else noise[s : s + self.max_batch])
                     for s in range(0, n, self.max_batch)]
            return torch.cat(parts)
        pad = max(0, self.min_batch - n)
        feeds = {self.images_name: images}
        if self.needs_noise:
            if noise is None:
                raise UsageError(f"this engine needs a noise input of shape {(n,) + self.noise_shape_tail}")
            feeds[self.noise_name] = noise
        with self._lock, torch.cuda.stream(self._stream):
            bufs = []
            for name, x in feeds.items():
                want = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
                x = x.to(self.device, want).contiguous()
                if pad:
                    x = torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))])
                self.context.set_input_shape(name, tuple(x.shape))
                self.context.set_tensor_address(name, x.data_ptr())
                bufs.append(x)  # keep alive until the stream is done
            out_name = self.outputs[0]
            out = torch.empty(tuple(self.context.get_tensor_shape(out_name)),
                              dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(out_name)), device=self.device)
            self.context.set_tensor_address(out_name, out.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise ArtifactError("TensorRT execute_async_v3 failed; see the TensorRT log above")
            self._stream.synchronize()
        return out[:n].float()

    def run(self, images: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        z = torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32)) if noise is not None else None
        return self.run_torch(x, z).cpu().numpy()

    def latency_ms(self, batch: int, iters: int = 50, warmup: int = 10, seed: int = 0) -> dict:
        """Milliseconds per batch of random inputs, timed with CUDA events on device tensors:
        {"batch", **runtime.timing.summary} (p50 / p90 / p95 / p99 / mean / n)."""

        shape = tuple(self.engine.get_tensor_profile_shape(self.images_name, 0)[1])[1:]
        g = seeds.generator(seed)
        x = torch.randn((batch,) + shape, generator=g).to(self.device)
        z = torch.randn((batch,) + self.noise_shape_tail, generator=g).to(self.device) if self.needs_noise else None
        for _ in range(warmup):
            self.run_torch(x, z)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self._stream)
            self.run_torch(x, z)
            end.record(self._stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return {"batch": batch, **summary(times)}
