"""ONNX Runtime runner: TensorRT / CUDA / CPU execution providers, reporting what the session uses.

onnxruntime-gpu lists providers it cannot load (no CUDA, no TensorRT libraries) and silently
falls back to the CPU, so `providers()` is the session's own list, not the requested one.

Threads: intra-op threads default to the CPUs this process may use (`usable_cpus`: affinity and
cgroup quota, not the machine's count), and the intra-op pool does not spin by default. ONNX
Runtime's own default lets each session's idle workers spin-wait for the next run; with several
sessions in one process (several models served, or a benchmark timing models in turn) they steal
the cores the running session needs. Measured on the Fashion-MNIST student on 2 CPUs, four
sessions timed in turn: batch 32 took 13.4 ms with spinning and 3.7 ms without (docs/results.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gendd_deploy.errors import ArtifactError, MissingDependency
from gendd_deploy.runtime.base import Runner
from gendd_deploy.spec import DeployedSpec

PREFERRED = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


def requested_providers(providers: list[str] | None = None) -> list[str]:
    """The asked-for providers (default: TensorRT, CUDA, CPU) that this onnxruntime build has."""
    have = set(_ort().get_available_providers())
    return [p for p in (providers or PREFERRED) if p in have]


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _entry(arg) -> dict:
    """An ONNX Runtime NodeArg as a spec tensor entry {name, dtype, shape}."""
    return {"name": arg.name, "dtype": _ORT_TYPES.get(arg.type, arg.type), "shape": list(arg.shape)}


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a
    container limited to 2 CPUs on a 64-core host gets 2, not 64)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(
        self,
        path,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        spec: DeployedSpec | None = None,
        *,
        inter_op_threads: int | None = None,
        spinning: bool = False,
    ):
        """`path`: an .onnx file, or a graph in memory (an onnx.ModelProto or its bytes), which is
        how the build stage runs converted graphs it never writes to disk. `spec`: the deployed
        model's description from its manifest; by default the graph's own inputs and outputs."""
        ort = _ort()
        if hasattr(path, "SerializeToString"):
            path = path.SerializeToString()
        if isinstance(path, bytes):
            self.path, source = Path("<in-memory graph>"), path
        else:
            self.path = Path(path)
            if not self.path.is_file():
                raise FileNotFoundError(f"no ONNX model at {self.path}")
            source = str(self.path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = intra_op_threads or usable_cpus()
        if inter_op_threads:
            opts.inter_op_num_threads = inter_op_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.threads = {"intra_op": opts.intra_op_num_threads, "inter_op": inter_op_threads or 0, "spinning": spinning}
        self.requested = requested_providers(providers) or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(source, sess_options=opts, providers=self.requested)
        graph = DeployedSpec.from_io({"inputs": [_entry(a) for a in self.session.get_inputs()], "outputs": [_entry(a) for a in self.session.get_outputs()]})
        self.spec = spec or graph
        if [t.name for t in self.spec.inputs] != [t.name for t in graph.inputs]:
            raise ArtifactError(f"{self.path} takes inputs {[t.name for t in graph.inputs]}, its manifest says {[t.name for t in self.spec.inputs]}; re-export it")
        self.images_name = self.spec.images.name
        self.noise_name = self.spec.noise.name if self.spec.noise else None
        self.output_names = [t.name for t in self.spec.outputs]
        super().__init__(self.spec.noise_tail)

    def run(self, images: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        feeds = {self.images_name: np.ascontiguousarray(images, dtype=np.float32)}
        if self.noise_name:
            if noise is None:
                raise ValueError(f"{self.path.name} needs a 'noise' input of shape (B, {', '.join(map(str, self.noise_shape_tail or ()))})")
            feeds[self.noise_name] = np.ascontiguousarray(noise, dtype=np.float32)
        return self.session.run(self.output_names[:1], feeds)[0]

    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def describe(self) -> dict:
        return {**super().describe(), "requested_providers": self.requested, "path": str(self.path), "threads": self.threads}
