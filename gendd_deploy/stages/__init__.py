"""The pipeline's stages, in the order `gendd run` runs them.

Each entry maps a CLI command to the Stage that writes one artifact:
teacher -> teacher, cache -> teacher_features, distill -> student, calibrate -> sampler,
export -> onnx (and aoti), build -> engine. Modules are imported on first use so that
`gendd --help` stays fast.
"""

from __future__ import annotations

import importlib

from gendd_deploy.stages.base import Context, Stage

# command -> (module, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "teacher": ("gendd_deploy.stages.teacher", "TeacherStage"),
    "cache": ("gendd_deploy.stages.cache", "CacheStage"),
    "distill": ("gendd_deploy.stages.distill", "DistillStage"),
    "calibrate": ("gendd_deploy.stages.calibrate", "CalibrateStage"),
    "export": ("gendd_deploy.stages.export", "ExportStage"),
    "build": ("gendd_deploy.stages.build", "BuildStage"),
}

ORDER = ["teacher", "cache", "distill", "calibrate", "export", "build"]

_INSTANCES: dict[str, Stage] = {}


def get(command: str) -> Stage:
    if command not in _INSTANCES:
        module, cls = _REGISTRY[command]
        _INSTANCES[command] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[command]


def run_chain(stage: Stage, ctx: Context):
    """Run a stage after (re)using every input it needs, depth first."""
    for upstream in stage.inputs(ctx).values():
        run_chain(upstream, ctx)
    return stage.run(ctx)


__all__ = ["Context", "Stage", "ORDER", "get", "run_chain"]
