"""Load what the stages wrote: teacher, student, the deployed model and its runners, from artifacts.

The layer below `stages/`: runtime, serve, bench and the stages themselves load through it, and it
imports nothing from `stages/` (tests/test_layers.py checks the direction). Weights load with
`torch.load(weights_only=True)`: nothing under the artifact root is ever unpickled.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from gendd_deploy.artifacts import Artifact, Store
from gendd_deploy.errors import ArtifactError, UsageError
from gendd_deploy.models import backbone as bb
from gendd_deploy.models.deployed import DeployedModel, SamplerSetting
from gendd_deploy.models.student import GenDDStudent, HeadSpec
from gendd_deploy.runtime.aoti import AotiRunner
from gendd_deploy.runtime.ort import OrtRunner
from gendd_deploy.runtime.torch_runner import TorchRunner
from gendd_deploy.signing import require_trusted
from gendd_deploy.spec import DeployedSpec
from gendd_deploy.trt.runner import TrtRunner  # refuses a machine without TensorRT / a GPU, naming why

ONNX_FILE = "model.onnx"
AOTI_FILE = "model.pt2"


def load_tensors(art: Artifact, name: str) -> dict:
    """A dict of tensors saved by torch.save, read with weights_only=True (never unpickling
    objects); anything else in its place is an ArtifactError naming the file and the fix."""
    try:
        obj = torch.load(art.file(name), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, KeyError, AttributeError, TypeError) as e:
        raise ArtifactError(f"{art.ref}: {name} is not a plain tensor file ({type(e).__name__}); delete {art.path} and rebuild it") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ArtifactError(f"{art.ref}: {name} does not hold a dict of tensors; delete {art.path} and rebuild it")
    return obj


def load_array(art: Artifact, name: str, mmap: bool = True) -> np.ndarray:
    """A .npy payload, memory-mapped, never with pickled objects; a bad file is an ArtifactError."""
    try:
        return np.load(art.file(name), mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{art.ref}: {name} is not a plain numeric array ({e}); delete {art.path} and rebuild it") from None


def _load_state(model: nn.Module, state: dict, art: Artifact) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shapes or names that do not fit the architecture the manifest names
        raise ArtifactError(f"{art.ref}: model.pt does not fit its manifest's architecture ({str(e).splitlines()[0]}); delete {art.path} and rebuild it") from None


def load_teacher(art: Artifact, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the frozen teacher from its artifact (eval mode, no grad)."""
    model = bb.build_from_architecture(art.manifest["info"]["architecture"])
    _load_state(model, load_tensors(art, "model.pt"), art)
    model.eval().requires_grad_(False)
    return model.to(device)


def load_student(art: Artifact, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a student (GenDDStudent or bare backbone) from its artifact, in eval mode."""
    info = art.manifest["info"]
    backbone = bb.build_from_architecture(info["architecture"])
    if info["method"] == "gendd":
        spec = HeadSpec.from_manifest(info["head"])
        model = GenDDStudent(backbone, nn.Linear(spec.teacher_dim, info["architecture"]["num_classes"]), spec)
    else:
        model = backbone
    _load_state(model, load_tensors(art, "model.pt"), art)
    if info.get("readouts"):
        # fitted read-outs live beside the weights (readouts.pt), not in the student's state_dict
        flat = load_tensors(art, "readouts.pt")
        heads = {}
        for name, shape in info["readouts"].items():
            lin = nn.Linear(shape["in_features"], shape["out_features"])
            try:
                lin.load_state_dict({"weight": flat[f"{name}.weight"], "bias": flat[f"{name}.bias"]})
            except (KeyError, RuntimeError):
                raise ArtifactError(f"{art.ref}: readouts.pt has no fitting '{name}' read-out; delete {art.path} and rerun 'gendd distill'") from None
            heads[name] = lin
        model.readouts = nn.ModuleDict(heads)
    return model.eval().requires_grad_(False).to(device)


def deployed_from_artifacts(student_art: Artifact, sampler_art: Artifact | None = None, device: str | torch.device = "cpu") -> DeployedModel:
    """The shipped module: a student with the read-out calibrate chose for it (a GenDD student's
    sampler or fitted read-out; a kd / ce student's own head or fitted read-out). A kd / ce student
    without a sampler artifact, or with one from before plain students were calibrated, ships its own head."""
    student = load_student(student_art, device)
    gendd = isinstance(student, GenDDStudent)
    if sampler_art is None:
        if not gendd:
            return DeployedModel(student).eval()
        raise ArtifactError(f"{student_art.ref} is a GenDD student and needs a sampler artifact; run 'gendd calibrate'")
    parents = {i.get("fingerprint") for i in sampler_art.manifest.get("inputs", []) if i.get("stage") == "student"}
    if student_art.fingerprint not in parents:
        raise ArtifactError(
            f"sampler {sampler_art.ref} was calibrated for another student than {student_art.ref} ({student_art.short}); "
            "run 'gendd calibrate' for this student"
        )
    info = sampler_art.manifest.get("info", {})
    if not info.get("setting") and not gendd:
        return DeployedModel(student).eval()
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


def spec_of(art: Artifact, store: Store | None = None) -> DeployedSpec:
    """The deployed model's description (spec.py) from an onnx, aoti or engine artifact's manifest.
    An engine built before the build copied the spec lacks the preprocessing: that comes from the
    onnx artifact it was built from, when `store` still has it."""
    spec = DeployedSpec.from_manifest(art.manifest.get("info", {}), art.ref)
    if spec.preprocess is None and art.stage == "engine" and store is not None:
        parent = art.manifest.get("info", {}).get("onnx", {}).get("fingerprint")
        found = store.find(art.pipeline, "onnx", parent) if isinstance(parent, str) else None
        if found is not None:
            old = DeployedSpec.from_manifest(found.manifest.get("info", {}), found.ref)
            spec = replace(spec, preprocess=old.preprocess, class_names=old.class_names, readout=old.readout)
    return spec


def load_onnx_runner(onnx_art: Artifact, providers: list[str] | None = None):
    """An OrtRunner for the artifact's model.onnx, described by its manifest."""
    return OrtRunner(onnx_art.file(ONNX_FILE), providers=providers, spec=spec_of(onnx_art))


def load_aoti_runner(aoti_art: Artifact, device: str = "cpu"):
    return AotiRunner(aoti_art.file(AOTI_FILE), spec=spec_of(aoti_art), device=device)


# ---- what `gendd serve` and the serving benchmark run -----------------------------------------

SERVABLE = {"onnx": "onnxruntime", "aoti": "aoti", "engine": "tensorrt"}  # artifact stage -> its own runtime
RUNTIME_NAMES = "onnxruntime, aoti, torch or tensorrt"


def servable_artifact(store: Store, pipeline: str, version: str | None, command: Callable[[str], str]) -> Artifact:
    """The artifact to serve, verified: `version` (any 'gendd artifacts show' handle, an onnx, aoti
    or engine artifact), else the pipeline's newest onnx artifact. `command(stage)` spells the
    command that makes a stage's artifact, for the messages."""
    if version:
        art = store.resolve(version)
        if art.stage not in SERVABLE:
            raise UsageError(f"{art.ref} is a {art.stage} artifact; serve an onnx artifact (made by '{command('export')}'), or an aoti or engine one")
    else:
        art = store.latest(pipeline, "onnx")
        if art is None:
            raise ArtifactError(f"no onnx artifact for pipeline '{pipeline}' under {store.root}; run '{command('export')}'")
    return store.check_input(art, f"delete {art.path} and run '{command('export')}'")


def _model_inputs(art: Artifact) -> set[tuple[str, str]]:
    """(stage, fingerprint) of the student / sampler an onnx or aoti artifact was exported from."""
    return {(i.get("stage"), i.get("fingerprint")) for i in art.manifest.get("inputs", []) if i.get("stage") in ("student", "sampler")}


def _newest(store: Store, art: Artifact, stage: str, match: Callable[[Artifact], bool]) -> Artifact | None:
    """The newest `stage` artifact of art's pipeline that `match` accepts."""
    hits = [a for a in store.list(art.pipeline, stage) if match(a)]
    return max(hits, key=lambda a: int(a.version[1:])) if hits else None


def _sibling(store: Store, art: Artifact, stage: str, match: Callable[[Artifact], bool], missing: str, remake: str) -> Artifact:
    """The newest verified `stage` artifact of art's pipeline that `match` accepts; the errors say
    `missing` and the command `remake` that makes one."""
    found = _newest(store, art, stage, match)
    if found is None:
        raise ArtifactError(f"{missing}; run '{remake}'")
    return store.check_input(found, f"delete {found.path} and run '{remake}'")


def runner_for_artifact(store: Store, runtime: str, art: Artifact, *, device: Callable[[], torch.device], command: Callable[[str], str], trust_unsigned: bool = False):
    """(runner, the artifact it runs) for `runtime`, from the onnx artifact `art` or its sibling
    made from the same student (aoti package, TensorRT engine); torch runs the model it was
    exported from on `device()`. Native code (aoti, engine) loads only with a trusted signature
    (signing.py) unless `trust_unsigned`."""
    hint = command("export")
    if runtime == "onnxruntime":
        if art.stage != "onnx":
            raise UsageError(f"runtime onnxruntime serves an onnx artifact, not {art.ref}; pass --runtime {SERVABLE[art.stage]}")
        return load_onnx_runner(art), art
    if runtime == "aoti":
        if art.stage == "onnx":
            want = _model_inputs(art)
            missing = f"no AOTInductor package exported from the same student as {art.ref}"
            art = _sibling(store, art, "aoti", lambda a: _model_inputs(a) == want, missing, f"{hint} --aoti")
        elif art.stage != "aoti":
            raise UsageError(f"runtime aoti serves an onnx or aoti artifact, not {art.ref}")
        require_trusted(art, trust_unsigned)
        return load_aoti_runner(art), art
    if runtime == "torch":
        if art.stage not in ("onnx", "aoti"):
            raise UsageError(f"runtime torch serves the model behind an onnx or aoti artifact, not {art.ref}")
        where = device()
        return TorchRunner(deployed_from_export(art, store, where), where), art
    if runtime == "tensorrt":
        if art.stage == "onnx":
            built_from = lambda a, fp=art.fingerprint: any(i.get("fingerprint") == fp for i in a.manifest.get("inputs", []))  # noqa: E731
            art = _sibling(store, art, "engine", built_from, f"no TensorRT engine built from {art.ref}", command("build"))
        elif art.stage != "engine":
            raise UsageError(f"runtime tensorrt serves an onnx or engine artifact, not {art.ref}")
        require_trusted(art, trust_unsigned)
        return TrtRunner(art, spec=spec_of(art, store)), art
    raise UsageError(f"unknown runtime '{runtime}'; use {RUNTIME_NAMES}")
