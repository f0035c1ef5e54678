"""Inference runtimes behind one small interface (`runtime.base.Runner`), listed in one registry.

    runner = make_runner("onnxruntime", path="model.onnx")
    logits = runner.run(images, runner.noise(len(images), seed=0))

`registry.py` is the table of runtimes (name, the artifact stage and file it runs, its Triton
platform, how to make a runner, why it is unavailable here); everything that names a runtime reads
it. Importing this package is cheap: runner modules (torch, onnxruntime, TensorRT) load on use.
"""

from __future__ import annotations

from gendd_deploy.runtime.base import Runner, make_noise
from gendd_deploy.runtime.registry import (
    RUNTIMES,
    RuntimeEntry,
    available_runtimes,
    make_runner,
    register,
    runtime_status,
    unregister,
)

__all__ = ["RUNTIMES", "Runner", "RuntimeEntry", "available_runtimes", "make_noise", "make_runner", "register", "runtime_status", "unregister"]
