"""ONNX export of the deployed model and the export stage (gendd_deploy.runtime.onnx_export, stages.export)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gendd_deploy.spec import DeployedSpec
from gendd_deploy.errors import ArtifactError, GateError
from gendd_deploy.models.backbone import create_backbone
from gendd_deploy.models.deployed import DeployedModel, SamplerSetting
from gendd_deploy.models.student import GenDDStudent, HeadSpec
from gendd_deploy.runtime import make_runner
from gendd_deploy.runtime.parity import gate, parity

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from gendd_deploy.runtime.onnx_export import ExportError, describe_onnx, export_onnx, random_ops  # noqa: E402

TOL = 1e-4

# ddpm from t = 999 recovers x0 through sqrt(1 / alpha_bar) ~ 2e4 (gendd-method.md, "Numerical
# pitfalls"): float32 rounding differences between runtimes grow to ~1e-4 there. The floor
# min_alpha_bar = 1e-4 (amplification 1e2) keeps the sampler's structure and the graph comparable.
SETTINGS = {
    "ddpm4x2_cfg2_fresh": SamplerSetting(sampler="ddpm", steps=4, draws=2, guidance=2.0, temperature=1.0, noise="fresh", min_alpha_bar=1e-4),
    "ddim2_t0": SamplerSetting(sampler="ddim", steps=2, draws=1, guidance=1.0, temperature=0.0, noise="fresh", t_start=800),
    "probe": SamplerSetting.probe(),
    "ddpm2_fixed": SamplerSetting(sampler="ddpm", steps=2, draws=2, guidance=2.0, noise="fixed"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def tiny_student(seed: int = 0) -> GenDDStudent:
    """Untrained: D_s = 16, D_t = 32 (2 tokens of 16), head width 32. MAR's zero init of the head's
    output layers is replaced by small random weights so the samples depend on x, t and z."""
    torch.manual_seed(seed)
    backbone = create_backbone("resnet18", 10, 1, True, {"layers": (1, 1, 1, 1), "channels": (8, 8, 8, 16)})
    st = GenDDStudent(backbone, nn.Linear(32, 10), HeadSpec(head_width=32, head_depth=1, token_dim=16, train_timesteps=1000, teacher_dim=32))
    with torch.no_grad():
        h = st.head
        for block in h.res_blocks:
            nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
        nn.init.normal_(h.final_layer.adaLN_modulation[-1].weight, std=0.05)
        nn.init.normal_(h.final_layer.linear.weight, std=0.05)
        st.clip_lo.fill_(-3.0)
        st.clip_hi.fill_(3.0)
    return st.eval()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def ort_runner(path):
    from gendd_deploy.runtime.ort import OrtRunner

    return OrtRunner(path, providers=["CPUExecutionProvider"], intra_op_threads=1)


@pytest.fixture(scope="module")
def student():
    return tiny_student()


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory):
    """name -> (model, onnx path, export info), each setting exported once for the module."""
    out, root = {}, tmp_path_factory.mktemp("onnx")

    def get(name):
        if name not in out:
            model = DeployedModel(student, SETTINGS[name], fixed_noise_seed=5).eval()
            path = root / f"{name}.onnx"
            out[name] = model, path, export_onnx(model, path, torch.from_numpy(images(2, seed=9)))
        return out[name]

    return get


# ---- the graph equals the PyTorch sampler -----------------------------------------------------


@pytest.mark.parametrize("name", list(SETTINGS))
def test_onnx_graph_equals_the_pytorch_sampler(exported, name):
    model, path, info = exported(name)
    ref, got = make_runner("torch", model=model), ort_runner(path)
    assert got.needs_noise == model.needs_noise == (name == "ddpm4x2_cfg2_fresh")
    res = parity(ref, got, images(6), batch=3, seed=11)
    assert res["max_abs_diff"] <= TOL and res["top1_agreement"] == 1.0, res
    # the logits really depend on the input (not a constant graph that trivially matches)
    assert np.ptp(ref.run(images(6), ref.noise(6, 0)), axis=0).max() > 1e-3
    assert random_ops(onnx.load(str(path))) == []
    assert info["exporter"] == "dynamo" and info["opset"] == 18 and info["nodes"] > 0


def test_noise_input_only_for_fresh_noise(exported, student):
    _, _, fresh = exported("ddpm4x2_cfg2_fresh")
    tail = list(DeployedModel(student, SETTINGS["ddpm4x2_cfg2_fresh"]).noise_shape(1)[1:])
    assert fresh["inputs"] == [
        {"name": "images", "dtype": "float32", "shape": ["batch", 1, 8, 8]},
        {"name": "noise", "dtype": "float32", "shape": ["batch", *tail]},
    ]
    assert fresh["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]
    for name in ("ddim2_t0", "probe", "ddpm2_fixed"):
        _, path, info = exported(name)
        assert [i["name"] for i in info["inputs"]] == ["images"], name
        assert describe_onnx(path)["inputs"] == info["inputs"]


def test_fresh_noise_changes_the_output(exported):
    model, path, _ = exported("ddpm4x2_cfg2_fresh")
    r = ort_runner(path)
    x = images(4)
    assert np.abs(r.run(x, r.noise(4, 0)) - r.run(x, r.noise(4, 1))).max() > 1e-4


def test_unfloored_start_at_t999_differs_more_but_agrees(student, tmp_path):
    """The published start (t = 999, no alpha_bar floor): same graph, larger but bounded differences."""
    s = SamplerSetting(sampler="ddpm", steps=2, draws=1, guidance=2.0, noise="fresh")
    model = DeployedModel(student, s).eval()
    export_onnx(model, tmp_path / "p.onnx", torch.from_numpy(images(2)))
    res = parity(make_runner("torch", model=model), ort_runner(tmp_path / "p.onnx"), images(16), batch=8, seed=0)
    assert res["max_abs_diff"] <= 1e-2 and res["top1_agreement"] == 1.0, res


def test_dynamic_batch_one_and_seven(exported):
    model, path, _ = exported("ddpm4x2_cfg2_fresh")
    ref, got = make_runner("torch", model=model), ort_runner(path)
    x = images(7, seed=3)
    for batch in (1, 7):
        res = parity(ref, got, x, batch=batch, seed=2)
        assert res["n"] == 7 and res["max_abs_diff"] <= TOL and res["top1_agreement"] == 1.0, (batch, res)


def test_parity_gate_catches_a_perturbed_model(exported):
    model, path, _ = exported("ddim2_t0")
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.teacher_fc.bias[3] += 0.5  # after export: torch and the graph now disagree
    res = parity(make_runner("torch", model=broken), ort_runner(path), images(8), batch=4, seed=0)
    assert res["max_abs_diff"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(GateError, match=r"ONNX vs torch: parity gate failed on 8 images: max abs logit diff 0.5 \(.* of its image's logit scale at most\) is over atol 0.0001 \+ rtol 0.0001"):
        gate(res, atol=TOL, rtol=1e-4, min_agreement=1.0, what="ONNX vs torch")
    from gendd_deploy.stages.export import float32_floor

    assert "a real mismatch" in float32_floor(broken, images(8), 4, 0, res)  # 0.5 is far beyond float32 rounding


# ---- other models, refusals -------------------------------------------------------------------


def test_bare_timm_model_exports(tmp_path):
    """kd / ce students and teachers: DeployedModel around a bare timm classifier."""
    torch.manual_seed(1)
    net = create_backbone("resnet18", 10, 1, True, {"layers": (1, 1, 1, 1), "channels": (8, 8, 8, 16)}).eval()
    model = DeployedModel(net).eval()
    info = export_onnx(model, tmp_path / "t.onnx", torch.from_numpy(images(1)))  # batch 1 example still gives a dynamic dim
    assert [i["name"] for i in info["inputs"]] == ["images"] and info["inputs"][0]["shape"][0] == "batch"
    res = parity(make_runner("torch", model=model), ort_runner(tmp_path / "t.onnx"), images(5), batch=5, seed=0)
    assert res["max_abs_diff"] <= TOL and res["top1_agreement"] == 1.0


class _Noisy(nn.Module):
    def forward(self, images):
        return images.flatten(1) + torch.randn_like(images.flatten(1))


def test_random_ops_are_refused_and_nothing_is_left_behind(tmp_path):
    model = DeployedModel(_Noisy()).eval()
    with pytest.raises(ExportError, match="random ops.*RandomNormalLike"):
        export_onnx(model, tmp_path / "r.onnx", torch.zeros(2, 1, 2, 2))
    assert list(tmp_path.iterdir()) == []


def test_random_ops_found_in_subgraphs():
    from onnx import helper

    body = helper.make_graph([helper.make_node("RandomUniformLike", ["x"], ["y"])], "b", [], [])
    node = helper.make_node("If", ["c"], ["o"], then_branch=body, else_branch=body)
    proto = helper.make_model(helper.make_graph([node], "g", [], []))
    assert random_ops(proto) == ["RandomUniformLike"]


# ---- the export stage -------------------------------------------------------------------------


def publish_sampler(ctx, setting: SamplerSetting, fixed_noise_seed: int = 0):
    """What `gendd calibrate` publishes, written directly (its grid search is not under test here)."""
    from gendd_deploy.stages.calibrate import CalibrateStage
    from gendd_deploy.stages.distill import DistillStage

    stage = CalibrateStage()
    student = DistillStage().require(ctx)
    with ctx.store.draft(ctx.pipeline, stage.artifact, stage.fingerprint(ctx), stage.config(ctx), [student], {"data": ctx.data().fingerprint}) as d:
        d.path("table.json").write_text("{}")
        d.info.update(setting=setting.to_dict(), fixed_noise_seed=fixed_noise_seed, label=setting.label())
        return d.publish()


@pytest.mark.slow
def test_export_stage_end_to_end(tiny_context):
    """teacher -> cache -> distill (tiny, 1 epoch) -> hand-published sampler -> export, then reuse."""
    from gendd_deploy.artifacts import verify_artifact
    from gendd_deploy.stages import run_chain
    from gendd_deploy.stages.distill import DistillStage
    from gendd_deploy.loaders import artifact_runner, deployed_from_artifacts, deployed_from_export, runner_for_artifact
    from gendd_deploy.stages.export import ExportStage

    ctx = tiny_context("teacher.epochs=1", "distill.epochs=1", "data.train_limit=128", "data.test_limit=32", "export.parity_limit=24")
    with pytest.raises(ArtifactError, match="no student artifact"):
        ExportStage().run(ctx)
    student = run_chain(DistillStage(), ctx)
    setting = SamplerSetting(sampler="ddpm", steps=2, draws=1, guidance=2.0, noise="fresh", t_start=800)
    sampler = publish_sampler(ctx, setting)

    art = ExportStage().run(ctx)
    assert verify_artifact(art) == []
    info, m = art.manifest["info"], art.metrics
    spec = DeployedSpec.from_manifest(info)
    assert spec.needs_noise and spec.setting == setting.to_dict() and spec.readout == setting.label() and info["exporter"] == "dynamo"
    assert [t.name for t in spec.inputs] == ["images", "noise"] and spec.noise_tail == deployed_from_artifacts(student, sampler).noise_tail
    assert spec.preprocess == ctx.data().preprocess and list(spec.class_names) == ctx.data().class_names and spec.num_classes == 10
    par = m["parity"]
    assert par["n"] == 24 and par["max_abs_diff"] <= ctx.recipe.export.atol and par["top1_agreement"] == 1.0
    assert m["onnx_bytes"] > 0 and par["atol"] == 1e-4 and par["rtol"] == 1e-4 and par["reference"].startswith("PyTorch eager")
    assert {i["stage"] for i in art.manifest["inputs"]} == {"student", "sampler", "data"}

    # library helpers rebuild the same model and runner
    runner = artifact_runner(art)
    assert runner.noise_shape_tail == spec.noise_tail and runner.spec == spec
    model = deployed_from_artifacts(student, sampler)
    assert deployed_from_export(art, ctx.store).setting == model.setting == setting
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    torch_runner, ran = runner_for_artifact(ctx.store, "torch", art, device=ctx.device, command=ctx.command)
    assert ran.path == art.path
    res = parity(torch_runner, runner, x, batch=3, seed=0)
    assert res["max_abs_diff"] <= 1e-4

    assert ExportStage().run(ctx).path == art.path  # same fingerprint: reused

    # a gate that cannot pass fails the stage and publishes nothing
    strict = tiny_context("teacher.epochs=1", "distill.epochs=1", "data.train_limit=128", "data.test_limit=32", "export.parity_limit=24", "export.atol=1e-30", "export.rtol=0")
    with pytest.raises(GateError, match=r"ONNX Runtime \(CPU\) vs PyTorch: parity gate failed on 24 images.*float32 rounding, not a mismatch"):
        ExportStage().run(strict)  # an impossible atol: what is left is rounding, and the message says so
    assert len(ctx.store.list(stage="onnx")) == 1
    assert not list((ctx.store.stage_dir("tiny", "onnx")).glob(".tmp-*"))


def test_deployed_from_artifacts_refuses_a_foreign_sampler(student, tmp_path):
    """A sampler calibrated for another student is refused, naming the command."""
    import json

    from gendd_deploy.artifacts import Store

    store = Store(tmp_path)
    with store.draft("p", "student", "a" * 64, {}, []) as d:
        torch.save(student.state_dict(), d.path("model.pt"))
        arch = {"model": "resnet18", "num_classes": 10, "in_chans": 1, "small_input": True, "model_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 16]}, "stem_width": 8}
        d.info.update(method="gendd", architecture=arch, head={"teacher_dim": 32, "width": 32, "depth": 1, "token_dim": 16, "train_timesteps": 1000})
        st = d.publish()
    with store.draft("p", "sampler", "b" * 64, {}, []) as d:
        d.path("table.json").write_text(json.dumps({}))
        d.info.update(setting=SamplerSetting.probe().to_dict(), fixed_noise_seed=0)
        foreign = d.publish()
    with pytest.raises(ArtifactError, match="calibrated for another student.*gendd calibrate"):
        deployed_from_artifacts_(st, foreign)
    with pytest.raises(ArtifactError, match="needs a sampler artifact"):
        deployed_from_artifacts_(st, None)
    with store.draft("p", "sampler", "c" * 64, {}, [st]) as d:
        d.path("table.json").write_text(json.dumps({}))
        d.info.update(setting=SamplerSetting.probe().to_dict(), fixed_noise_seed=0)
        ours = d.publish()
    model = deployed_from_artifacts_(st, ours)
    x = torch.from_numpy(images(2))
    torch.testing.assert_close(model(x), student.probe_logits(student.features(x)))


def deployed_from_artifacts_(*a):
    from gendd_deploy.loaders import deployed_from_artifacts

    return deployed_from_artifacts(*a)
