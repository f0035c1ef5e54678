"""INT8 export: the QDQ graphs, the accuracy gate that refuses a coarse quantization, auto's choice
from measured timings, and the export stage end to end (served and written for Triton; no test
image read)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from gendd_deploy.errors import GateError
from gendd_deploy.runtime import quantize
from gendd_deploy.runtime.ort import OrtRunner
from test_serve import export_tiny_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small conv net (images (B, 1, 8, 8) -> 10 logits), images, and its own top-1 as labels."""
    path = export_tiny_onnx(tmp_path_factory.mktemp("q") / "fp32.onnx")
    x = np.random.default_rng(0).standard_normal((96, 1, 8, 8)).astype(np.float32)
    labels = OrtRunner(path, intra_op_threads=1).run(x).argmax(1)
    return path, x, labels


def _quantize(path, x, out, **kw):
    return quantize.quantize_int8(path, out, x, input_names=["images"], noise=lambda n, i: None, method=kw.pop("method", "minmax"), **kw)


def _activation_types(path) -> set[int]:
    """Element types of the zero points of the activation QuantizeLinear nodes."""
    g = onnx.load(str(path)).graph
    inits = {t.name: t for t in g.initializer}
    return {inits[n.input[2]].data_type for n in g.node if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}


@pytest.mark.parametrize("target, dtype", [("onnxruntime", onnx.TensorProto.UINT8), ("tensorrt", onnx.TensorProto.INT8)])
def test_the_qdq_graph_keeps_the_interface_and_the_answers(tiny, tmp_path, target, dtype):
    path, x, labels = tiny
    info = _quantize(path, x[:32], tmp_path / "q.onnx", target=target)
    assert info["format"] == "QDQ" and info["calibration_images"] == 32 and info["target"] == target
    assert _activation_types(tmp_path / "q.onnx") == {dtype}  # u8 activations for ORT's fused kernels, s8 for TensorRT
    q = OrtRunner(tmp_path / "q.onnx", intra_op_threads=1)
    assert [i.name for i in q.session.get_inputs()] == ["images"] and q.session.get_inputs()[0].type == "tensor(float)"
    r = quantize.gate_int8(OrtRunner(path, intra_op_threads=1), q, x[32:], labels[32:], method="minmax", batch=16, seed=0)
    assert r.fp32_top1 == 100.0 and r.drop <= 5.0 and r.parity["top1_agreement"] >= 0.95
    quantize.refuse([r], max_drop=5.0, images=64)


def test_the_gate_refuses_a_coarse_quantization(tiny, tmp_path):
    """Ranges calibrated on images 1000x too small: every real activation saturates."""
    path, x, labels = tiny
    _quantize(path, x[:32] * 1e-3, tmp_path / "coarse.onnx")
    r = quantize.gate_int8(OrtRunner(path, intra_op_threads=1), OrtRunner(tmp_path / "coarse.onnx", intra_op_threads=1), x[32:], labels[32:], method="minmax", batch=16, seed=0)
    assert r.drop > 10
    with pytest.raises(GateError, match=r"int8 loses more than \[export\] max_top1_drop = 0.5 top-1 points on 64 held-out calibration images.*minmax"):
        quantize.refuse([r], max_drop=0.5, images=64)


def test_paired_interval_brackets_the_difference():
    a = np.array([1] * 90 + [0] * 10, bool)
    b = np.array([1] * 80 + [0] * 20, bool)
    lo, hi = quantize.paired_interval(a, b, seed=0)
    assert lo < 10 < hi and lo > 0  # a is 10 points better; the interval excludes a tie here


def _timing(fp32_ms: float, int8_ms: float) -> dict:
    return {32: {"fp32": {"p50_ms": fp32_ms}, "int8": {"p50_ms": int8_ms}}}


def test_auto_keeps_int8_only_when_it_is_measured_faster():
    kept, why = quantize.auto_choice(_timing(10.0, 4.0), 32)
    assert kept == "int8" and "2.50x faster" in why
    kept, why = quantize.auto_choice(_timing(5.0, 13.0), 32)
    assert kept == "fp32" and "13 ms against fp32's 5 ms" in why and "overhead" in why
    assert quantize.auto_choice(_timing(10.0, 9.7), 32)[0] == "fp32"  # 3% is within timing noise


@pytest.mark.slow
def test_int8_export_is_served_and_written_for_triton_and_never_reads_test_images(tiny_context, tmp_path, monkeypatch):
    from gendd_deploy.loaders import ONNX_FILE, TRT_INT8_FILE, artifact_runner
    from gendd_deploy.stages import run_chain
    from gendd_deploy.stages.distill import DistillStage
    from gendd_deploy.stages.export import ExportStage
    from gendd_deploy.triton import write_triton_repo
    from test_export import publish_sampler
    from gendd_deploy.models.deployed import SamplerSetting

    from gendd_deploy.loaders import spec_of

    spec_of_art = lambda a: spec_of(a, ctx.store)  # noqa: E731
    ctx = tiny_context("teacher.epochs=1", "distill.epochs=1", "data.train_limit=256", "data.test_limit=32", "export.precision=int8", "export.max_top1_drop=100")
    run_chain(DistillStage(), ctx)
    sampler = publish_sampler(ctx, SamplerSetting(sampler="ddim", steps=1, draws=1, guidance=0.0, noise="zero", t_start=999))
    test_split = ctx.data().test

    def no_test_images(*a, **k):
        raise AssertionError("int8 export read a test image")

    monkeypatch.setattr(test_split, "get_batch", no_test_images)
    art = ExportStage().run(ctx)
    monkeypatch.undo()
    p = art.manifest["info"]["precision"]
    assert p["kept"] == "int8" and p["split"] == "calibration" and p["quantization"]["format"] == "QDQ"
    assert {g["method"] for g in p["gate"]} == set(quantize.METHODS) and p["tensorrt_graph"]["file"] == TRT_INT8_FILE
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(art.file(ONNX_FILE))).graph.node)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(art.file(TRT_INT8_FILE))).graph.node)
    from gendd_deploy.spec import onnx_metadata

    for name in (ONNX_FILE, TRT_INT8_FILE):  # both files say what they are, as the manifest does
        stamped, lineage = onnx_metadata(art.file(name))
        assert stamped == spec_of_art(art) and {x["fingerprint"] for x in lineage} == {i["fingerprint"] for i in art.manifest["inputs"] if i["stage"] != "data"}

    from gendd_deploy.config import ServeConfig
    from gendd_deploy.serve.server import InferenceServer
    from gendd_deploy.loaders import spec_of
    from test_serve import call, tensor_request

    runner = artifact_runner(art)
    spec = spec_of(art, ctx.store)
    meta = {"name": "tiny", "version": "1", "preprocess": spec.preprocess, "class_names": list(spec.class_names or [])}
    x = np.zeros((2, *spec.images.shape[1:]), np.float32)
    with InferenceServer(runner, meta, ServeConfig(host="127.0.0.1", port=0, grpc_port=-1), log=lambda m: None) as srv:
        status, _, body = call(srv.port, "POST", "/v2/models/tiny/infer", tensor_request(x))
        assert status == 200 and np.allclose(np.array(body["outputs"][0]["data"]).reshape(2, -1), runner.run(x), atol=1e-5)
    from gendd_deploy import cli
    from rich.console import Console

    card = cli._card(ctx, {"export": art, "calibrate": sampler}, {"distill": 12.0, "export": 3.5}, "tiny", None)
    console = Console(width=300, record=True)
    console.print(card)
    text = console.export_text()
    for field in ("model", "test top-1", "size", "file", "time", "next"):
        assert f"│ {field}" in text, text
    assert "int8 ONNX" in text and str(art.file(ONNX_FILE)) in text and "total 15.5 s" in text and "gendd serve -p tiny" in text
    write_triton_repo(art, None, tmp_path / "triton", "tiny", serve_cfg=ctx.recipe.serve, build_cfg=ctx.recipe.build)
    assert (tmp_path / "triton" / "tiny" / "1" / "model.onnx").read_bytes() == art.file(ONNX_FILE).read_bytes()
