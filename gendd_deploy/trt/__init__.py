"""TensorRT engines, build side: precision plan, ONNX precision conversion and the builder.

TensorRT is optional and GPU-only. What this machine has, whether an engine fits it and the
runner live in gendd_deploy/runtime/tensorrt.py: this package depends on the runtime, never the
reverse. `require_tensorrt()` refuses with a single line naming what is missing and how to
install it, before any stage opens a draft.

    ident = require_tensorrt()          # {"tensorrt": "10.9.0", "tensorrt_cuda": "12", "cuda": "12.8", "gpu": ..., "gpu_capability": "9.0"}
    plan = precision_plan(trt_major(ident["tensorrt"]), "fp16")
    built = EngineBuilder(workspace_mb=4096).build("model.onnx", plan, shapes, timing_cache=None)
    logits = make_runner("tensorrt", path="model.plan").run(images, noise)
"""

from __future__ import annotations

from gendd_deploy.runtime.tensorrt import INSTALL_HINT, SUPPORTED_MAJORS, import_tensorrt, local_identity, require_tensorrt

__all__ = ["INSTALL_HINT", "SUPPORTED_MAJORS", "import_tensorrt", "local_identity", "require_tensorrt"]
