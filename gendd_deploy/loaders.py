"""Load what the stages wrote: teacher, student, the deployed model and its runners, from artifacts.

The layer below `stages/`: runtime, serve, bench and the stages themselves load through it, and it
imports nothing from `stages/` (tests/test_layers.py checks the direction). Weights load with
`torch.load(weights_only=True)`: nothing under the artifact root is ever unpickled.

torch and the model code are imported inside the functions that rebuild PyTorch models, so that
finding an artifact and running its exported file (what `gendd serve` does) imports neither torch
nor timm (tests/test_light_serving.py checks).
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from gendd_deploy.artifacts import Artifact, Store
from gendd_deploy.errors import ArtifactError, UsageError
from gendd_deploy.runtime import registry
from gendd_deploy.signing import require_trusted
from gendd_deploy.spec import DeployedSpec, check_stamp

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gendd_deploy.models.deployed import DeployedModel

ONNX_FILE = registry.get("onnxruntime").file  # model.onnx
AOTI_FILE = registry.get("aoti").file  # model.pt2
TRT_INT8_FILE = "model.trt-int8.onnx"  # in an int8 onnx artifact: the same quantization as TensorRT builds it (symmetric activations)


def load_tensors(art: Artifact, name: str) -> dict:
    """A dict of tensors saved by torch.save, read with weights_only=True (never unpickling
    objects); anything else in its place is an ArtifactError naming the file and the fix."""
    import torch

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
    from gendd_deploy.models import backbone as bb

    model = bb.build_from_architecture(art.manifest["info"]["architecture"])
    _load_state(model, load_tensors(art, "model.pt"), art)
    model.eval().requires_grad_(False)
    return model.to(device)


def load_student(art: Artifact, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a student (GenDDStudent or bare backbone) from its artifact, in eval mode."""
    from torch import nn

    from gendd_deploy.models import backbone as bb
    from gendd_deploy.models.student import GenDDStudent, HeadSpec

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
    from gendd_deploy.models.deployed import DeployedModel, SamplerSetting
    from gendd_deploy.models.student import GenDDStudent

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


def artifact_runner(art: Artifact, store: Store | None = None, runtime: str | None = None, **options):
    """A runner for the file in `art` (onnx, aoti or engine), described by its manifest: by
    `runtime`, else the registry's runtime for the artifact's stage. `options` go to the runner
    (device, providers, ...)."""
    entry = registry.get(runtime) if runtime else registry.for_stage(art.stage)
    if entry is None or entry.stage != art.stage:
        raise UsageError(f"{art.ref} is a {art.stage} artifact, which {'no runtime' if entry is None else f'runtime {entry.name}'} runs")
    spec = spec_of(art, store)
    runner = registry.make_runner(entry.name, path=art.file(entry.file), spec=spec, **options)
    if art.stage == "onnx":  # the file's own description (stamped at export) must be its manifest's
        session = getattr(runner, "session", None)  # ONNX Runtime has read the metadata already: no second parse
        props = dict(session.get_modelmeta().custom_metadata_map) if session is not None else None
        check_stamp(art.file(entry.file), spec, art.ref, props=props)
    return runner


# ---- what `gendd serve` and the serving benchmark run -----------------------------------------

def servable_artifact(store: Store, pipeline: str, version: str | None, command: Callable[[str], str]) -> Artifact:
    """The artifact to serve, verified: `version` (any 'gendd artifacts show' handle, an artifact a
    registered runtime runs: onnx, aoti, engine), else the pipeline's newest onnx artifact.
    `command(stage)` spells the command that makes a stage's artifact, for the messages."""
    if version:
        art = store.resolve(version)
        if registry.for_stage(art.stage) is None:
            kinds = ", ".join(registry.servable_stages())
            raise UsageError(f"{art.ref} is a {art.stage} artifact; serve an onnx artifact (made by '{command('export')}'), or another one a runtime runs ({kinds})")
    else:
        art = store.latest(pipeline, "onnx")
        if art is None:
            raise ArtifactError(f"no onnx artifact for pipeline '{pipeline}' under {store.root}; run '{command('export')}'")
    return store.check_input(art, f"delete {art.path} and run '{command('export')}'")


def _model_inputs(art: Artifact) -> set[tuple[str, str]]:
    """(stage, fingerprint) of the student / sampler an artifact was exported from."""
    return {(i.get("stage"), i.get("fingerprint")) for i in art.manifest.get("inputs", []) if i.get("stage") in ("student", "sampler")}


def _made_from(onnx_art: Artifact) -> Callable[[Artifact], bool]:
    """Whether an artifact runs the same model as `onnx_art`: built from it (an engine), or exported
    from the same student and sampler (an AOTInductor package)."""
    want = _model_inputs(onnx_art)
    return lambda a: any(i.get("fingerprint") == onnx_art.fingerprint for i in a.manifest.get("inputs", [])) or (bool(want) and _model_inputs(a) == want)


def _sibling(store: Store, onnx_art: Artifact, entry: registry.RuntimeEntry, command: Callable[[str], str]) -> Artifact:
    """The newest verified artifact of entry.stage that runs the same model as `onnx_art`."""
    match = _made_from(onnx_art)
    hits = [a for a in store.list(onnx_art.pipeline, entry.stage) if match(a)]
    remake = command(entry.made_by or entry.stage)
    if not hits:
        raise ArtifactError(f"no {entry.what or entry.stage + ' artifact'} made from {onnx_art.ref} (runtime {entry.name} runs one); run '{remake}'")
    found = max(hits, key=lambda a: int(a.version[1:]))
    return store.check_input(found, f"delete {found.path} and run '{remake}'")


def runner_for_artifact(
    store: Store, runtime: str, art: Artifact, *, device: Callable[[], torch.device], command: Callable[[str], str], trust_unsigned: bool = False, **options
):
    """(runner, the artifact it runs) for `runtime` (any registered one), from the onnx artifact
    `art` or its sibling that runs the same model (an aoti package, a TensorRT engine); torch runs
    the PyTorch model an export was made from, on `device()`. Native code (aoti, engine) loads
    only with a trusted signature (signing.py) unless `trust_unsigned`. `options` go to the runner
    of an artifact (onnxruntime: intra_op_threads, inter_op_threads, spinning)."""
    entry = registry.get(runtime)
    if entry.stage is None:  # the PyTorch model behind an export
        if registry.for_stage(art.stage) is None or art.stage == "engine":
            raise UsageError(f"runtime {runtime} serves the model behind an onnx or aoti artifact, not {art.ref}")
        where = device()
        return registry.make_runner(runtime, model=deployed_from_export(art, store, where), device=where), art
    if art.stage != entry.stage:
        if art.stage != "onnx":
            own = registry.for_stage(art.stage)
            raise UsageError(f"runtime {runtime} serves {entry.stage} artifacts (or finds one from an onnx artifact), not {art.ref}; pass --runtime {own.name if own else 'onnxruntime'}")
        art = _sibling(store, art, entry, command)
    if entry.native_code:
        require_trusted(art, trust_unsigned)
    return artifact_runner(art, store, runtime, **options), art
