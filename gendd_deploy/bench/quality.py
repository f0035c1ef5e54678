"""Quality benchmark: teacher, ce, kd and gendd students (labelled), kd-KL and gendd unlabelled,
and the long-tailed setting (ce, kd, gendd on imbalance-factor-100 training data, same test set).

Same student architecture, data, order, augmentation, optimiser and total epochs for every method
(GenDD's stage-1 epochs count: ce / kd train for stage1_epochs + epochs; unlabelled GenDD has no
stage 1 and trains its GenDD stage for the same total); one teacher and one feature cache per
setting; `seeds` students per method. Prints mean, std and standard error of top-1 and writes
JSON. Example: gendd bench quality -p pipelines/fashion_mnist.toml --seeds 0 1 2
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

from rich.table import Table

from gendd_deploy.stages import Context, run_chain
from gendd_deploy.stages.cache import CacheStage
from gendd_deploy.stages.distill import DistillStage

GENDD_READOUTS = ["published_top1", "ddim0_top1", "probe_top1", "fit_ce_top1", "fit_ridge_top1", "fit_sampler_top1"]
GENDD_UNLABELLED_READOUTS = ["published_top1", "ddim0_top1", "fit_ridge_top1", "fit_sampler_top1"]
LONG_TAIL = ["data.imbalance_factor=100"]

# (row name, setting overrides, method overrides, read-outs reported); "total" = equal total epochs
METHODS = [
    ("ce", [], ["distill.method='ce'"], ["test_top1"]),
    ("kd", [], ["distill.method='kd'"], ["test_top1"]),
    ("gendd", [], ["distill.method='gendd'"], GENDD_READOUTS),
    ("kd-KL unlabelled", [], ["distill.method='kd'", "distill.labels=false"], ["test_top1"]),
    ("gendd unlabelled", [], ["distill.method='gendd'", "distill.labels=false"], GENDD_UNLABELLED_READOUTS),
    ("ce long-tail", LONG_TAIL, ["distill.method='ce'"], ["test_top1"]),
    ("kd long-tail", LONG_TAIL, ["distill.method='kd'"], ["test_top1"]),
    ("gendd long-tail", LONG_TAIL, ["distill.method='gendd'"], GENDD_READOUTS),
]
READOUT = {
    "test_top1": "logits",
    "published_top1": "published sampler",
    "ddim0_top1": "DDIM-8 from zero noise",
    "probe_top1": "in-training probe",
    "fit_ce_top1": "fitted linear (CE)",
    "fit_ridge_top1": "fitted linear (label-free ridge)",
    "fit_sampler_top1": "fitted linear (sampler-distilled)",
}


def _stats(values: list[float]) -> tuple[float, float, float]:
    """mean, sample std, standard error of the mean."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, std / math.sqrt(len(values))


def _write(out: Path, obj: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=2, default=str))


def equal_epoch_overrides(method_ov: list[str], stage1: int, epochs: int) -> tuple[list[str], int]:
    """Overrides that give this method the same total epochs as labelled GenDD (stage 1 + GenDD)."""
    total = stage1 + epochs
    labelled_gendd = "distill.method='gendd'" in method_ov and "distill.labels=false" not in method_ov
    return ([] if labelled_gendd else [f"distill.epochs={total}"]), total


def run_quality(make_ctx, seeds: list[int], out: Path, console, *, long_tail: bool = True) -> dict:
    """make_ctx(overrides) -> Context. Returns the JSON-able result (also written to `out`)."""
    t0 = time.perf_counter()
    base: Context = make_ctx([])
    cfg = base.recipe.distill
    teachers, rows, runs = {}, [], []
    for name, setting, method_ov, readouts in METHODS:
        if setting and not long_tail:
            continue
        key = " ".join(setting) or "balanced"
        if key not in teachers:
            sctx = make_ctx(setting)
            cache = run_chain(CacheStage(), sctx)
            t = sctx.store.find(sctx.pipeline, "teacher", cache.manifest["info"]["teacher_fingerprint"])
            teachers[key] = {"artifact": t.ref, "test_top1": t.metrics["test_top1"], "train_s": t.metrics.get("train_s"), "train_images": len(sctx.data().train)}
        epoch_ov, total = equal_epoch_overrides(method_ov, cfg.stage1_epochs, cfg.epochs)
        per_metric: dict[str, list[float]] = {m: [] for m in readouts}
        times = []
        for seed in seeds:
            art = run_chain(DistillStage(), make_ctx(setting + method_ov + epoch_ov + [f"distill.seed={seed}"]))
            for m in readouts:
                per_metric[m].append(art.metrics[m])
            times.append(art.metrics["train_s"] + art.metrics.get("stage1_train_s", 0.0))
            runs.append({"method": name, "seed": seed, "artifact": art.ref, "metrics": art.metrics})
        for m in readouts:
            mean, std, sem = _stats(per_metric[m])
            rows.append({
                "method": name, "setting": key, "readout": READOUT[m], "metric": m, "total_epochs": total,
                "mean": round(mean, 2), "std": round(std, 2), "sem": round(sem, 2), "values": per_metric[m],
                "train_s_mean": round(statistics.fmean(times), 1),
            })
            r = rows[-1]
            console.print(f"{name:18} {READOUT[m]:34} {r['mean']:6.2f} +- {r['sem']:.2f} (s.e.)  {' '.join(f'{v:.2f}' for v in r['values'])}")
        # written after every method, so a long run that is stopped keeps what it measured
        _write(out, {"recipe": base.recipe_path, "seeds": seeds, "teachers": teachers, "rows": rows, "runs": runs, "partial": True, "wall_s": round(time.perf_counter() - t0, 1)})
    result = {
        "recipe": base.recipe_path,
        "seeds": seeds,
        "teachers": teachers,
        "teacher": {**teachers["balanced"], "model": base.recipe.teacher.model, "model_kwargs": base.recipe.teacher.model_kwargs},
        "student": {"model": cfg.student, "kwargs": cfg.student_kwargs, "epochs": cfg.epochs, "stage1_epochs": cfg.stage1_epochs, "head_width": cfg.head_width, "train_images": teachers["balanced"]["train_images"], "test_images": len(base.data().test)},
        "rows": rows,
        "runs": runs,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    table = Table(title=f"quality: {base.pipeline}, {len(seeds)} seed(s), teacher {teachers['balanced']['test_top1']:.2f}%")
    for col in ("method", "read-out", "epochs", "top-1 mean", "std", "s.e.", "per seed", "train s"):
        table.add_column(col)
    for key, t in teachers.items():
        table.add_row(f"teacher ({key})", "logits", "", f"{t['test_top1']:.2f}", "", "", "", str(t.get("train_s", "")))
    for r in rows:
        table.add_row(r["method"], r["readout"], str(r["total_epochs"]), f"{r['mean']:.2f}", f"{r['std']:.2f}", f"{r['sem']:.2f}", " ".join(f"{v:.2f}" for v in r["values"]), str(r["train_s_mean"]))
    console.print(table)
    console.print(f"wall time {result['wall_s']:.0f} s")
    _write(out, result)
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
