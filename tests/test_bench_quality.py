"""The quality and cache benchmarks produce their table rows and JSON (tiny settings, one seed)."""

import json

from rich.console import Console

from gendd_deploy.bench.quality import run_cache_ratio, run_quality


def test_quality_benchmark_writes_every_method(tiny_context, tmp_path):
    mk = lambda ov: tiny_context("distill.epochs=1", *ov)  # noqa: E731
    out = tmp_path / "q.json"
    result = run_quality(mk, [0], out, Console(quiet=True))
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"]
    methods = {r["method"] for r in saved["rows"]}
    assert methods == {"ce", "kd", "gendd", "kd-KL unlabelled", "gendd unlabelled", "ce long-tail", "kd long-tail", "gendd long-tail"}
    gendd = {r["metric"] for r in saved["rows"] if r["method"] == "gendd"}
    assert gendd == {"published_top1", "ddim0_top1", "probe_top1", "fit_ce_top1", "fit_ridge_top1", "fit_sampler_top1"}
    unlabelled = {r["metric"] for r in saved["rows"] if r["method"] == "gendd unlabelled"}
    assert "probe_top1" not in unlabelled and "fit_ridge_top1" in unlabelled
    # every method trains for the same total epochs (gendd: stage 1 + gendd)
    assert len({r["total_epochs"] for r in saved["rows"]}) == 1
    assert all(0 <= r["mean"] <= 100 and len(r["values"]) == 1 for r in saved["rows"])
    # the long-tailed setting has a teacher of its own
    assert saved["teachers"]["data.imbalance_factor=100"]["artifact"] != saved["teachers"]["balanced"]["artifact"]


def test_cache_benchmark_ratio(tiny_context, tmp_path):
    mk = lambda ov: tiny_context(*ov)  # noqa: E731
    result = run_cache_ratio(mk, ["kd"], 1, tmp_path / "c.json", Console(quiet=True))
    row = result["rows"][0]
    assert row["ratio"] > 0 and row["cached_s_per_epoch"] > 0 and row["online_s_per_epoch"] > 0
