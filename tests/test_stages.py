"""Teacher, cache and distill stages end to end on a tiny digits recipe."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from gendd_deploy.artifacts import verify_artifact
from gendd_deploy.data import augment as aug
from gendd_deploy.errors import ArtifactError, UsageError
from gendd_deploy.models import backbone as bb
from gendd_deploy.models.student import contract, feature_mixup
from gendd_deploy.stages.cache import CacheStage, CachedFeatures, check_lineage
from gendd_deploy.loaders import load_student, load_teacher
from gendd_deploy.stages.distill import DistillStage
from gendd_deploy.stages.teacher import TeacherStage
from gendd_deploy.stages import run_chain
from gendd_deploy.training import Checkpointer


def test_teacher_publishes_verified_artifact_and_reuses(tiny_context):
    ctx = tiny_context()
    art = TeacherStage().run(ctx)
    assert verify_artifact(art) == []
    assert art.metrics["test_top1"] > 0 and art.manifest["info"]["feature_dim"] == 32
    again = TeacherStage().run(tiny_context())
    assert again.path == art.path and len(ctx.store.list()) == 1
    changed = TeacherStage().run(tiny_context("teacher.lr=1e-3"))
    assert changed.path != art.path and changed.version == "v002"


def test_teacher_load_mode_from_checkpoint(tiny_context, tmp_path):
    ctx = tiny_context()
    art = TeacherStage().run(ctx)
    ckpt = tmp_path / "teacher_sd.pt"
    torch.save(load_teacher(art).state_dict(), ckpt)
    loaded = TeacherStage().run(tiny_context("teacher.mode='load'", f"teacher.checkpoint='{ckpt}'"))
    assert loaded.metrics["test_top1"] == art.metrics["test_top1"]
    with pytest.raises(UsageError, match="not found"):
        TeacherStage().run(tiny_context("teacher.mode='load'", f"teacher.checkpoint='{tmp_path / 'nope.pt'}'"))


def test_teacher_resumes_after_kill(tiny_recipe, tmp_path):
    """SIGKILL `gendd teacher` after its first checkpoint; the rerun resumes and publishes one version."""
    root = tmp_path / "art"
    cmd = [sys.executable, "-m", "gendd_deploy", "teacher", "-p", str(tiny_recipe), "--artifacts", str(root), "--epochs", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(root.glob("tiny/teacher/.work-*/checkpoint.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(root.glob("tiny/teacher/.work-*/checkpoint.pt")), "no checkpoint was written before the kill"
    assert not list(root.glob("tiny/teacher/v*")), "a killed run must not publish"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming from the checkpoint after epoch" in r.stderr
    assert len(list(root.glob("tiny/teacher/v*"))) == 1
    assert not list(root.glob("tiny/teacher/.work-*"))  # scratch state removed after publish


def test_cache_replay_reproduces_cached_feature(tiny_context):
    ctx = tiny_context()
    cache_art = run_chain(CacheStage(), ctx)
    assert verify_artifact(cache_art) == []
    cache = CachedFeatures(cache_art)
    data, teacher = ctx.data(), load_teacher(ctx.store.latest("tiny", "teacher"))
    assert cache.features.shape == (2, len(data.train), 32) and cache.features.dtype == np.float16
    idx = torch.tensor([0, 5, 17])
    for view in (0, 1):
        feats, params = cache.batch(torch.full((3,), view), idx)
        x = aug.apply(data.train.get_batch(idx), params, "crop", 1, data.image_size)
        with torch.no_grad():
            again = bb.pooled_features(teacher, aug.normalize(x, data.mean, data.std))
        torch.testing.assert_close(again, feats, atol=2e-2, rtol=1e-2)
    # the two views differ (augmentation really replayed per view)
    assert not np.array_equal(cache.params[0], cache.params[1])


def test_mismatched_cache_is_refused(tiny_context):
    ctx = tiny_context()
    cache_art = run_chain(CacheStage(), ctx)
    teacher_art = ctx.store.latest("tiny", "teacher")
    other = tiny_context("pipeline.seed=1")
    other_teacher = run_chain(TeacherStage(), other)
    with pytest.raises(ArtifactError, match="another teacher") as e:
        check_lineage(cache_art, other_teacher, other)
    assert "gendd cache" in str(e.value)
    crop2 = tiny_context("data.crop_padding=2")
    with pytest.raises(ArtifactError, match="another (data|transform)"):
        check_lineage(cache_art, teacher_art, crop2)


@pytest.mark.parametrize(
    "overrides",
    [
        ("distill.method='gendd'",),
        ("distill.method='gendd'", "distill.labels=false"),
        ("distill.method='gendd'", "distill.stage1_epochs=1", "cache.enabled=false"),
        ("distill.method='kd'",),
        ("distill.method='kd'", "distill.labels=false"),
        ("distill.method='ce'",),
    ],
    ids=["gendd", "gendd-unlabelled", "gendd-stage1-online", "kd", "kd-unlabelled", "ce"],
)
def test_every_method_runs_one_tiny_epoch(tiny_context, overrides):
    ctx = tiny_context("distill.epochs=1", *overrides)
    art = run_chain(DistillStage(), ctx)
    m = art.metrics
    assert verify_artifact(art) == []
    assert 0 <= m["test_top1"] <= 100 and m["train_s"] > 0 and m["images_per_s"] > 0 and m["teacher_top1"] > 0
    labelled = ctx.recipe.distill.labels
    # every method gets the fitted read-outs that apply to it: fit_ce with labels, fit_ridge always
    assert ("fit_ce_top1" in m) == labelled and "fit_ridge_top1" in m
    if ctx.recipe.distill.method == "gendd":
        assert {"published_top1", "published_floored_top1", "published_sampler", "ddim0_top1", "fit_sampler_top1"} <= set(m)
        # an unlabelled student has no trained probe (its fc is frozen)
        assert ("probe_top1" in m) == labelled
        assert set(art.manifest["info"]["readouts"]) == ({"fit_ridge", "fit_sampler", "fit_ce"} if labelled else {"fit_ridge", "fit_sampler"})
        assert art.manifest["info"]["deviations"]
    else:
        assert set(art.manifest["info"]["readouts"]) == ({"fit_ridge", "fit_ce"} if labelled else {"fit_ridge"})
        assert "fit_sampler_top1" not in m and "published_top1" not in m
    student = load_student(art)
    assert student(torch.zeros(2, 1, 8, 8)).shape[-1] == 10 if ctx.recipe.distill.method != "gendd" else student.head.num_tokens == 2


def test_ce_without_labels_is_refused(tiny_context):
    with pytest.raises(UsageError, match="needs labels"):
        run_chain(DistillStage(), tiny_context("distill.method='ce'", "distill.labels=false"))


class Killed(Exception):
    pass


def test_distill_resumes_after_interruption(tiny_context, monkeypatch):
    ctx = tiny_context("distill.epochs=2")
    saves, loads = [], []
    real_save, real_load = Checkpointer.save, Checkpointer.load

    def save_then_die(self, state):
        real_save(self, state)
        saves.append(state["epoch"])
        raise Killed  # as if killed right after the first epoch's checkpoint

    run_chain(CacheStage(), ctx)
    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        DistillStage().run(ctx)
    assert saves == [0] and ctx.store.list(stage="student") == []
    monkeypatch.setattr(Checkpointer, "save", real_save)

    def spy_load(self):
        state = real_load(self)
        loads.append(None if state is None else state["epoch"])
        return state

    monkeypatch.setattr(Checkpointer, "load", spy_load)
    art = DistillStage().run(tiny_context("distill.epochs=2"))
    assert 0 in loads  # training picked up after epoch 0
    assert len(ctx.store.list(stage="student")) == 1 and art.metrics["epochs"] == 2


def test_contraction_hard_and_soft_labels():
    w = torch.randn(10, 32)
    f = torch.randn(4, 32)
    y = torch.tensor([1, 2, 3, 4])
    hard = contract(f, y, w, 0.9)
    torch.testing.assert_close(hard, 0.1 * f + 0.9 * w[y])
    soft = torch.nn.functional.one_hot(y, 10).float()
    torch.testing.assert_close(contract(f, soft, w, 0.9), hard)
    mixed = 0.5 * soft + 0.5 * torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 0]), 10).float()
    torch.testing.assert_close(contract(f, mixed, w, 0.5), 0.5 * f + 0.5 * (0.5 * w[y] + 0.5 * w[0]))
    assert torch.equal(contract(f, y, w, 0.0), f)


def test_feature_mixup_mixes_condition_and_target_alike():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(8, 4), torch.randn(8, 6)
    z2, t2 = feature_mixup(z, t, 1.0, g)
    assert not torch.equal(z2, z)
    # target and condition use the same m and permutation: solving for m from one row pair works on both
    g = torch.Generator().manual_seed(0)
    zz, tt = feature_mixup(torch.eye(8), torch.eye(8), 1.0, g)
    assert torch.equal(zz, tt)
    assert feature_mixup(z, t, 0.0, g) == (z, t)
