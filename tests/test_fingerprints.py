"""The distill fingerprint hashes an explicit allowlist of [distill] fields per method."""

import pytest

from gendd_deploy.config import DistillConfig
from gendd_deploy.stages.distill import FINGERPRINT_FIELDS, GENDD_FIELDS, SHARED_FIELDS, UNHASHED_FIELDS, DistillStage


def test_every_distill_field_is_placed_exactly_once():
    placed = SHARED_FIELDS + GENDD_FIELDS + UNHASHED_FIELDS
    assert len(placed) == len(set(placed)), "a field is in two lists"
    missing = set(DistillConfig.model_fields) - set(placed)
    assert not missing, f"place these [distill] fields in stages/distill.py's fingerprint lists: {sorted(missing)}"
    assert not set(placed) - set(DistillConfig.model_fields), "a listed field is not a recipe field"
    assert set(FINGERPRINT_FIELDS) == set(DistillConfig.model_fields["method"].annotation.__args__)


@pytest.mark.parametrize("method", ["kd", "ce"])
def test_gendd_only_fields_leave_kd_and_ce_fingerprints_alone(tiny_context, method):
    base = DistillStage().config(tiny_context(f"distill.method='{method}'"))
    for field, value in [("head_width", 17), ("smooth", 0.5), ("eval_steps", 3), ("stage1_epochs", 2)]:
        assert DistillStage().config(tiny_context(f"distill.method='{method}'", f"distill.{field}={value}")) == base, field
    assert DistillStage().config(tiny_context(f"distill.method='{method}'", "distill.lr=0.5")) != base


def test_gendd_fingerprint_follows_head_fields_and_not_use_cache(tiny_context):
    base = DistillStage().config(tiny_context())
    assert DistillStage().config(tiny_context("distill.head_width=17")) != base
    assert DistillStage().config(tiny_context("distill.use_cache=false")) == base


def test_distill_scores_the_published_sampler_by_default():
    from gendd_deploy.models.deployed import SamplerSetting
    from gendd_deploy.stages.distill import published_setting

    assert published_setting(DistillConfig()) == SamplerSetting.published()
    assert published_setting(DistillConfig(eval_steps=8)).steps == 8
