"""TensorRT build path: precision plan, profiles, compatibility, ONNX precision conversion, no-TensorRT refusal.

Everything above the GPU section runs on any machine. The GPU section builds tiny engines and
skips with the reason where TensorRT or a CUDA GPU is absent.
"""

import dataclasses
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from gendd_deploy.runtime.parity import compare, gate
from gendd_deploy.runtime.registry import RUNTIMES
from gendd_deploy.runtime.timing import summary
from gendd_deploy.config import BuildConfig
from gendd_deploy.errors import ArtifactError, GateError, MissingDependency, UsageError
from gendd_deploy.spec import DeployedSpec, onnx_io
from gendd_deploy.runtime.tensorrt import check_compatible, trt_major
from gendd_deploy.trt import plan as P
from gendd_deploy.trt.precision import convert_precision, gate_conversion, ort_logits
from conftest import ONNX_IR

NOISE_TAIL = (3, 2, 1, 16)  # (steps+1, draws, tokens, token_dim)


class Tiny(nn.Module):
    """images (B, 1, 8, 8) [, noise (B, 3, 2, 1, 16)] -> logits (B, 10), with sampler-like arithmetic."""

    def __init__(self, noise: bool):
        super().__init__()
        self.noise = noise
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, images, noise=None):
        f = self.norm(torch.relu(self.conv(images)).mean((2, 3)))  # (B, 8)
        h = torch.tanh(self.head(f))  # (B, 16)
        if self.noise:
            eps = noise.mean(dim=(1, 2, 3))  # (B, 16)
            # an x0 estimate at t ~ T: constants beyond 1e4 (1 / sqrt(alpha_bar)) must survive fp16
            x0 = (h * 2.0e4 - eps * 1.5e4) * 5e-5
            h = torch.clamp(x0, -1e4, 1e4)
        return self.fc(h)


def export_tiny(path, noise: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny(noise).eval()
    args = (torch.randn(2, 1, 8, 8),) + ((torch.randn((2,) + NOISE_TAIL),) if noise else ())
    names = ["images"] + (["noise"] if noise else [])
    axes = {n: {0: "batch"} for n in names + ["logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but fast on 2 cores
        torch.onnx.export(model, args, str(path), input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=18, dynamo=False)
    return path


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return {"plain": export_tiny(d / "plain.onnx", False), "noise": export_tiny(d / "noise.onnx", True)}


def inputs_for(kind, n=48, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((n,) + NOISE_TAIL).astype(np.float32) if kind == "noise" else None
    return images, noise


# ---- precision plan -------------------------------------------------------------------------


@pytest.mark.parametrize("precision,flags", [("fp32", ()), ("fp16", ("FP16",)), ("bf16", ("BF16",))])
def test_trt10_uses_builder_flags_on_a_weakly_typed_network(precision, flags):
    plan = P.precision_plan(10, precision)
    assert plan.builder_flags == flags
    assert plan.onnx_conversion is None and not plan.strongly_typed and plan.network_flags == ()


@pytest.mark.parametrize("major", [11, 12])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_trt11_converts_the_onnx_graph_and_builds_strongly_typed(major, precision):
    plan = P.precision_plan(major, precision)
    assert plan.builder_flags == ()  # BuilderFlag.FP16 / BF16 no longer exist
    assert plan.onnx_conversion == (None if precision == "fp32" else precision)
    assert plan.strongly_typed and plan.network_flags == ("STRONGLY_TYPED",)
    assert plan.to_dict()["precision"] == precision and f"TensorRT {major}" in plan.describe()


def test_precision_plan_refuses_old_tensorrt_and_unknown_precision():
    with pytest.raises(UsageError, match="10.x or 11.x"):
        P.precision_plan(8, "fp16")
    with pytest.raises(UsageError, match="fp32, fp16, bf16, int8"):
        P.precision_plan(10, "int4")
    assert trt_major("10.9.0.34") == 10 and trt_major("11.0.1") == 11


@pytest.mark.parametrize("major", [10, 11])
def test_int8_is_explicit_quantization_on_a_strongly_typed_network(major):
    """TensorRT: Q/DQ networks are built strongly typed, with no precision flags (and 11 has none)."""
    plan = P.precision_plan(major, "int8")
    assert plan.builder_flags == () and plan.onnx_conversion is None and plan.strongly_typed and plan.network_flags == ("STRONGLY_TYPED",)
    assert "QDQ graph" in plan.describe()


def test_an_int8_build_needs_an_int8_export(tmp_path):
    from gendd_deploy.artifacts import Artifact
    from gendd_deploy.stages.build import int8_graph

    fp32 = Artifact(tmp_path, {"info": {"precision": {"kept": "fp32"}}, "pipeline": "p", "stage": "onnx", "version": "v001"})
    with pytest.raises(UsageError, match="needs an int8 export with a TensorRT graph.*it is a fp32 export.*--precision int8"):
        int8_graph(fp32)
    (tmp_path / "model.trt-int8.onnx").write_bytes(b"x")
    int8 = Artifact(tmp_path, {"info": {"precision": {"kept": "int8", "tensorrt_graph": {"file": "model.trt-int8.onnx"}}}, "files": [{"path": "model.trt-int8.onnx"}], "pipeline": "p", "stage": "onnx", "version": "v001"})
    assert int8_graph(int8) == tmp_path / "model.trt-int8.onnx"


# ---- profile shapes -------------------------------------------------------------------------


def test_profile_shapes_from_the_recipe_cover_every_input_incl_noise(onnx_models):
    io = onnx_io(onnx_models["noise"])
    assert [i["name"] for i in io["inputs"]] == ["images", "noise"] and io["outputs"][0]["name"] == "logits"
    shapes = P.profile_shapes(io, BuildConfig(min_batch=1, opt_batch=8, max_batch=64))
    assert shapes == {
        "images": ((1, 1, 8, 8), (8, 1, 8, 8), (64, 1, 8, 8)),
        "noise": ((1,) + NOISE_TAIL, (8,) + NOISE_TAIL, (64,) + NOISE_TAIL),
    }
    plain = P.profile_shapes(onnx_io(onnx_models["plain"]), BuildConfig())
    assert list(plain) == ["images"] and plain["images"][2] == (256, 1, 8, 8)  # default max_batch
    assert P.profile_to_json(shapes)["noise"]["opt"] == [8, *NOISE_TAIL]


def test_profile_shapes_refuse_fixed_batch_and_dynamic_image_dims():
    with pytest.raises(UsageError, match="fixed batch dim"):
        P.profile_shapes({"images": [4, 1, 8, 8]}, BuildConfig())
    with pytest.raises(UsageError, match="dynamic non-batch dim"):
        P.profile_shapes({"images": ["batch", 1, "h", 8]}, BuildConfig())


# ---- engine compatibility -------------------------------------------------------------------

BUILT = {"tensorrt": "10.9.0.34", "cuda": "12.8", "gpu": "NVIDIA H100 80GB HBM3", "gpu_capability": "9.0"}


def test_check_compatible_accepts_the_same_machine():
    check_compatible(BUILT, dict(BUILT, cuda="12.9"))  # CUDA minor is recorded, not compared


@pytest.mark.parametrize(
    "here,what",
    [
        (dict(BUILT, tensorrt="11.0.0.7"), "TensorRT version"),
        (dict(BUILT, gpu="NVIDIA A100-SXM4-80GB", gpu_capability="8.0"), "GPU, compute capability"),
        (dict(BUILT, gpu="NVIDIA H200"), "different GPU"),
        ({"tensorrt": None, "cuda": None, "gpu": None, "gpu_capability": None}, "TensorRT version"),
    ],
)
def test_check_compatible_refuses_a_mismatch_naming_both_sides(here, what):
    with pytest.raises(ArtifactError) as e:
        check_compatible(BUILT, here, rebuild_hint="gendd build -p x.toml")
    msg = str(e.value)
    assert what in msg and "gendd build -p x.toml" in msg
    assert "TensorRT 10.9.0.34" in msg and "NVIDIA H100 80GB HBM3" in msg  # the engine's side
    here_trt = f"TensorRT {here['tensorrt']}" if here["tensorrt"] else "no TensorRT"
    assert here_trt in msg and (here["gpu"] or "no GPU") in msg  # this machine's side


def test_check_compatible_refuses_a_manifest_without_identity():
    with pytest.raises(ArtifactError, match="lacks gpu"):
        check_compatible({"tensorrt": "10.9.0"}, BUILT)


def test_timing_cache_key_is_gpu_capability_and_tensorrt():
    assert P.timing_cache_key(BUILT) == {"gpu": BUILT["gpu"], "gpu_capability": "9.0", "tensorrt": "10.9.0.34"}


# ---- parity gate and parser errors ----------------------------------------------------------


def test_parity_gate_reports_the_measured_numbers():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    gate(compare(ref, ref + 0.01), atol=0.05, min_agreement=1.0, what="x")
    with pytest.raises(GateError, match=r"max abs logit diff 0.1 \(0.1 of its image.s logit scale at most\) is over atol 0.05"):
        gate(compare(ref, ref + 0.1), atol=0.05, min_agreement=1.0, what="x")
    with pytest.raises(GateError, match="top-1 agreement 0.5000 < 1"):
        gate(compare(ref, ref[[0, 0]]), atol=10, min_agreement=1.0, what="x")
    with pytest.raises(GateError, match="non-finite"):
        gate(compare(ref, np.full_like(ref, np.nan)), atol=10, min_agreement=0.0, what="x")
    with pytest.raises(GateError, match="output shapes differ"):
        compare(ref, ref[:1])


def test_parser_errors_are_reported_one_by_one():
    msg = P.format_parser_errors(
        "model.onnx",
        [
            {"desc": "no importer for op Foo", "code": "UNSUPPORTED_NODE", "node": 7, "node_name": "/head/foo", "node_operator": "Foo"},
            {"desc": "bad weights", "code": None, "node": -1},
        ],
    )
    lines = msg.splitlines()
    assert "rejected model.onnx with 2 error(s)" in lines[0]
    assert lines[1].strip() == "1. node 7 '/head/foo' (Foo): no importer for op Foo [UNSUPPORTED_NODE]"
    assert lines[2].strip() == "2. graph: bad weights"


# ---- ONNX -> ONNX precision conversion ------------------------------------------------------


def _tools():
    tools = ["builtin"]
    try:
        import onnxconverter_common  # noqa: F401

        tools.insert(0, "onnxconverter-common")
    except ImportError:
        pass
    return tools


@pytest.mark.parametrize("tool", _tools())
@pytest.mark.parametrize("kind", ["plain", "noise"])
def test_fp16_conversion_passes_its_parity_gate_on_cpu(onnx_models, tmp_path, tool, kind):
    src, dst = onnx_models[kind], tmp_path / "model.fp16.onnx"
    report = convert_precision(src, dst, "fp16", tool=tool)
    assert report["tool"] == tool and report["version"] >= 1 and report["io"] == "float32"
    m = onnx.load(dst)
    # the interface is unchanged: float32 in and out, same names
    assert [(v.name, v.type.tensor_type.elem_type) for v in m.graph.input] == [(v["name"], 1) for v in onnx_io(src)["inputs"]]
    assert [v.type.tensor_type.elem_type for v in m.graph.output] == [onnx.TensorProto.FLOAT]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    images, noise = inputs_for(kind)
    cfg = BuildConfig()
    gate = gate_conversion(src, dst, images, noise, "fp16", atol=cfg.atol, min_agreement=cfg.min_agreement, batch=16)
    assert gate["gate"] == "full" and gate["cpu_runnable"] and gate["top1_agreement"] >= cfg.min_agreement
    assert 0 < gate["max_abs_diff"] <= cfg.atol  # really reduced precision, and within the gate


def test_conversion_gate_refuses_out_of_tolerance(onnx_models, tmp_path):
    dst = tmp_path / "m.onnx"
    convert_precision(onnx_models["noise"], dst, "fp16")
    images, noise = inputs_for("noise")
    with pytest.raises(GateError, match="fp16 ONNX conversion .* parity gate failed on 48 calibration images"):
        gate_conversion(onnx_models["noise"], dst, images, noise, "fp16", atol=1e-7, min_agreement=1.0)


def test_bf16_conversion_type_checks_and_gates_what_the_cpu_can(onnx_models, tmp_path):
    src, dst = onnx_models["noise"], tmp_path / "model.bf16.onnx"
    report = convert_precision(src, dst, "bf16")
    assert report["tool"] == "builtin" and report["opset"] >= 22  # bfloat16 Conv enters ONNX at opset 22
    m = onnx.load(dst)
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in m.graph.initializer)
    assert {v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)} == {onnx.TensorProto.FLOAT}
    images, noise = inputs_for("noise")
    # bf16 keeps ~3 significant digits: looser bounds than fp16 for this untrained net's near-tied logits
    gate = gate_conversion(src, dst, images, noise, "bf16", atol=0.1, min_agreement=0.9, batch=16)
    if gate["gate"] == "weights_only":  # ORT CPU has no bf16 Conv / MatMul kernels: said, not hidden
        assert not gate["cpu_runnable"] and "cannot run the bf16 graph" in gate["reason"]
        assert "engine parity gate on the GPU" in gate["reason"]
    assert 0 < gate["max_abs_diff"] <= 0.1


def test_reference_logits_match_torch(onnx_models):
    torch.manual_seed(0)
    model = Tiny(True).eval()
    images, noise = inputs_for("noise", n=10)
    with torch.no_grad():
        want = model(torch.from_numpy(images), torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(ort_logits(onnx_models["noise"], images, noise, batch=4), want, atol=1e-5)


# ---- without TensorRT or a GPU: refuse, write nothing ---------------------------------------


def _no_tensorrt():
    raise ImportError("No module named 'tensorrt'")


class _FakeTrt:
    __version__ = "8.6.1"


@pytest.mark.parametrize(
    "trt_import,gpu,expect",
    [
        (_no_tensorrt, (None, None, None), ["TensorRT is not installed", "no NVIDIA GPU is visible"]),
        (_no_tensorrt, ("NVIDIA H100", "9.0", "12.8"), ["TensorRT is not installed"]),
        (lambda: type("T", (), {"__version__": "10.9.0"}), (None, None, None), ["no NVIDIA GPU is visible"]),
        (lambda: _FakeTrt, ("NVIDIA H100", "9.0", "12.8"), ["TensorRT 8.6.1 is installed but gendd supports TensorRT 10.x and 11.x"]),
    ],
)
def test_build_without_tensorrt_or_gpu_refuses_and_writes_nothing(tiny_context, tmp_path, monkeypatch, trt_import, gpu, expect):
    import gendd_deploy.runtime.tensorrt as trt_pkg
    from gendd_deploy.stages.build import BuildStage, export_and_build

    monkeypatch.setattr(trt_pkg, "import_tensorrt", trt_import)
    monkeypatch.setattr(trt_pkg, "_gpu", lambda: gpu)
    root = tmp_path / "artifacts"
    for attempt in (lambda: BuildStage().run(tiny_context()), lambda: export_and_build(tiny_context())):
        with pytest.raises(MissingDependency) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and "pip install 'gendd-deploy[trt]'" in msg and "NVIDIA GPU" in msg
        for part in expect:
            assert part in msg
        assert e.value.exit_code == 5
        assert not root.exists(), "nothing may be written without TensorRT"


def test_cli_build_exits_5_with_the_install_hint(tiny_recipe, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import gendd_deploy.runtime.tensorrt as trt_pkg
    from gendd_deploy import stages
    from gendd_deploy.cli import app

    monkeypatch.setattr(trt_pkg, "import_tensorrt", _no_tensorrt)
    monkeypatch.setitem(stages._REGISTRY, "build", ("gendd_deploy.stages.build", "BuildStage"))  # until cli wiring lands
    monkeypatch.setattr(stages, "_INSTANCES", {})
    root = tmp_path / "artifacts"
    result = CliRunner().invoke(app, ["build", "-p", str(tiny_recipe), "--artifacts", str(root)])
    out = " ".join(result.output.split())  # rich may wrap the line at the terminal width
    assert result.exit_code == 5, result.output
    assert "pip install 'gendd-deploy[trt]'" in out and "Traceback" not in out
    assert not root.exists()


def _fake_machine(monkeypatch, version):
    import gendd_deploy.runtime.tensorrt as trt_pkg

    monkeypatch.setattr(trt_pkg, "import_tensorrt", lambda: type("T", (), {"__version__": version}))
    monkeypatch.setattr(trt_pkg, "_gpu", lambda: ("NVIDIA H100 80GB HBM3", "9.0", "12.8"))


@pytest.mark.parametrize("version", ["10.9.0.34", "11.0.0.7"])
def test_build_config_carries_tensorrt_gpu_and_the_precision_plan(tiny_context, monkeypatch, version):
    from gendd_deploy.stages.build import BuildStage
    from gendd_deploy.trt.precision import CONVERSION_VERSION

    _fake_machine(monkeypatch, version)
    cfg = BuildStage().config(tiny_context("build.precision='fp16'"))
    assert cfg["tensorrt"] == version and cfg["gpu"] == "NVIDIA H100 80GB HBM3" and cfg["gpu_capability"] == "9.0"
    assert cfg["precision"] == "fp16" and cfg["max_batch"] == BuildConfig().max_batch
    if version.startswith("10"):
        assert tuple(cfg["precision_plan"]["builder_flags"]) == ("FP16",)
        assert "conversion" not in cfg
    else:  # the versioned ONNX conversion step is part of the engine's fingerprint
        assert cfg["precision_plan"]["onnx_conversion"] == "fp16" and cfg["precision_plan"]["strongly_typed"]
        assert cfg["conversion"]["version"] == CONVERSION_VERSION and cfg["conversion"]["tool"] in ("onnxconverter-common", "builtin")


def test_timing_cache_artifact_is_keyed_reused_and_grown(tiny_context):
    from gendd_deploy.artifacts import verify_artifact
    from gendd_deploy.stages.build import TIMING_CACHE, TIMING_FILE, find_timing_cache, save_timing_cache

    ctx = tiny_context()
    key = P.timing_cache_key(BUILT)
    assert find_timing_cache(ctx, key) is None
    first = save_timing_cache(ctx, key, b"tactics-1", None)
    assert first.stage == TIMING_CACHE and first.file(TIMING_FILE).read_bytes() == b"tactics-1" and verify_artifact(first) == []
    assert find_timing_cache(ctx, key).path == first.path
    assert save_timing_cache(ctx, key, b"tactics-1", first).path == first.path  # unchanged: no new version
    grown = save_timing_cache(ctx, key, b"tactics-1+2", first)
    assert grown.version == "v002" and grown.manifest["info"]["grown_from"] == first.ref
    assert find_timing_cache(ctx, key).path == grown.path  # the next build starts from the grown cache
    assert find_timing_cache(ctx, P.timing_cache_key(dict(BUILT, tensorrt="11.0.0"))) is None  # another TensorRT: its own cache


@pytest.mark.parametrize("version", ["10.9.0.34", "11.0.0.7"])
def test_build_stage_flow_with_tensorrt_stood_in_by_onnxruntime(tiny_context, onnx_models, monkeypatch, version):
    """BuildStage.build end to end on a CPU: TensorRT's builder and runner are replaced by fakes that run
    the graph they were given on ORT, so the conversion, gates, timing cache and manifest are real."""
    import gendd_deploy.stages.build as build_mod
    from gendd_deploy.artifacts import verify_artifact
    from gendd_deploy.stages.build import BuildStage, find_timing_cache
    from gendd_deploy.trt.builder import BuiltEngine

    _fake_machine(monkeypatch, version)
    seen = {}

    class FakeBuilder:
        def __init__(self, workspace_mb):
            seen["workspace_mb"] = workspace_mb

        def build(self, onnx_path, plan, shapes, timing_cache=None):
            seen.update(graph=onnx_path, plan=plan, shapes=shapes, cache_in=timing_cache)
            return BuiltEngine(plan=str(onnx_path).encode(), timing_cache=(timing_cache or b"") + b"+tactics", build_s=0.01)

    class FakeRunner:
        def __init__(self, path, spec=None, check=True):
            self.graph = open(path, "rb").read().decode()  # the fake plan is the path of the graph it was built from

        def run(self, images, noise=None):
            return ort_logits(self.graph, images, noise)

        def latency_ms(self, batch):
            return {"batch": batch, **summary([0.1])}

    monkeypatch.setattr(build_mod, "EngineBuilder", FakeBuilder)  # the names the build stage calls
    fake = dataclasses.replace(RUNTIMES["tensorrt"], runner=lambda path=None, spec=None, check=True, **_: FakeRunner(path))
    monkeypatch.setitem(RUNTIMES, "tensorrt", fake)  # the build makes its runner through the registry
    ctx = tiny_context("build.precision='fp16'", "build.opt_batch=8", "build.max_batch=16", "export.parity_limit=40")
    with ctx.store.draft(ctx.pipeline, "onnx", "f" * 64, {}, []) as d:  # stands in for ExportStage's artifact
        d.path("model.onnx").write_bytes(open(onnx_models["noise"], "rb").read())
        d.info = {"deployed": DeployedSpec.from_io(onnx_io(onnx_models["noise"])).to_manifest()}
        onnx_art = d.publish()

    def build_once():
        with ctx.store.draft(ctx.pipeline, "engine", "9" * 64, {}, [onnx_art]) as draft:
            BuildStage().build(ctx, draft, {"onnx": onnx_art})
            return draft.publish()

    engine = build_once()
    info, m = engine.manifest["info"], engine.metrics
    assert verify_artifact(engine) == [] and engine.file("model.plan")
    assert info["tensorrt"] == version and info["gpu"] == "NVIDIA H100 80GB HBM3" and info["gpu_capability"] == "9.0" and info["cuda"] == "12.8"
    assert info["onnx"]["fingerprint"] == onnx_art.fingerprint and len(info["onnx"]["sha256"]) == 64
    assert info["profile"]["noise"]["max"] == [16, *NOISE_TAIL] and seen["shapes"]["images"][1] == (8, 1, 8, 8)
    assert info["deployed"] == onnx_art.manifest["info"]["deployed"]  # copied unchanged
    assert DeployedSpec.from_manifest(info).noise_tail == NOISE_TAIL
    par = m["parity"]
    assert par["n"] == 40 and par["top1_agreement"] >= 0.99 and par["atol"] == BuildConfig().atol and "ONNX Runtime" in par["reference"]
    assert m["latency"]["batch"] == 8 and m["latency"]["p50_ms"] == 0.1
    if version.startswith("11"):  # the graph handed to TensorRT is the converted, separately gated one
        assert str(seen["graph"]).endswith("model.fp16.onnx") and engine.file("model.fp16.onnx")
        assert info["conversion"]["gate"]["gate"] == "full" and m["conversion_parity"]["gate"] == "full"
        assert 0 < par["max_abs_diff"] <= BuildConfig().atol
    else:  # builder flags: the fp32 graph goes to TensorRT unchanged
        assert seen["plan"].builder_flags == ("FP16",) and info["conversion"] is None
        assert par["max_abs_diff"] == 0.0
    assert seen["cache_in"] is None and info["timing_cache"]["used"] is None
    again = build_once()
    assert seen["cache_in"] == b"+tactics"  # the second build starts from the first one's cache
    assert again.manifest["info"]["timing_cache"]["used"] == info["timing_cache"]["saved"]
    assert find_timing_cache(ctx, P.timing_cache_key(info)).file("timing.cache").read_bytes() == b"+tactics+tactics"


# ---- with TensorRT and a GPU ----------------------------------------------------------------


def _need_trt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'gendd-deploy[trt]')")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    return trt


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["plain", "noise"])
def test_engine_builds_matches_onnxruntime_and_runs(onnx_models, tmp_path, precision, kind):
    trt = _need_trt()
    from gendd_deploy.trt.builder import EngineBuilder
    from gendd_deploy.runtime.tensorrt import TrtRunner

    plan = P.precision_plan(trt_major(trt.__version__), precision)
    graph = onnx_models[kind]
    if plan.onnx_conversion:
        graph = tmp_path / "converted.onnx"
        convert_precision(onnx_models[kind], graph, plan.onnx_conversion)
    cfg = BuildConfig(min_batch=1, opt_batch=8, max_batch=32, workspace_mb=256)
    shapes = P.profile_shapes(onnx_io(onnx_models[kind]), cfg)
    built = EngineBuilder(cfg.workspace_mb).build(graph, plan, shapes)
    assert built.plan and built.timing_cache
    (tmp_path / "model.plan").write_bytes(built.plan)

    runner = TrtRunner(tmp_path / "model.plan", check=False)  # no manifest: the engine's own tensors describe it
    images, noise = inputs_for(kind, n=48)  # 48 > max_batch: the runner splits
    report = compare(ort_logits(onnx_models[kind], images, noise), runner.run(images, noise))
    gate(report, cfg.atol, cfg.min_agreement, f"{precision} engine")
    lat = runner.latency_ms(8, iters=10, warmup=2)
    assert lat["median_ms"] > 0
    print(f"\n{kind} {precision}: TensorRT {trt.__version__} median {lat['median_ms']:.3f} ms/batch of 8, max |diff| {report['max_abs_diff']:.2e}")

    again = EngineBuilder(cfg.workspace_mb).build(graph, plan, shapes, timing_cache=built.timing_cache)
    assert len(again.timing_cache) >= len(built.timing_cache) // 2  # the cache was accepted and kept


@pytest.mark.tensorrt
def test_engine_manifest_mismatch_is_refused_by_the_runner(onnx_models, tmp_path):
    trt = _need_trt()
    import json

    from gendd_deploy.trt.builder import EngineBuilder
    from gendd_deploy.runtime.tensorrt import TrtRunner

    plan = P.precision_plan(trt_major(trt.__version__), "fp32")
    shapes = P.profile_shapes(onnx_io(onnx_models["plain"]), BuildConfig(opt_batch=4, max_batch=8))
    (tmp_path / "model.plan").write_bytes(EngineBuilder(256).build(onnx_models["plain"], plan, shapes).plan)
    info = {"tensorrt": "9.9.9", "gpu": "Some Other GPU", "gpu_capability": "1.0", "cuda": "11.0"}
    (tmp_path / "manifest.json").write_text(json.dumps({"info": info}))
    with pytest.raises(ArtifactError, match="TensorRT 9.9.9.*Some Other GPU.*cannot run with TensorRT"):
        TrtRunner(tmp_path / "model.plan")


@pytest.mark.tensorrt
def test_parser_rejects_an_unknown_op_with_numbered_errors(tmp_path):
    _need_trt()
    from onnx import TensorProto, helper

    from gendd_deploy.trt.builder import EngineBuilder, OnnxParseError

    node = helper.make_node("NoSuchOp", ["images"], ["logits"], domain="example.custom", name="mystery")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("example.custom", 1)], ir_version=ONNX_IR)
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(OnnxParseError) as e:
        EngineBuilder(64).build(tmp_path / "bad.onnx", P.precision_plan(10, "fp32"), {"images": ((1, 4), (2, 4), (4, 4))})
    assert e.value.errors and e.value.errors[0].startswith("1. ") and "NoSuchOp" in str(e.value)
