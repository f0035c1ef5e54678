"""Load what the stages wrote: teacher, student, the deployed model and its runners, from artifacts.

The layer below `stages/`: runtime, serve, bench and the stages themselves load through it, and it
imports nothing from `stages/` (tests/test_layers.py checks the direction). Weights load with
`torch.load(weights_only=True)`: nothing under the artifact root is ever unpickled.
"""

from __future__ import annotations

import torch
from torch import nn

from gendd_deploy.artifacts import Artifact, Store
from gendd_deploy.errors import ArtifactError
from gendd_deploy.models import backbone as bb
from gendd_deploy.models.deployed import DeployedModel, SamplerSetting
from gendd_deploy.models.student import GenDDStudent

ONNX_FILE = "model.onnx"
AOTI_FILE = "model.pt2"


def load_teacher(art: Artifact, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the frozen teacher from its artifact (eval mode, no grad)."""
    model = bb.build_from_architecture(art.manifest["info"]["architecture"])
    model.load_state_dict(torch.load(art.file("model.pt"), map_location="cpu", weights_only=True))
    model.eval().requires_grad_(False)
    return model.to(device)


def load_student(art: Artifact, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a student (GenDDStudent or bare backbone) from its artifact, in eval mode."""
    info = art.manifest["info"]
    backbone = bb.build_from_architecture(info["architecture"])
    if info["method"] == "gendd":
        h = info["head"]
        fc = nn.Linear(h["teacher_dim"], info["architecture"]["num_classes"])
        model = GenDDStudent(backbone, fc, h["width"], h["depth"], h["token_dim"], h["train_timesteps"])
    else:
        model = backbone
    model.load_state_dict(torch.load(art.file("model.pt"), map_location="cpu", weights_only=True))
    if info.get("readouts"):
        # fitted read-outs live beside the weights (readouts.pt), not in the student's state_dict
        flat = torch.load(art.file("readouts.pt"), map_location="cpu", weights_only=True)
        heads = {}
        for name, shape in info["readouts"].items():
            lin = nn.Linear(shape["in_features"], shape["out_features"])
            lin.load_state_dict({"weight": flat[f"{name}.weight"], "bias": flat[f"{name}.bias"]})
            heads[name] = lin
        model.readouts = nn.ModuleDict(heads)
    return model.eval().requires_grad_(False).to(device)


def deployed_from_artifacts(student_art: Artifact, sampler_art: Artifact | None = None, device: str | torch.device = "cpu") -> DeployedModel:
    """The shipped module: a GenDD student with its calibrated sampler, or a kd / ce student as is."""
    student = load_student(student_art, device)
    if not isinstance(student, GenDDStudent):
        return DeployedModel(student).eval()
    if sampler_art is None:
        raise ArtifactError(f"{student_art.ref} is a GenDD student and needs a sampler artifact; run 'gendd calibrate'")
    parents = {i.get("fingerprint") for i in sampler_art.manifest.get("inputs", []) if i.get("stage") == "student"}
    if student_art.fingerprint not in parents:
        raise ArtifactError(
            f"sampler {sampler_art.ref} was calibrated for another student than {student_art.ref} ({student_art.short}); "
            "run 'gendd calibrate' for this student"
        )
    info = sampler_art.manifest.get("info", {})
    if not info.get("setting"):
        raise ArtifactError(f"sampler {sampler_art.ref} holds no sampler setting; run 'gendd calibrate' for {student_art.ref}")
    setting = SamplerSetting.from_dict(info["setting"])
    return DeployedModel(student, setting, int(info.get("fixed_noise_seed") or 0)).eval().to(device)


def input_artifact(store: Store, art: Artifact, stage: str) -> Artifact | None:
    for i in art.manifest.get("inputs", []):
        if i.get("stage") == stage and "version" in i:
            found = store.find(i.get("pipeline", art.pipeline), stage, i["fingerprint"])
            if found is None:
                raise ArtifactError(f"{art.ref} was made from {stage} {i['fingerprint'][:8]}, which is no longer in {store.root}")
            return found
    return None


def deployed_from_export(art: Artifact, store: Store | None = None, device: str | torch.device = "cpu") -> DeployedModel:
    """The PyTorch model an onnx / aoti artifact was exported from (from its student and sampler inputs)."""
    store = store or Store(art.path.parents[2])  # <root>/<pipeline>/<stage>/<version>
    student = input_artifact(store, art, "student")
    if student is None:
        raise ArtifactError(f"{art.ref} records no student input; re-export it with 'gendd export'")
    return deployed_from_artifacts(student, input_artifact(store, art, "sampler"), device)


def noise_tail(art: Artifact) -> tuple | None:
    info = art.manifest.get("info", {})
    return tuple(info["noise_shape_tail"]) if info.get("needs_noise") else None


def load_onnx_runner(onnx_art: Artifact, providers: list[str] | None = None):
    """An OrtRunner for the artifact's model.onnx, its noise shape taken from the manifest."""
    from gendd_deploy.runtime.ort import OrtRunner

    return OrtRunner(onnx_art.file(ONNX_FILE), providers=providers, noise_shape_tail=noise_tail(onnx_art))


def load_aoti_runner(aoti_art: Artifact, device: str = "cpu"):
    from gendd_deploy.runtime.aoti import AotiRunner

    return AotiRunner(aoti_art.file(AOTI_FILE), noise_shape_tail=noise_tail(aoti_art), device=device)
