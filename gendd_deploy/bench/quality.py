"""Quality benchmark: teacher, ce, kd and gendd students (labelled), kd-KL and gendd unlabelled.

Same student architecture, data, order, augmentation and optimiser for every method; one teacher
and one feature cache shared by all; `seeds` students per method. Prints mean and std of top-1 and
writes JSON. Example: gendd bench quality -p pipelines/fashion_mnist.toml --seeds 0 1 2
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.table import Table

from gendd_deploy.stages import Context, run_chain
from gendd_deploy.stages.cache import CacheStage
from gendd_deploy.stages.distill import DistillStage

# (row name, overrides, metrics to report as read-outs)
METHODS = [
    ("ce", ["distill.method='ce'"], ["test_top1"]),
    ("kd", ["distill.method='kd'"], ["test_top1"]),
    ("gendd", ["distill.method='gendd'"], ["published_top1", "ddim0_top1", "probe_top1"]),
    ("kd-KL unlabelled", ["distill.method='kd'", "distill.labels=false"], ["test_top1"]),
    ("gendd unlabelled", ["distill.method='gendd'", "distill.labels=false"], ["published_top1", "ddim0_top1", "probe_top1"]),
]
READOUT = {"test_top1": "logits", "published_top1": "published sampler", "ddim0_top1": "DDIM-8 from zero noise", "probe_top1": "linear probe"}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_quality(make_ctx, seeds: list[int], out: Path, console) -> dict:
    """make_ctx(overrides) -> Context. Returns the JSON-able result (also written to `out`)."""
    base: Context = make_ctx([])
    teacher_cache = run_chain(CacheStage(), base)
    teacher = base.store.find(base.pipeline, "teacher", teacher_cache.manifest["info"]["teacher_fingerprint"])
    rows, runs = [], []
    for name, overrides, readouts in METHODS:
        per_metric: dict[str, list[float]] = {m: [] for m in readouts}
        times = []
        for seed in seeds:
            ctx = make_ctx(overrides + [f"distill.seed={seed}"])
            art = run_chain(DistillStage(), ctx)
            for m in readouts:
                per_metric[m].append(art.metrics[m])
            times.append(art.metrics["train_s"])
            runs.append({"method": name, "seed": seed, "artifact": art.ref, "metrics": art.metrics})
        for m in readouts:
            mean, std = _stats(per_metric[m])
            rows.append({"method": name, "readout": READOUT[m], "metric": m, "mean": round(mean, 2), "std": round(std, 2), "values": per_metric[m], "train_s_mean": round(statistics.fmean(times), 1)})
    cfg = base.recipe.distill
    result = {
        "recipe": base.recipe_path,
        "seeds": seeds,
        "teacher": {"artifact": teacher.ref, "test_top1": teacher.metrics["test_top1"], "model": base.recipe.teacher.model, "model_kwargs": base.recipe.teacher.model_kwargs, "train_s": teacher.metrics.get("train_s")},
        "student": {"model": cfg.student, "kwargs": cfg.student_kwargs, "epochs": cfg.epochs, "stage1_epochs": cfg.stage1_epochs, "head_width": cfg.head_width, "train_images": min(len(base.data().train), cfg.train_limit or len(base.data().train)), "test_images": len(base.data().test), "published_eval_images": cfg.eval_limit},
        "rows": rows,
        "runs": runs,
    }
    table = Table(title=f"quality: {base.pipeline}, {len(seeds)} seed(s), teacher {teacher.metrics['test_top1']:.2f}%")
    for col in ("method", "read-out", "top-1 mean", "std", "per seed", "train s"):
        table.add_column(col)
    table.add_row("teacher", "logits", f"{teacher.metrics['test_top1']:.2f}", "", "", str(teacher.metrics.get("train_s", "")))
    for r in rows:
        table.add_row(r["method"], r["readout"], f"{r['mean']:.2f}", f"{r['std']:.2f}", " ".join(f"{v:.2f}" for v in r["values"]), str(r["train_s_mean"]))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {out}")
    return result


def run_cache_ratio(make_ctx, methods: list[str], epochs: int, out: Path, console) -> dict:
    """Distill epoch time with the feature cache vs the teacher run online, same student, one run."""
    base = make_ctx([])
    run_chain(CacheStage(), base)
    result = {"recipe": base.recipe_path, "epochs": epochs, "rows": []}
    table = Table(title="distill epoch time: cache vs online teacher")
    for col in ("method", "cached s/epoch", "online s/epoch", "ratio cached/online"):
        table.add_column(col)
    for method in methods:
        times = {}
        for use_cache in (True, False):
            # a bench-only seed keeps these runs apart from real students (no reuse of a stale timing)
            ov = [f"distill.method='{method}'", f"distill.use_cache={str(use_cache).lower()}", f"distill.epochs={epochs}", "distill.stage1_epochs=0", "distill.seed=9001"]
            art = run_chain(DistillStage(), make_ctx(ov))
            times[use_cache] = art.metrics["train_s"] / epochs
        ratio = times[True] / times[False]
        result["rows"].append({"method": method, "cached_s_per_epoch": round(times[True], 2), "online_s_per_epoch": round(times[False], 2), "ratio": round(ratio, 3)})
        table.add_row(method, f"{times[True]:.1f}", f"{times[False]:.1f}", f"{ratio:.2f}")
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")
    return result
