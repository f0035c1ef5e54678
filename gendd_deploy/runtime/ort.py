"""ONNX Runtime runner: TensorRT / CUDA / CPU execution providers, reporting what the session uses.

onnxruntime-gpu lists providers it cannot load (no CUDA, no TensorRT libraries) and silently
falls back to the CPU, so `providers()` is the session's own list, not the requested one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gendd_deploy.errors import MissingDependency
from gendd_deploy.runtime.base import Runner

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


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, path, providers: list[str] | None = None, intra_op_threads: int | None = None, noise_shape_tail: tuple | None = None):
        """`path`: an .onnx file, or a graph in memory (an onnx.ModelProto or its bytes), which is
        how the build stage runs converted graphs it never writes to disk."""
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
        opts.intra_op_num_threads = intra_op_threads or os.cpu_count() or 1
        self.requested = requested_providers(providers) or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(source, sess_options=opts, providers=self.requested)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.images_name = self.input_names[0] if "images" not in self.input_names else "images"
        self.noise_name = "noise" if "noise" in self.input_names else None
        if noise_shape_tail is None and self.noise_name:
            # read the static tail (steps+1, draws, n, d) from the graph itself
            shape = next(i.shape for i in self.session.get_inputs() if i.name == "noise")
            if all(isinstance(s, int) for s in shape[1:]):
                noise_shape_tail = tuple(shape[1:])
        if noise_shape_tail is not None and not self.noise_name:
            raise ValueError(f"{self.path} has no 'noise' input but a noise shape {tuple(noise_shape_tail)} was given")
        super().__init__(noise_shape_tail)

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
        return {**super().describe(), "requested_providers": self.requested, "path": str(self.path)}
