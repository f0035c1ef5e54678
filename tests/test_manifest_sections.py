"""Typed manifest sections: the student's head spec round-trips, old manifests still load."""

import pytest
from torch import nn

from gendd_deploy.config import DistillConfig
from gendd_deploy.models import backbone as bb
from gendd_deploy.models.student import GenDDStudent, HeadSpec


def _student(spec: HeadSpec) -> GenDDStudent:
    backbone = bb.create_backbone("resnet18", 10, 1, True, {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]})
    return GenDDStudent(backbone, nn.Linear(spec.teacher_dim, 10), spec)


def test_head_spec_round_trips_through_the_manifest_with_recipe_names():
    spec = HeadSpec.from_recipe(DistillConfig(head_width=48, head_depth=2, token_dim=16), teacher_dim=32)
    student = _student(spec)
    stored = spec.to_manifest(student.head)
    assert {"head_width", "head_depth", "token_dim", "train_timesteps", "teacher_dim"} <= set(stored)
    assert stored["num_tokens"] == 2 and stored["params"] == sum(p.numel() for p in student.head.parameters())
    assert HeadSpec.from_manifest(stored) == spec
    assert student.head.width == 48 and student.head.depth == 2


def test_head_spec_reads_manifests_written_with_the_old_names():
    old = {"width": 48, "depth": 2, "token_dim": 16, "teacher_dim": 32, "num_tokens": 2, "train_timesteps": 1000, "params": 1}
    assert HeadSpec.from_manifest(old) == HeadSpec(head_width=48, head_depth=2, token_dim=16, train_timesteps=1000, teacher_dim=32)


def test_a_head_spec_that_does_not_fit_the_teacher_is_refused():
    spec = HeadSpec(head_width=32, head_depth=1, token_dim=16, train_timesteps=1000, teacher_dim=64)
    backbone = bb.create_backbone("resnet18", 10, 1, True, {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]})
    with pytest.raises(ValueError, match="takes 32 features, the head spec says 64"):
        GenDDStudent(backbone, nn.Linear(32, 10), spec)
