"""Shipped recipes run, and an interrupted distill resumes to the very weights of an unbroken run."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from gendd_deploy.artifacts import Store
from gendd_deploy.config import load_recipe
from gendd_deploy.models import backbone as bb
from gendd_deploy.stages import Context, run_chain
from gendd_deploy.stages.distill import DistillStage

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "cifar100_resnet32x4_resnet8x4.toml"


def _cifar_tree(root: Path) -> Path:
    """A CIFAR-100 python-pickle tree (the format the source reads) with random images."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 24), ("test", 8)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        (root / name).write_bytes(pickle.dumps({b"data": data, b"fine_labels": [i % 100 for i in range(n)]}))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)]}))
    return root


def test_cifar100_recipe_runs_its_first_epoch(tmp_path):
    """The 3-stage resnet32x4 teacher loads from a state_dict and the 3-stage resnet8x4 student
    trains one stage-1 and one GenDD epoch: the recipe as shipped, only sizes shrunk."""
    data = _cifar_tree(tmp_path / "cifar-100-python")
    base = load_recipe(CIFAR_RECIPE)
    tc = base.teacher
    teacher = bb.create_backbone(tc.model, 100, 3, tc.small_input, tc.model_kwargs)
    ckpt = tmp_path / "resnet32x4_timm.pt"
    torch.save(teacher.state_dict(), ckpt)
    overrides = [
        f"data.root='{data}'", f"teacher.checkpoint='{ckpt}'", "cache.views=2",
        "distill.epochs=1", "distill.stage1_epochs=1", "distill.batch_size=8", "distill.warmup_fraction=0",
        "distill.eval_steps=2", "distill.eval_draws=1", "distill.diffusion_batch_mul=2",
    ]
    recipe = load_recipe(CIFAR_RECIPE, overrides)
    ctx = Context(recipe=recipe, store=Store(tmp_path / "artifacts"), console=Console(quiet=True), recipe_path=str(CIFAR_RECIPE), quiet=True)
    art = run_chain(DistillStage(), ctx)
    info = art.manifest["info"]
    assert info["architecture"]["model_kwargs"]["layers"] == [1, 1, 1]
    assert info["head"]["teacher_dim"] == 256 and info["head"]["num_tokens"] == 4 and info["head"]["head_width"] == ctx.recipe.distill.head_width
    assert art.metrics["epochs"] == 1 and art.metrics["stage1_epochs"] == 1
    assert 0 <= art.metrics["published_top1"] <= 100


def _state(art) -> dict:
    return torch.load(art.file("model.pt"), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("method", ["gendd", "kd"])
def test_killed_distill_resumes_to_the_same_weights(tiny_context, tmp_path, monkeypatch, method):
    """Fail in the middle of epoch 2 (step 1), rerun: the published weights equal, bit for bit,
    those of a run that was never interrupted (same fingerprint, other store)."""
    overrides = ("distill.epochs=2", f"distill.method='{method}'", "distill.stage1_epochs=1" if method == "gendd" else "distill.epochs=2")
    ctx = tiny_context(*overrides)
    run_chain(DistillStage().inputs(ctx)["cache"], ctx)  # teacher and cache first, shared below
    monkeypatch.setenv("GENDD_FAIL_AT", "distill@1:1")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_chain(DistillStage(), ctx)
    assert ctx.store.list(stage="student") == []  # nothing half-published
    monkeypatch.delenv("GENDD_FAIL_AT")
    resumed = run_chain(DistillStage(), tiny_context(*overrides))

    # an uninterrupted run of the same recipe in a fresh store
    import shutil

    fresh_root = tmp_path / "fresh"
    shutil.copytree(tmp_path / "artifacts", fresh_root, ignore=shutil.ignore_patterns("student", ".work-*"))
    fresh_ctx = tiny_context(*overrides)
    fresh_ctx.store = Store(fresh_root)
    unbroken = run_chain(DistillStage(), fresh_ctx)
    assert unbroken.fingerprint == resumed.fingerprint and unbroken.path != resumed.path
    a, b = _state(resumed), _state(unbroken)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
