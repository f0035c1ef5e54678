"""Fitted linear read-outs: fit, calibrate among them, export as a plain student graph."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from gendd_deploy.spec import DeployedSpec
from gendd_deploy.models import readout
from gendd_deploy.models.deployed import SamplerSetting
from gendd_deploy.stages import run_chain
from gendd_deploy.stages.calibrate import CalibrateStage
from gendd_deploy.loaders import load_student
from gendd_deploy.stages.distill import DistillStage
from gendd_deploy.models.student import deterministic_schedule
from gendd_deploy.stages.export import ExportStage
from gendd_deploy.training import model_input

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_ce_separates_and_ridge_recovers_a_linear_teacher():
    g = torch.Generator().manual_seed(0)
    f_s = torch.randn(600, 8, generator=g) * 3 + 1
    true = torch.randn(5, 8, generator=g)
    y = (f_s @ true.T).argmax(1)
    lin = readout.fit_ce(f_s, y, 5)
    assert (lin(f_s).argmax(1) == y).float().mean() > 0.97
    # the teacher feature is an exact linear function of f_s: ridge + fold reproduces its logits
    a, c = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    fc = nn.Linear(6, 5)
    folded = readout.fit_ridge(f_s, f_s @ a.T + c, fc, ridge=1e-8)
    with torch.no_grad():
        torch.testing.assert_close(folded(f_s), fc(f_s @ a.T + c), atol=1e-3, rtol=1e-3)


def test_fitted_readout_beats_the_in_training_probe(tiny_context):
    art = run_chain(DistillStage(), tiny_context("distill.epochs=2"))
    m = art.metrics
    assert m["fit_ce_top1"] > m["probe_top1"], m


def test_label_free_fit_with_labels_false(tiny_context):
    art = run_chain(DistillStage(), tiny_context("distill.epochs=1", "distill.labels=false"))
    assert set(art.manifest["info"]["readouts"]) == {"fit_ridge", "fit_sampler"} and "probe_top1" not in art.metrics
    student = load_student(art)
    assert isinstance(student.readouts["fit_ridge"], nn.Linear)
    lin = student.readouts["fit_ridge"]
    assert lin.weight.shape == (10, art.manifest["info"]["student_feature_dim"]) and torch.isfinite(lin.weight).all()
    assert 0 <= art.metrics["fit_ridge_top1"] <= 100  # its quality is the unit test's business above


def _op_types(path) -> list[str]:
    return sorted(n.op_type for n in onnx.load(str(path)).graph.node)


def test_calibrate_can_choose_a_fitted_readout_and_it_exports_as_a_plain_graph(tiny_context, tmp_path):
    # tolerance 100: every setting qualifies, so the cheapest graph (backbone + Linear) wins, and
    # among those the best-scoring linear read-out; the samplers are kept clearly costlier (8 steps
    # x 5 draws) so timing noise on a busy CPU cannot rank one below a Linear
    ctx = tiny_context("distill.epochs=2", "calibrate.tolerance=100.0", "calibrate.steps=[8]", "calibrate.draws=[5]", "export.exporter='torchscript'")
    sampler = run_chain(CalibrateStage(), ctx)
    labels = [r["label"] for r in __import__("json").loads(sampler.file("table.json").read_text())["settings"]]
    assert "linear fit_ce" in labels and "linear fit_ridge" in labels
    chosen = SamplerSetting.from_dict(sampler.manifest["info"]["setting"])
    assert chosen.linear and chosen.deterministic
    art = run_chain(ExportStage(), ctx)
    info = art.manifest["info"]
    spec = DeployedSpec.from_manifest(info)
    assert not spec.needs_noise and [t.name for t in spec.inputs] == ["images"] and spec.readout == chosen.label()
    assert art.metrics["parity"]["top1_agreement"] == 1.0
    # the same ops as the bare backbone with its own Linear classifier: a plain student's graph
    from gendd_deploy.models.deployed import DeployedModel
    from gendd_deploy.runtime.onnx_export import export_onnx_fast

    student = load_student(ctx.store.list(stage="student")[0])
    plain = tmp_path / "plain.onnx"
    export_onnx_fast(DeployedModel(student.backbone), plain, torch.zeros(2, 1, 8, 8))
    onnx_file = next(p for p in art.path.iterdir() if p.suffix == ".onnx")
    assert _op_types(onnx_file) == _op_types(plain)


def test_sampler_distilled_readout_imitates_the_deterministic_sampler(tiny_context):
    ctx = tiny_context("distill.epochs=2")
    art = run_chain(DistillStage(), ctx)
    student = load_student(art).eval()
    data = ctx.data()
    x = model_input(ctx.data(), data.test.get_batch(torch.arange(len(data.test))), "cpu")
    with torch.no_grad():
        f_s = student.features(x)
        sampled = student.teacher_fc(student.sample_features(f_s, deterministic_schedule(student), "ddim", draws=1, guidance=1.0, temperature=0.0))
        agree = {name: (lin(f_s).argmax(1) == sampled.argmax(1)).float().mean().item() for name, lin in student.readouts.items()}
    # fitted to the sampler's outputs, it agrees with the sampler on unseen images at least as
    # well as the ridge fitted to the teacher's features does
    assert agree["fit_sampler"] >= agree["fit_ridge"] and agree["fit_sampler"] > 0.5, agree


@pytest.mark.parametrize("method", ["kd", "ce"])
def test_a_plain_student_gets_fitted_readouts_calibrates_and_exports_one(tiny_context, method):
    """Read-outs are a property of every student: a kd / ce student is fitted fit_ce and
    fit_ridge, calibrate chooses among them and its own head, and export ships the choice."""
    ctx = tiny_context(f"distill.method='{method}'", "distill.epochs=1", "export.exporter='torchscript'")
    art = run_chain(DistillStage(), ctx)
    assert set(art.manifest["info"]["readouts"]) == {"fit_ce", "fit_ridge"}
    student = load_student(art)
    sampler = run_chain(CalibrateStage(), ctx)
    table = __import__("json").loads(sampler.file("table.json").read_text())["settings"]
    assert [r["label"] for r in table] == ["probe", "linear fit_ce", "linear fit_ridge"]
    chosen = SamplerSetting.from_dict(sampler.manifest["info"]["setting"])
    onnx_art = run_chain(ExportStage(), ctx)
    assert DeployedSpec.from_manifest(onnx_art.manifest["info"]).setting == chosen.to_dict() and onnx_art.metrics["parity"]["top1_agreement"] == 1.0
    # the exported graph computes the chosen head on the backbone's pooled feature
    from gendd_deploy.models import backbone as bb
    from gendd_deploy.runtime.ort import OrtRunner

    data = ctx.data()
    x = model_input(ctx.data(), data.calib.get_batch(torch.arange(16)), "cpu")
    head = student.readouts[chosen.readout] if chosen.kind == "readout" else bb.classifier(student)
    with torch.no_grad():
        want = head(bb.pooled_features(student, x)).numpy()
    got = OrtRunner(onnx_art.file("model.onnx")).run(x.numpy())
    assert abs(got - want).max() < 1e-4
