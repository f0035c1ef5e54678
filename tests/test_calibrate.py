"""Calibrate: the sampler grid, the choice, the calibration-only data access, one stage run."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from gendd_deploy.artifacts import verify_artifact
from gendd_deploy.config import CalibrateConfig
from gendd_deploy.models import backbone as bb
from gendd_deploy.models.deployed import DeployedModel, SamplerSetting
from gendd_deploy.models.student import GenDDStudent, HeadSpec
from gendd_deploy.calibration import MIN_ALPHA_BAR, PROBE, REFERENCE, Result, build_grid, canonical, choose, structure
from gendd_deploy.stages.calibrate import CalibrateStage, calib_features, predict_setting, time_runner, timing_runner
from gendd_deploy.stages.distill import DistillStage

TINY_BACKBONE = {"layers": (1, 1, 1, 1), "channels": (8, 8, 8, 16)}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def tiny_student(num_classes=10, teacher_dim=32, token_dim=16, seed=0) -> GenDDStudent:
    torch.manual_seed(seed)
    backbone = bb.create_backbone("resnet18", num_classes, 1, True, TINY_BACKBONE)
    student = GenDDStudent(backbone, nn.Linear(teacher_dim, num_classes), HeadSpec(head_width=32, head_depth=1, token_dim=token_dim, train_timesteps=1000, teacher_dim=teacher_dim))
    # an untrained head outputs zeros; give it weights so samplers differ
    with torch.no_grad():
        for p in student.head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return student.eval().requires_grad_(False)


# ---- grid -----------------------------------------------------------------------------------


def test_canonical_collapses_equivalent_settings():
    ddim0 = SamplerSetting(sampler="ddim", steps=4, draws=5, guidance=1.0, temperature=0.0, noise="fresh")
    assert canonical(ddim0, 1000) == SamplerSetting(sampler="ddim", steps=4, draws=1, guidance=1.0, temperature=0.0, noise="zero")
    zero = SamplerSetting(sampler="ddpm", steps=4, draws=2, temperature=0.5, noise="zero", t_start=999)
    assert canonical(zero, 1000) == SamplerSetting(sampler="ddpm", steps=4, draws=1, temperature=0.0, noise="zero")
    fixed = SamplerSetting(sampler="ddpm", steps=4, draws=2, temperature=0.5, noise="fixed")
    assert canonical(fixed, 1000) == fixed  # fixed noise: draws still differ from each other
    assert canonical(REFERENCE, 1000) == REFERENCE
    one = SamplerSetting(sampler="ddpm", steps=1, draws=2, temperature=0.5, noise="fresh")
    assert canonical(one, 1000) == replace(one, sampler="ddim", temperature=1.0)
    assert canonical(one, 1000, samplers=["ddpm"]) == replace(one, temperature=1.0)


@pytest.mark.parametrize(
    "setting",
    [SamplerSetting(sampler="ddim", steps=3, draws=2, guidance=2.0, temperature=0.0, noise="fresh", t_start=800),
     SamplerSetting(sampler="ddim", steps=2, draws=1, temperature=0.0, noise="fixed"),
     SamplerSetting(sampler="ddpm", steps=3, draws=2, guidance=2.0, temperature=0.5, noise="zero"),
     SamplerSetting(sampler="ddpm", steps=1, draws=2, guidance=2.0, temperature=0.5, noise="fresh", t_start=700),
     SamplerSetting(sampler="ddpm", steps=1, draws=1, temperature=0.0, noise="fixed", t_start=999)],
    ids=lambda s: s.label(),
)
def test_pruned_settings_really_are_equivalent(setting):
    """Each collapsed setting gives the logits of the one it collapses to (same seeds)."""
    from gendd_deploy.runtime.base import make_noise

    student, x = tiny_student(), torch.randn(5, 1, 8, 8)

    def logits(s):
        m = DeployedModel(student, s, fixed_noise_seed=4)
        return m(x, torch.from_numpy(make_noise(m.noise_shape(5), 9)) if m.needs_noise else None)

    canon = canonical(setting, 1000)
    assert canon != setting
    torch.testing.assert_close(logits(canon), logits(setting), rtol=1e-5, atol=1e-5)


def test_grid_prunes_equivalents_and_keeps_reference_and_probe():
    cfg = CalibrateConfig(steps=[1, 4, 16], draws=[1, 3], guidance=[1.0], temperatures=[0.0, 1.0], t_starts=[999, 800])
    grid = build_grid(cfg, 1000)
    assert grid[0] == PROBE and REFERENCE in grid
    assert len(set(grid)) == len(grid)
    for s in grid[1:]:
        if s.deterministic and s.noise != "fixed":
            assert s.draws == 1, s  # no draws > 1 for zero noise / ddim T0
        if s.sampler == "ddim" and s.temperature == 0.0:
            assert s.noise == "zero", s  # noise mode irrelevant
        if s != REFERENCE and s.steps > 8:
            assert s.t_start is None, s  # t_start only for few-step samplers
    assert {s.t_start for s in grid if s.kind == "sampler" and s.steps <= 8} == {None, 800}
    # ddim T0: one setting per (steps, t_start), whatever the noise modes and draws
    ddim0 = [s for s in grid if s.sampler == "ddim" and s.temperature == 0.0 and s.kind == "sampler"]
    assert len(ddim0) == 2 + 2 + 1
    # cheapest first, except the reference which sits where its cost puts it
    costs = [s.head_passes() for s in grid]
    assert costs == sorted(costs)


@pytest.mark.parametrize("cap", [2, 5, 40])
def test_grid_cap_keeps_cheapest_and_reference(cap):
    full = build_grid(CalibrateConfig(max_settings=10_000), 1000)
    grid = build_grid(CalibrateConfig(max_settings=cap), 1000)
    assert len(grid) == cap and grid[0] == PROBE and grid[-1] == REFERENCE
    others = [s for s in full if s not in (PROBE, REFERENCE)]
    assert grid[1:-1] == others[: cap - 2]
    assert max((s.head_passes() for s in grid[1:-1]), default=0) <= min(s.head_passes() for s in others[cap - 2 :])


def test_grid_skips_invalid_t_start():
    grid = build_grid(CalibrateConfig(steps=[1, 8], t_starts=[5], samplers=["ddim"], temperatures=[0.0], guidance=[1.0]), 10)
    assert [s for s in grid if s.kind == "sampler" and s != REFERENCE] == [SamplerSetting(sampler="ddim", steps=1, draws=1, guidance=1.0, temperature=0.0, noise="zero", t_start=5, min_alpha_bar=MIN_ALPHA_BAR)]


def test_structure_ignores_temperature_and_t_start():
    a = SamplerSetting(sampler="ddpm", steps=4, draws=2, temperature=0.5, noise="fresh", t_start=800)
    assert structure(a) == structure(SamplerSetting(sampler="ddpm", steps=4, draws=2, temperature=1.0, noise="fresh"))
    assert structure(a) != structure(SamplerSetting(sampler="ddpm", steps=4, draws=2, temperature=1.0, noise="fixed"))
    assert structure(PROBE) == ("linear",) == structure(SamplerSetting.fitted("fit_ce"))  # one graph: backbone + Linear


# ---- choice ---------------------------------------------------------------------------------


def R(label_steps, top1, ms, draws=1, guidance=1.0):
    return Result(SamplerSetting(sampler="ddim", steps=label_steps, draws=draws, guidance=guidance, temperature=0.0, noise="zero"), top1, latency_ms=ms)


def test_choose_cheapest_within_tolerance():
    rs = [R(1, 80.0, 1.0), R(2, 89.95, 2.0), R(4, 90.0, 4.0), R(8, 89.0, 0.5)]
    chosen, best = choose(rs, tolerance=0.1)
    assert best is rs[2] and chosen is rs[1]
    chosen, _ = choose(rs, tolerance=0.0)
    assert chosen is rs[2]
    chosen, _ = choose(rs, tolerance=10.0)
    assert chosen is rs[3]


def test_choose_ties_go_to_fewer_head_passes_then_top1():
    a, b = R(4, 90.0, 3.0, guidance=2.0), R(4, 90.0, 3.0)  # same latency: b has half the passes
    assert choose([a, b], 0.1)[0] is b
    c, d = R(4, 89.95, 3.0), R(4, 90.0, 3.0)  # same latency and passes (e.g. t_start variants)
    assert choose([c, d], 0.1)[0] is d
    probe = Result(PROBE, 90.0, latency_ms=0.2)
    assert choose([a, b, probe], 0.1)[0] is probe


# ---- evaluation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [PROBE, SamplerSetting(sampler="ddim", steps=2, draws=1, guidance=2.0, temperature=0.0, noise="zero", t_start=800),
     SamplerSetting(sampler="ddpm", steps=2, draws=2, guidance=2.0, temperature=1.0, noise="fresh"),
     SamplerSetting(sampler="ddpm", steps=3, draws=2, guidance=1.0, temperature=0.5, noise="fixed")],
    ids=lambda s: s.label(),
)
def test_feature_reuse_matches_deployed_model(setting):
    """Calibrate feeds cached backbone features through DeployedModel: same logits as from images."""
    from gendd_deploy.runtime.base import make_noise

    student = tiny_student()
    x = torch.randn(6, 1, 8, 8)
    deployed = DeployedModel(student, setting, fixed_noise_seed=3)
    noise = torch.from_numpy(make_noise(deployed.noise_shape(6), 11)) if deployed.needs_noise else None
    expect = deployed(x, noise).argmax(1)
    got = predict_setting(student, setting, [student.features(x)], noise_seed=11, fixed_noise_seed=3)
    assert torch.equal(got, expect)
    assert "features" not in vars(student)  # the student itself is untouched


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_latency_runner_runs_the_deployed_model(runtime, tmp_path):
    """The graph calibrate times is the deployed model: same logits, same noise input."""
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    setting = SamplerSetting(sampler="ddpm", steps=2, draws=2, guidance=2.0, temperature=1.0, noise="fresh")
    student, x = tiny_student(), torch.randn(4, 1, 8, 8)
    model = DeployedModel(student, setting, 0).eval()
    runner = timing_runner(runtime, DeployedModel(student, setting, 0), x, tmp_path, torch.device("cpu"))
    noise = runner.noise(4, 7)
    assert noise.shape == model.noise_shape(4)
    expect = model(x, torch.from_numpy(noise)).numpy()
    # the untrained head's logits reach ~1e4: float32 reordering error scales with each image's
    # largest logit, as the export gate allows it (runtime/parity.py)
    scale = np.abs(expect).max(axis=1, keepdims=True)
    assert np.all(np.abs(runner.run(x.numpy(), noise) - expect) <= 1e-4 + 1e-5 * scale)
    assert time_runner(runner, x.numpy(), 7, min_runs=2, min_s=0.0) > 0


# ---- the stage ------------------------------------------------------------------------------


def publish_student(ctx, method="gendd", readouts=()):
    """A tiny untrained student artifact under the fingerprint the recipe implies (no training),
    with random `readouts` (fitted read-out names) beside it."""
    data = ctx.data()
    dc = ctx.recipe.distill
    arch = bb.architecture(bb.create_backbone("resnet18", data.num_classes, data.in_chans, True, TINY_BACKBONE))
    if method == "gendd":
        model = tiny_student(data.num_classes, teacher_dim=32, token_dim=dc.token_dim)
        head = {"width": 32, "depth": 1, "token_dim": dc.token_dim, "teacher_dim": 32, "num_tokens": 32 // dc.token_dim, "train_timesteps": 1000}
    else:
        model, head = bb.build_from_architecture(arch), None
    stage = DistillStage()
    with ctx.store.draft(ctx.pipeline, "student", stage.fingerprint(ctx), stage.config(ctx), []) as d:
        torch.save(model.state_dict(), d.path("model.pt"))
        d.info.update({"method": method, "architecture": arch, **({"head": head} if head else {})})
        if readouts:
            d_s = bb.feature_dim(model.backbone if method == "gendd" else model)
            torch.manual_seed(1)
            lins = {name: nn.Linear(d_s, data.num_classes) for name in readouts}
            torch.save({f"{n}.{k}": v for n, lin in lins.items() for k, v in lin.state_dict().items()}, d.path("readouts.pt"))
            d.info["readouts"] = {n: {"in_features": d_s, "out_features": data.num_classes} for n in readouts}
        return d.publish()


class _NoTest:
    def __getattr__(self, name):
        raise AssertionError("calibrate touched the test split")

    def __len__(self):
        raise AssertionError("calibrate touched the test split")


def guard_test_split(ctx):
    data = ctx.data()
    data.test = _NoTest()
    return data


def test_calib_features_read_only_calibration_images(tiny_context):
    ctx = tiny_context()
    data = guard_test_split(ctx)
    feats, labels = calib_features(ctx, tiny_student(), 20, torch.device("cpu"))
    assert sum(len(f) for f in feats) == 20 and torch.equal(labels, data.calib.labels[:20])


def test_stage_end_to_end_on_calibration_split_only(tiny_context):
    ctx = tiny_context("calibrate.limit=24", "calibrate.max_settings=12", "calibrate.latency_batch=4", "data.eval_batch_size=16")
    guard_test_split(ctx)
    publish_student(ctx)
    art = CalibrateStage().run(ctx)
    assert verify_artifact(art) == []
    info, m = art.manifest["info"], art.metrics
    chosen = SamplerSetting.from_dict(info["setting"])
    assert info["reference"] == REFERENCE.to_dict() and isinstance(info["fixed_noise_seed"], int) and chosen.label() in info["reason"]
    assert m["n_settings"] == 12 and m["calib_images"] == 24 and m["runtime"] == "onnxruntime"
    lo, hi = info["choice"]["interval_vs_best"]  # paired bootstrap vs the best: shown at most `tolerance` worse
    assert lo <= m["calib_top1"] - m["best_top1"] + 1e-6 <= hi + 2e-6 and lo >= -ctx.recipe.calibrate.tolerance
    table = json.loads(art.file("table.json").read_text())["settings"]
    assert len(table) == 12 and sum(r["chosen"] for r in table) == 1
    row = next(r for r in table if r["chosen"])
    assert row["setting"] == info["setting"] and row["latency_ms"] == m["latency_ms"]
    assert next(r for r in table if r["label"] == REFERENCE.label())["agreement"] == 1.0
    assert art.file("accuracy_vs_latency.png").read_bytes()[:4] == b"\x89PNG"
    # the same recipe reuses the artifact
    assert CalibrateStage().run(ctx).path == art.path


def test_kd_student_calibrates_among_its_own_head_and_fitted_readouts(tiny_context):
    ctx = tiny_context("distill.method='kd'")
    guard_test_split(ctx)
    publish_student(ctx, method="kd", readouts=("fit_ce", "fit_ridge"))
    art = CalibrateStage().run(ctx)
    info, m = art.manifest["info"], art.metrics
    labels = [r["label"] for r in json.loads(art.file("table.json").read_text())["settings"]]
    assert labels == ["probe", "linear fit_ce", "linear fit_ridge"] and m["n_settings"] == 3
    assert info["method"] == "kd" and info["choice"]["latency_vs_reference"] is None and "reference_top1" not in m
    chosen = SamplerSetting.from_dict(info["setting"])
    assert chosen.linear and chosen.label() in info["reason"]
    # equal cost (one graph structure): the best point estimate among those kept
    table = json.loads(art.file("table.json").read_text())["settings"]
    assert len({r["latency_ms"] for r in table}) == 1
    assert next(r for r in table if r["chosen"])["top1"] == max(r["top1"] for r in table)


def _outcomes(n_right: int, n: int) -> torch.Tensor:
    c = torch.zeros(n, dtype=torch.bool)
    c[:n_right] = True
    return c


def test_choose_is_a_non_inferiority_test():
    """A cheaper candidate is kept only when the lower end of its paired interval vs the best is
    >= -tolerance. One that disagrees with the best on 60 of 2000 images, 30 each way, has the
    same point estimate but an interval of about +-0.75 points: refused at tolerance 0.5 (the old
    rule, upper end >= -tolerance, kept it), kept at 1.0. One 0.5 points worse on the same images
    (interval about -0.8 to -0.2) is refused at 0.5 and kept at 1.0."""
    n = 2000
    best_c = _outcomes(1800, n)
    worse_c = best_c.clone()
    worse_c[:10] = False  # 10 fewer right answers, same images otherwise
    tie_c = best_c.clone()
    tie_c[1770:1800] = False
    tie_c[1800:1830] = True
    mk = lambda c, ms, steps: Result(SamplerSetting(sampler="ddim", steps=steps, temperature=0.0, noise="zero", draws=1), 100 * c.float().mean().item(), latency_ms=ms, correct=c)  # noqa: E731
    best, worse, tie = mk(best_c, 10.0, 8), mk(worse_c, 1.0, 1), mk(tie_c, 2.0, 2)
    chosen, top = choose([best, worse, tie], tolerance=0.5)
    assert top is best and chosen is best
    assert tie.top1 == best.top1 and -1.0 < tie.interval[0] < -0.5 < 0 < tie.interval[1]
    assert -1.0 < worse.interval[0] < -0.5 and worse.interval[1] < 0
    # a looser tolerance admits the tie first (cheaper than the best), then the cheaper, worse one
    assert choose([best, tie], tolerance=1.0)[0] is tie
    assert choose([best, worse, tie], tolerance=1.0)[0] is worse
    assert best.interval == (0.0, 0.0)  # the best is always a candidate


def test_choose_equal_cost_goes_to_the_best_point_estimate():
    n = 400
    c_best, c_low = _outcomes(360, n), _outcomes(359, n)
    a = Result(SamplerSetting.fitted("fit_ridge"), 100 * c_low.float().mean().item(), latency_ms=1.0, correct=c_low)
    b = Result(SamplerSetting.fitted("fit_ce"), 100 * c_best.float().mean().item(), latency_ms=1.0, correct=c_best)
    assert choose([a, b], tolerance=0.5)[0] is b


def test_choose_prefers_deterministic_at_equal_cost():
    fresh = Result(SamplerSetting(sampler="ddpm", steps=1, draws=1, guidance=1.0, temperature=1.0, noise="fresh"), 90.0, latency_ms=1.0)
    linear = Result(SamplerSetting.fitted("fit_ce"), 90.0, latency_ms=1.0)
    fresh2 = Result(SamplerSetting(sampler="ddpm", steps=1, draws=1, guidance=1.0, temperature=1.0, noise="fresh"), 90.0, latency_ms=1.0)
    assert choose([fresh, linear], 0.1)[0] is linear
    # head passes decide before determinism: the fitted read-out has none
    assert choose([fresh2, linear], 0.1)[0] is linear and linear.setting.head_passes() == 0


def test_table_fits_80_columns_with_whole_labels_and_a_legend():
    from rich.console import Console

    from gendd_deploy.calibration import TABLE_LEGEND, Result, table

    long = SamplerSetting(sampler="ddim", steps=16, draws=8, guidance=2.5, temperature=0.5, noise="fresh", t_start=600, clip=False)
    rs = [Result(REFERENCE, 95.1, 1.0, 30.0), Result(PROBE, 93.2, 0.95, 0.5), Result(long, 94.9, 0.99, 12.0), Result(SamplerSetting.fitted("fit_sampler"), 95.2, 0.99, 0.5)]
    console = Console(width=80, record=True)
    console.print(table(rs, rs[2], rs[3], batch=32, runtime="onnxruntime"))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    for r in rs:  # every label on one line, whole
        assert any(r.setting.label() in line for line in lines), r.setting.label()
    legend = " ".join(" ".join(lines).split())
    assert " ".join(TABLE_LEGEND.split()) in legend and "agree: share of them given the reference sampler's class" in legend
