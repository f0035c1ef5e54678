"""Quality benchmark: a verdict on GenDD against plain students, with equal read-outs.

Settings (`--settings`, any of them, in this order by default):
- labelled: ce, kd and gendd students;
- unlabelled: kd (KL to the teacher only) and gendd without labels;
- long_tail: ce, kd and gendd on imbalance-factor-100 training data (its own teacher), same test set.

Every student has the same architecture, data, order, augmentation, optimiser and total epochs
(GenDD's stage-1 epochs count: ce / kd train for stage1_epochs + epochs; unlabelled GenDD has no
stage 1 and trains its GenDD stage for the same total), and every student gets the same fitted
read-outs (distill fits fit_ce where labels exist, fit_ridge for all, fit_sampler for GenDD). Each
student is then calibrated like any other (the cheapest read-out not shown worse than the best on
the calibration split), and the **calibrated choice, what would ship, is the headline**, scored
on all test images. Per setting the verdict line pairs GenDD's calibrated student with the best
plain method's calibrated student seed by seed: "ahead" / "behind" when the 95% t-interval of the
paired differences excludes 0, else "tie".

Every student and sampler is reused by fingerprint from the artifact root, and the JSON is
written after every student, so a stopped run resumes where it stopped. The published sampler
(costly: 640 head passes per token on every test image) is scored on the first seed only unless
`published_seeds="all"`. Example:
    gendd bench quality -p pipelines/fashion_mnist.toml --settings labelled --seeds 0 --seeds 1 --seeds 2
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
from rich.table import Table

from gendd_deploy.errors import UsageError
from gendd_deploy.loaders import deployed_from_artifacts
from gendd_deploy.runtime import make_runner
from gendd_deploy.stages import Context, run_chain
from gendd_deploy.stages.cache import CacheStage
from gendd_deploy.stages.calibrate import CalibrateStage
from gendd_deploy.stages.distill import DistillStage
from gendd_deploy.evaluation import test_top1

LONG_TAIL = ["data.imbalance_factor=100"]
LABELLED = [("ce", ["distill.method='ce'"]), ("kd", ["distill.method='kd'"]), ("gendd", ["distill.method='gendd'"])]
# setting -> (overrides of the whole setting, [(method, method overrides)])
SETTINGS: dict[str, tuple[list[str], list[tuple[str, list[str]]]]] = {
    "labelled": ([], LABELLED),
    "unlabelled": ([], [("kd", ["distill.method='kd'", "distill.labels=false"]), ("gendd", ["distill.method='gendd'", "distill.labels=false"])]),
    "long_tail": (LONG_TAIL, LABELLED),
}
# read-out key -> what the table calls it, in report order; "calibrated" is the headline
READOUT = {
    "calibrated": "calibrated choice (ships)",
    "own": "own head",
    "fit_ce": "fitted linear (CE)",
    "fit_ridge": "fitted linear (label-free ridge)",
    "fit_sampler": "fitted linear (sampler-distilled)",
    "ddim0": "DDIM-8 from zero noise",
    "published": "published sampler (authors' t = 999, unclipped)",
    "published_floored": "published sampler, alpha_bar floored at 1e-3",
}
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # two-sided 95% t quantiles by degrees of freedom


def _stats(values: list[float]) -> tuple[float, float, float]:
    """mean, sample std, standard error of the mean."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, std / math.sqrt(len(values))


def _write(out: Path, obj: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(out)  # a reader never sees half a file


def equal_epoch_overrides(method_ov: list[str], stage1: int, epochs: int, total: int | None = None) -> tuple[list[str], int]:
    """Overrides that give this method `total` epochs (default: labelled GenDD's stage 1 + GenDD
    epochs); labelled GenDD keeps its stage 1 and gets the rest, so at the default it is the recipe."""
    default = stage1 + epochs
    total = default if total is None else total
    labelled_gendd = "distill.method='gendd'" in method_ov and "distill.labels=false" not in method_ov
    if labelled_gendd:
        if total <= stage1:
            raise UsageError(f"total epochs {total} leave no GenDD epochs after {stage1} stage-1 epochs")
        return ([] if total == default else [f"distill.epochs={total - stage1}"]), total
    return [f"distill.epochs={total}"], total


@torch.no_grad()
def deployed_test_top1(ctx: Context, student_art, sampler_art) -> float:
    """Top-1 (%) on all test images of the student as calibrate chose to deploy it, in PyTorch;
    batch b gets noise from seed pipeline.seed + b where the read-out samples."""
    device = ctx.device()
    runner = make_runner("torch", model=deployed_from_artifacts(student_art, sampler_art, device), device=device)
    data, seed = ctx.data(), ctx.recipe.pipeline.seed
    return test_top1(lambda x, b: runner.run(x, runner.noise(len(x), seed + b)), data, n=len(data.test), batch_size=ctx.recipe.data.eval_batch_size, device="cpu", numpy=True)


def readouts_of(metrics: dict, method: str) -> dict[str, float]:
    """The read-outs distill scored on the test images, by READOUT key (own head: a plain
    student's logits, a GenDD student's in-training probe)."""
    out = {}
    own = metrics.get("test_top1") if method != "gendd" else metrics.get("probe_top1")
    if own is not None:
        out["own"] = own
    for key in ("fit_ce", "fit_ridge", "fit_sampler", "ddim0", "published", "published_floored"):
        if f"{key}_top1" in metrics:
            out[key] = metrics[f"{key}_top1"]
    return out


def summarise(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows, verdicts) from per-student runs [{setting, method, seed, total_epochs, readouts}]:
    one row per (setting, total epochs, method, read-out) with mean, std and s.e. over seeds, and
    one verdict per (setting, total epochs) with GenDD and at least one plain method."""
    groups: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in runs:
        per = groups.setdefault((r["setting"], r["total_epochs"], r["method"]), {})
        for key, v in r["readouts"].items():
            per.setdefault(key, {})[r["seed"]] = v
    rows = []
    for (setting, total, method), per in groups.items():
        for key in (k for k in READOUT if k in per):
            vals = [per[key][s] for s in sorted(per[key])]
            mean, std, sem = _stats(vals)
            rows.append({
                "setting": setting, "total_epochs": total, "method": method, "readout": key, "label": READOUT[key],
                "mean": round(mean, 2), "std": round(std, 2), "sem": round(sem, 2), "seeds": sorted(per[key]), "values": vals,
            })
    verdicts = []
    for setting, total in dict.fromkeys((s, t) for s, t, _ in groups):
        calibrated = {m: groups[(s, t, m)].get("calibrated", {}) for s, t, m in groups if (s, t) == (setting, total)}
        gendd = calibrated.pop("gendd", {})
        plain = {m: v for m, v in calibrated.items() if v}
        if not gendd or not plain:
            continue
        rival = max(plain, key=lambda m: statistics.fmean(plain[m].values()))
        verdicts.append(verdict(setting, total, gendd, plain[rival], rival))
    return rows, verdicts


def verdict(setting: str, total: int, gendd: dict[int, float], rival: dict[int, float], rival_name: str) -> dict:
    """GenDD's calibrated student vs `rival`'s, paired over the seeds both have: the mean
    difference, its s.e., the 95% t-interval, and "ahead" / "behind" only when the interval
    excludes 0 ("tie" otherwise, and always with one seed: no noise estimate)."""
    seeds = sorted(set(gendd) & set(rival))
    diffs = [gendd[s] - rival[s] for s in seeds]
    mean, _, sem = _stats(diffs) if diffs else (float("nan"), 0.0, 0.0)
    if len(diffs) < 2:
        lo, hi, call = float("nan"), float("nan"), "tie (one seed: no noise estimate)"
    else:
        half = T_95.get(len(diffs) - 1, 1.96) * sem
        lo, hi = mean - half, mean + half
        call = "GenDD ahead" if lo > 0 else "GenDD behind" if hi < 0 else "tie"
    return {
        "setting": setting, "total_epochs": total, "rival": rival_name, "seeds": seeds,
        "gendd": [gendd[s] for s in seeds], "rival_values": [rival[s] for s in seeds],
        "diff_mean": round(mean, 2), "diff_sem": round(sem, 2), "interval_95": [round(lo, 2), round(hi, 2)], "verdict": call,
    }


def _line(v: dict) -> str:
    iv = "" if math.isnan(v["interval_95"][0]) else f", 95% interval {v['interval_95'][0]:+.2f} to {v['interval_95'][1]:+.2f}"
    return (
        f"{v['setting']} ({v['total_epochs']} epochs, {len(v['seeds'])} seed(s)): GenDD calibrated vs {v['rival']} calibrated "
        f"{v['diff_mean']:+.2f} +- {v['diff_sem']:.2f} (s.e., paired over seeds{iv}): {v['verdict']}"
    )


def run_quality(
    make_ctx, seeds: list[int], out: Path, console, *, settings: list[str] | None = None, total_epochs: int | None = None, published_seeds: str = "first",
) -> dict:
    """make_ctx(overrides) -> Context. Trains (or reuses) and calibrates every student of the
    chosen settings; returns the JSON-able result, also written to `out` after every student."""
    settings = list(settings or SETTINGS)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise UsageError(f"unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    t0 = time.perf_counter()
    base: Context = make_ctx([])
    cfg = base.recipe.distill
    teachers: dict = {}
    runs: list[dict] = []
    wall: dict[str, float] = {}

    def save(partial: bool) -> dict:
        rows, verdicts = summarise(runs)
        result = {
            "recipe": base.recipe_path, "seeds": seeds, "settings": settings, "published_seeds": published_seeds, "teachers": teachers,
            "student": {"model": cfg.student, "kwargs": cfg.student_kwargs, "stage1_epochs": cfg.stage1_epochs, "head_width": cfg.head_width, "test_images": len(base.data().test)},
            "rows": rows, "verdicts": verdicts, "runs": runs, "wall_s": {**wall, "total": round(time.perf_counter() - t0, 1)}, "partial": partial,
        }
        _write(out, result)
        return result

    for setting in settings:
        t_setting = time.perf_counter()
        setting_ov, methods = SETTINGS[setting]
        sctx = make_ctx(setting_ov)
        cache = run_chain(CacheStage(), sctx)
        t = sctx.store.find(sctx.pipeline, "teacher", cache.manifest["info"]["teacher_fingerprint"])
        teachers[setting] = {"artifact": t.ref, "test_top1": t.metrics["test_top1"], "train_s": t.metrics.get("train_s"), "train_images": len(sctx.data().train)}
        for method, method_ov in methods:
            epoch_ov, total = equal_epoch_overrides(method_ov, cfg.stage1_epochs, cfg.epochs, total_epochs)
            for i, seed in enumerate(seeds):
                skip = ["distill.eval_published=false"] if (method == "gendd" and published_seeds == "first" and i > 0) else []
                ctx = make_ctx(setting_ov + method_ov + epoch_ov + skip + [f"distill.seed={seed}"])
                student = run_chain(DistillStage(), ctx)
                sampler = run_chain(CalibrateStage(), ctx)
                readouts = {"calibrated": round(deployed_test_top1(ctx, student, sampler), 3), **readouts_of(student.metrics, method)}
                runs.append({
                    "setting": setting, "method": method, "seed": seed, "total_epochs": total, "student": student.ref, "sampler": sampler.ref,
                    "chosen": sampler.manifest["info"]["label"], "calib_top1": sampler.metrics.get("calib_top1"), "readouts": readouts,
                    "distill_wall_s": student.metrics.get("wall_s"), "calibrate_wall_s": sampler.metrics.get("wall_s"),
                })
                save(partial=True)  # after every student: a stopped run keeps what it measured
                shown = "  ".join(f"{k} {v:.2f}" for k, v in readouts.items())
                console.print(f"{setting:10} {method:6} seed {seed}: ships {sampler.manifest['info']['label']!r}; test top-1 {shown}")
        wall[setting] = round(time.perf_counter() - t_setting, 1)
    result = save(partial=False)
    _print(console, result)
    console.print(f"wrote {out}")
    return result


def _print(console, result: dict) -> None:
    table = Table(title=f"quality: {len(result['seeds'])} seed(s), all {result['student']['test_images']} test images; headline = the calibrated choice")
    for col in ("setting", "method", "read-out", "epochs", "top-1 mean", "s.e.", "per seed"):
        table.add_column(col)
    for setting, t in result["teachers"].items():
        table.add_row(setting, "teacher", "logits", "", f"{t['test_top1']:.2f}", "", "")
    for r in result["rows"]:
        style = "bold" if r["readout"] == "calibrated" else None
        table.add_row(r["setting"], r["method"], r["label"], str(r["total_epochs"]), f"{r['mean']:.2f}", f"{r['sem']:.2f}", " ".join(f"{v:.2f}" for v in r["values"]), style=style)
    console.print(table)
    for v in result["verdicts"]:
        console.print(_line(v))
    console.print(f"wall time {result['wall_s']['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in result['wall_s'].items() if k != 'total')})")


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
