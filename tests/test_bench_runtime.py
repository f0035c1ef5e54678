"""`gendd bench` (runtime benchmark) on the tiny recipe: it builds the missing chain, measures every
model on every runtime asked for, checks parity against eager PyTorch and writes its JSON."""

import json

import torch
from rich.console import Console

from gendd_deploy.bench.runtime import run_bench


def test_bench_builds_the_chain_and_reports_every_model_and_runtime(tiny_context, tmp_path):
    ctx = tiny_context("calibrate.steps=[1]", "calibrate.draws=[1]", "calibrate.t_starts=[999]")
    out = tmp_path / "bench.json"
    with torch.no_grad():  # a caller's no_grad must not stop the missing stages from training
        result = run_bench(ctx, ["torch", "onnxruntime"], [2, 8], reps=2, limit=32, budget_s=0.5, out=out, console=Console(quiet=True))
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert {a.stage for a in ctx.store.list()} >= {"teacher", "teacher_features", "student", "sampler"}
    models = {r["model"] for r in result["rows"]}
    assert {"teacher", "student probe", "gendd reference"} <= models and any(m.startswith("gendd calibrated") for m in models)
    assert len(result["rows"]) == len(models) * 2 * 2  # every model x runtime x batch
    for r in result["rows"]:
        assert r["p50_ms"] > 0 and r["images_per_s"] > 0 and 0 <= r["top1"] <= 100 and r["top1_images"] == 32
        if r["runtime"] == "onnxruntime":
            # the published reference runs as the authors do (no x0 clipping, no alpha_bar floor):
            # at t = 999 its x0 estimate multiplies float32 rounding by ~2e4, so it gets a looser bound
            bound = 1e-2 if r["model"] == "gendd reference" else 1e-3
            assert r["max_abs_diff_vs_torch"] < bound, r
    assert result["device"] == str(ctx.device())
    ratios = {(r["runtime"], r["batch"], r["vs"]) for r in result["ratios"]}
    assert ("torch", 8, "student probe") in ratios and ("onnxruntime", 2, "torch eager (same model)") in ratios
