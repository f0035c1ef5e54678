"""Recipe loading and validation: every shipped recipe parses; bad recipes name key, file and fix."""

from pathlib import Path

import pytest

from gendd_deploy.config import flags_to_overrides, load_recipe
from gendd_deploy.errors import UsageError

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("pipelines").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.pipeline.name


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "[distill]\nepochz = 3\n")
    with pytest.raises(UsageError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "distill.epochz" in msg and str(p) in msg and "epochs" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(UsageError, match="unknown key 'distil'"):
        load_recipe(write(tmp_path, "[distil]\nepochs = 3\n"))


def test_wrong_type(tmp_path):
    with pytest.raises(UsageError, match="bad value for 'teacher.epochs'"):
        load_recipe(write(tmp_path, "[teacher]\nepochs = 'many'\n"))


def test_invalid_toml(tmp_path):
    with pytest.raises(UsageError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[teacher\n"))


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_recipe(tmp_path / "nope.toml")


def test_overrides_and_flags(tmp_path):
    p = write(tmp_path, "[distill]\nepochs = 3\n")
    r = load_recipe(p, ["distill.epochs=5", "data.augment=crop_flip"])
    assert r.distill.epochs == 5 and r.data.augment == "crop_flip"
    ov = flags_to_overrides("distill", ["--eval-steps", "4", "--no-amp", "--lr=1e-2", "--labels"])
    assert ov == ["distill.eval_steps=4", "distill.amp=false", "distill.lr=1e-2", "distill.labels=true"]
    r = load_recipe(p, ov)
    assert r.distill.eval_steps == 4 and r.distill.amp is False and r.distill.lr == 1e-2
    with pytest.raises(UsageError, match="unknown option '--stepz'"):
        flags_to_overrides("distill", ["--stepz", "4"])


def test_cross_field_validation(tmp_path):
    with pytest.raises(UsageError, match="min_batch"):
        load_recipe(write(tmp_path, "[build]\nmin_batch = 64\nopt_batch = 8\n"))


@pytest.mark.parametrize(
    "override, needle",
    [
        ("calibrate.steps=[]", "calibrate.steps"),
        ("calibrate.steps=[0]", "calibrate.steps"),
        ("calibrate.steps=[-4]", "calibrate.steps"),
        ("calibrate.draws=[0]", "calibrate.draws"),
        ("calibrate.steps=[5000]", "exceed distill.train_timesteps"),
        ("calibrate.t_starts=[5000]", "calibrate.t_starts"),
        ("distill.train_timesteps=10", "distill.eval_steps"),
        ("export.opset=99", "export.opset"),
    ],
)
def test_bad_values_are_refused_before_any_work(tmp_path, override, needle):
    from gendd_deploy.config import load_recipe

    p = tmp_path / "r.toml"
    p.write_text("")
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")):
        load_recipe(p, [override])


def test_non_utf8_recipe_is_one_line(tmp_path):
    from gendd_deploy.config import load_recipe

    p = tmp_path / "r.toml"
    p.write_bytes(b"[teacher]\nmodel = '\xff\xfe'\n")
    with pytest.raises(UsageError, match="UTF-8"):
        load_recipe(p)
