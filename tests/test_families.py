"""Any timm family as teacher and as student: cache -> distill -> calibrate -> export on a tiny tree.

Each case pairs the family with a tiny ResNet twice: family teacher -> ResNet student, and ResNet
teacher -> family student, on a 32x32 RGB ImageFolder tree written here. What is checked is the
backbone contract (pooled feature width = classifier input, checked by a dry forward), which the
cache, the GenDD head, calibration and the ONNX parity gate all depend on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from gendd_deploy.artifacts import Store, verify_artifact
from gendd_deploy.config import load_recipe
from gendd_deploy.stages import Context, run_chain
from gendd_deploy.stages.export import ExportStage

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET = ("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]}, True)
FAMILIES = {
    "resnet-4stage": RESNET,
    "resnet-3stage": ("resnet18", {"layers": [1, 1, 1], "channels": [8, 16, 16]}, True),
    "mobilenetv3": ("mobilenetv3_small_050", {}, False),
    "efficientnet": ("efficientnet_b0", {}, False),
    "convnext": ("convnext_atto", {}, False),
    "regnet": ("regnetx_002", {}, False),
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, False),
}

RECIPE = """
[pipeline]
name = "family"

[data]
source = "imagefolder"
root = "{root}"
image_size = 32
calib_fraction = 0.25

[teacher]
model = "{t_model}"
model_kwargs = {t_kwargs}
small_input = {t_small}
epochs = 1
batch_size = 8

[cache]
batch_size = 16

[distill]
student = "{s_model}"
student_kwargs = {s_kwargs}
small_input = {s_small}
epochs = 1
batch_size = 8
head_width = 16
head_depth = 1
token_dim = 16
diffusion_batch_mul = 1
eval_steps = 2
eval_draws = 1

[calibrate]
samplers = ["ddim"]
steps = [1]
draws = [1]
guidance = [1.0]
temperatures = [0.0]
noise_modes = ["zero"]
t_starts = [999]
runtime = "torch"
latency_batch = 4

[export]
exporter = "torchscript"
parity_limit = 8
atol = 1e-3
"""


def _toml(d: dict) -> str:
    return "{ " + ", ".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in d.items()) + " }"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family") / "imgs"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("val", 2)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{k}.png")
    return root


def _run(tmp_path: Path, tree: Path, teacher, student):
    text = RECIPE.format(
        root=tree, t_model=teacher[0], t_kwargs=_toml(teacher[1]), t_small=str(teacher[2]).lower(),
        s_model=student[0], s_kwargs=_toml(student[1]), s_small=str(student[2]).lower(),
    )
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "family.toml"
    path.write_text(text)
    ctx = Context(recipe=load_recipe(path), store=Store(tmp_path / "artifacts"), console=Console(quiet=True), recipe_path=str(path), quiet=True)
    art = run_chain(ExportStage(), ctx)
    assert verify_artifact(art) == []
    # float32 error grows with the logits (an untrained sampler's reach 1e4): bounded as the export gate bounds it
    par = art.metrics["parity"]
    assert par["max_abs_diff"] <= 1e-3 + 1e-5 * par["logit_scale"] and par["top1_agreement"] == 1.0, par
    return ctx


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
def test_family_as_teacher_and_as_student(family, tmp_path, tree):
    spec = FAMILIES[family]
    ctx = _run(tmp_path / "t", tree, spec, RESNET)  # the family as teacher
    teacher = ctx.store.list(stage="teacher")[0]
    assert teacher.manifest["info"]["architecture"]["model"] == spec[0]
    ctx = _run(tmp_path / "s", tree, RESNET, spec)  # the family as student
    student = ctx.store.list(stage="student")[0]
    assert student.manifest["info"]["architecture"]["model"] == spec[0]


def test_loader_workers_change_nothing_but_speed(tmp_path, tree):
    """Teacher, cache and student trained with 2 decoding workers equal those trained without."""
    import torch

    results = []
    for workers in (0, 2):
        path = tmp_path / f"w{workers}"
        path.mkdir()
        text = RECIPE.format(root=tree, t_model=RESNET[0], t_kwargs=_toml(RESNET[1]), t_small="true", s_model=RESNET[0], s_kwargs=_toml(RESNET[1]), s_small="true")
        (path / "r.toml").write_text(text)
        recipe = load_recipe(path / "r.toml", [f"data.loader_workers={workers}", "data.augment='crop_flip'", "cache.views=2", "cache.batch_size=4", "teacher.batch_size=2", "distill.batch_size=2"])
        ctx = Context(recipe=recipe, store=Store(path / "artifacts"), console=Console(quiet=True), recipe_path=str(path / "r.toml"), quiet=True)
        from gendd_deploy.stages.distill import DistillStage

        art = run_chain(DistillStage(), ctx)
        results.append((art.fingerprint, torch.load(art.file("model.pt"), weights_only=True)))
    (fp0, w0), (fp2, w2) = results
    assert fp0 == fp2  # the number of workers is not part of what is made
    assert all(torch.equal(w0[k], w2[k]) for k in w0)
