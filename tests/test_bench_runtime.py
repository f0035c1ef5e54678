"""`gendd bench` (runtime benchmark) on the tiny recipe: it builds the missing chain, measures every
model on every runtime asked for, checks parity against eager PyTorch and writes its JSON."""

import json

import pytest
import torch
from rich.console import Console

from gendd_deploy.bench.runtime import run_bench
from gendd_deploy.errors import UsageError

SMALL_GRID = ("calibrate.steps=[1]", "calibrate.draws=[1]", "calibrate.t_starts=[999]")


def _maker(tiny_context):
    return lambda ov: tiny_context(*SMALL_GRID, *ov)


def test_bench_builds_the_chain_and_reports_every_model_and_runtime(tiny_context, tmp_path):
    out = tmp_path / "bench.json"
    mk = _maker(tiny_context)
    with torch.no_grad():  # a caller's no_grad must not stop the missing stages from training
        result = run_bench(
            mk, models=["teacher", "ce", "kd", "calibrated", "reference", "probe"], runtimes=["torch", "onnxruntime"],
            batches=[2, 8], reps=2, limit=32, budget_s=0.5, out=out, console=Console(quiet=True),
        )
    ctx = mk([])
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert {a.stage for a in ctx.store.list()} >= {"teacher", "teacher_features", "student", "sampler"}
    methods = {a.manifest["info"].get("method") for a in ctx.store.list() if a.stage == "student"}
    assert methods == {"gendd", "ce", "kd"}  # the plain students were trained for the bench
    models = {r["model"] for r in result["rows"]}
    assert {"teacher", "ce student", "kd student", "gendd probe", "gendd reference"} <= models
    assert any(m.startswith("gendd calibrated") for m in models)
    assert len(result["rows"]) == len(models) * 2 * 2  # every model x runtime x batch
    for r in result["rows"]:
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["mean_ms"] > 0
        if r["runtime"] == "onnxruntime":
            assert r["model_mb"] > 0
            assert r["onnx_exporter"] == ("torchscript" if r["model"] == "gendd reference" else "dynamo")  # what ships is the dynamo graph
        assert r["p50_ms"] > 0 and r["images_per_s"] > 0 and 0 <= r["top1"] <= 100 and r["top1_images"] == 32
        if r["runtime"] == "onnxruntime":
            # the published reference runs as the authors do (no x0 clipping, no alpha_bar floor):
            # at t = 999 its x0 estimate multiplies float32 rounding by ~2e4, so it gets a looser bound
            bound = 1e-2 if r["model"] == "gendd reference" else 1e-3
            assert r["parity"]["max_abs_diff"] < bound and r["parity"]["n"] > 0, r
    assert result["device"] == str(ctx.device())
    ratios = {(r["runtime"], r["batch"], r["vs"]) for r in result["ratios"]}
    assert ("torch", 8, "kd student") in ratios and ("onnxruntime", 2, "ce student") in ratios
    assert ("onnxruntime", 2, "torch eager (same model)") in ratios
    summary = result["readouts"]  # the deployed student against the read-outs distill scored
    assert summary["best_top1"] == max(summary["readouts"].values()) and "published" in summary["readouts"]
    assert summary["gap"] == pytest.approx(summary["best_top1"] - summary["calibrated_top1"], abs=0.01)
    # a linear read-out (the probe here) deploys as exactly the plain students' graph, a sampler does
    # not; the summary says so for the calibrated choice, whichever calibrate made
    ops = result["onnx_ops"]
    assert ops["ce student"] == ops["kd student"] == ops["gendd probe"]
    assert "Gemm" in ops["ce student"]["ops"] or "MatMul" in ops["ce student"]["ops"]
    assert ops["gendd reference"] != ops["ce student"] and ops["teacher"] != ops["ce student"]  # other widths
    linear = summary["calibrated"].endswith(("probe)", "linear fit_ce)", "linear fit_ridge)", "linear fit_sampler)"))
    assert summary["same_graph_as"] == (["ce student", "kd student"] if linear else [])


def test_bench_models_selects_what_is_built_and_timed(tiny_context, tmp_path):
    mk = _maker(tiny_context)
    result = run_bench(
        mk, models=["calibrated"], runtimes=["torch", "tensorrt", "onnxruntime"], precisions=["fp32", "int8"], batches=[2], reps=2, limit=16, budget_s=0.2,
        out=tmp_path / "b.json", console=Console(quiet=True),
    )
    if result["skipped_runtimes"]:  # TensorRT absent: listed as skipped with its reason, never silently dropped
        assert "TensorRT" in result["skipped_runtimes"]["tensorrt"]
    assert {r["runtime"] for r in result["rows"]} == {"torch", "onnxruntime", "onnxruntime int8"} | (set() if result["skipped_runtimes"] else {"tensorrt"})
    assert result["threads"]["torch"] >= 1 and result["threads"]["onnxruntime"]["spinning"] is False
    int8 = next(r for r in result["rows"] if r["runtime"] == "onnxruntime int8")
    assert int8["precision"] == "int8" and int8["model_mb"] > 0 and 0 <= int8["top1"] <= 100 and int8["top1_images"] == 16
    vs = {(r["runtime"], r["vs"]) for r in result["ratios"]}
    assert {("onnxruntime int8", "onnxruntime fp32 (same model)"), ("onnxruntime int8", "torch eager (same model)"), ("onnxruntime", "torch eager (same model)")} <= vs
    assert len(result["models"]) == 1 and result["models"][0].startswith("gendd calibrated")
    assert {a.stage for a in mk([]).store.list()} == {"teacher", "teacher_features", "student", "sampler"}  # no reference export, no plain students
    with pytest.raises(UsageError, match="--models sampler: unknown"):
        run_bench(mk, models=["sampler"], runtimes=["torch"], batches=[2], reps=2, limit=16, budget_s=0.2, out=tmp_path / "c.json", console=Console(quiet=True))
