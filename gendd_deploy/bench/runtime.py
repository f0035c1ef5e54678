"""Runtime benchmark: latency, throughput, parity and top-1 of teacher and students per runtime.

Models (`--models`): the teacher, plain ce and kd students (the recipe's student trained with that
method for the same total epochs), the GenDD student as calibrate chose to deploy it and with the
published reference sampler, and (on request) the in-training probe. Runtimes: torch eager, ONNX Runtime,
AOTInductor (opt-in: compiling takes minutes) and TensorRT where registered and available.
Each model is exported for the bench into a temporary folder (the published onnx artifact stays as
it is). Ratios are computed within this one run. Example: gendd bench -p pipelines/quickstart.toml
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.markup import escape
from rich.table import Table

from gendd_deploy.bench.quality import equal_epoch_overrides
from gendd_deploy.data.augment import to_model_input
from gendd_deploy.errors import UsageError
from gendd_deploy.loaders import deployed_from_artifacts, load_student, load_teacher
from gendd_deploy.models.deployed import DeployedModel, SamplerSetting
from gendd_deploy.runtime import make_runner, quantize, registry, runtime_status
from gendd_deploy.runtime.aoti import export_aoti
from gendd_deploy.runtime.onnx_export import export_onnx, export_onnx_fast
from gendd_deploy.runtime.ort import usable_cpus
from gendd_deploy.runtime.parity import parity, record
from gendd_deploy.runtime.timing import summary as timing_summary
from gendd_deploy.runtime.timing import time_in_turn
from gendd_deploy.stages import Context, run_chain
from gendd_deploy.stages.calibrate import CalibrateStage
from gendd_deploy.stages.export import calibration_images
from gendd_deploy.stages.distill import DistillStage
from gendd_deploy.stages.teacher import TeacherStage
from gendd_deploy.evaluation import array_batches, top1_over

SEED = 1234

# what `--models` can name; the default leaves out the in-training probe and the published
# reference sampler (ask for it with --models reference; its top-1 on every test image is in the
# read-out summary either way)
MODEL_CHOICES = ("teacher", "ce", "kd", "calibrated", "reference", "probe")
DEFAULT_MODELS = ("teacher", "ce", "kd", "calibrated")
PLAIN = ("ce student", "kd student", "student")
# Never shipped, only timed: its 640-pass graph goes through the TorchScript exporter, as calibrate
# times it (the same graph; the dynamo exporter took 100 s on a toy student, 3.6 s this way)
TIMED_ONLY = ("gendd reference",)


def _plain_student(make_ctx, ctx: Context, method: str) -> DeployedModel:
    """The recipe's student trained as a plain `method` student, with the same total epochs, and
    deployed as calibrate chose (its own head or a fitted read-out), as the GenDD student is."""
    dc = ctx.recipe.distill
    epoch_ov, _ = equal_epoch_overrides([f"distill.method='{method}'"], dc.stage1_epochs, dc.epochs)
    plain = make_ctx([f"distill.method='{method}'", *epoch_ov])
    if DistillStage().existing(plain) is None:  # say what is about to be trained, and roughly for how long
        own = DistillStage().existing(ctx)
        took = (own.metrics.get("wall_s") if own is not None else None) or None
        about = f"; the GenDD student's distill took {took / 60:.1f} min here, expect about as long" if took else ""
        ctx.log(f"bench: the {method} student is not in the store: training it now ({dc.stage1_epochs + dc.epochs} epochs, as the GenDD student had{about})")
    sampler = run_chain(CalibrateStage(), plain)
    return deployed_from_artifacts(DistillStage().require(plain), sampler)


def _models(make_ctx, ctx: Context, wanted: list[str]) -> tuple[dict[str, DeployedModel], dict]:
    """The models `wanted` names, building what is missing; and the student's distill metrics."""
    gendd = ctx.recipe.distill.method == "gendd"
    models: dict[str, DeployedModel] = {}
    if "teacher" in wanted:
        models["teacher"] = DeployedModel(load_teacher(run_chain(TeacherStage(), ctx)))
    for method in ("ce", "kd"):
        if method in wanted and gendd and (method == "kd" or ctx.recipe.distill.labels):
            models[f"{method} student"] = _plain_student(make_ctx, ctx, method)
    gendd_wanted = [m for m in ("calibrated", "reference", "probe") if m in wanted]
    if not gendd:  # a kd / ce recipe: its student is the plain student, as calibrate chose to deploy it
        sampler_art = run_chain(CalibrateStage(), ctx)
        student_art = DistillStage().require(ctx)
        models["student"] = deployed_from_artifacts(student_art, sampler_art)
        if gendd_wanted:
            ctx.log(f"[dim]bench: {', '.join(gendd_wanted)} skipped: the recipe's distill.method is {ctx.recipe.distill.method}, not gendd[/]")
        return models, dict(student_art.metrics)
    if not gendd_wanted:
        return models, {}
    sampler_art = run_chain(CalibrateStage(), ctx) if "calibrated" in wanted else None
    student_art = DistillStage().require(ctx) if sampler_art else run_chain(DistillStage(), ctx)
    student = load_student(student_art)
    if "calibrated" in wanted:
        setting = SamplerSetting.from_dict(sampler_art.manifest["info"]["setting"])
        seed = int(sampler_art.manifest["info"].get("fixed_noise_seed") or 0)
        models[f"gendd calibrated ({setting.label()})"] = DeployedModel(student, setting, seed)
    if "reference" in wanted:
        models["gendd reference"] = DeployedModel(student, SamplerSetting.published())
    if "probe" in wanted and ctx.recipe.distill.labels:  # unlabelled students have no trained probe
        models["gendd probe"] = DeployedModel(student, SamplerSetting.probe())
    return models, dict(student_art.metrics)


def _runner(kind: str, model: DeployedModel, folder: Path, example: torch.Tensor, *, name: str, device: torch.device):
    """A runner of `kind` (any registered runtime) for the CPU-resident `model`: torch runs it as
    is; a runtime of ONNX graphs runs it exported to ONNX, of AOTInductor packages compiled, of
    TensorRT engines as an fp32 engine built from the ONNX graph. Torch eager and AOTInductor run
    on `device` (the recipe's: the GPU where there is one), ONNX Runtime on the providers it has."""
    entry = registry.get(kind)
    on_device = model if device.type == "cpu" else copy.deepcopy(model).to(device)
    if entry.stage is None:
        return make_runner(kind, model=on_device, device=device)
    onnx_path = folder / f"{_slug(name)}.onnx"
    if entry.stage == "aoti":
        path = folder / f"{_slug(name)}.pt2"
        export_aoti(on_device, path, example)
        return make_runner(kind, path=path, device=device)
    if not onnx_path.exists():
        (export_onnx_fast if name in TIMED_ONLY else export_onnx)(model, onnx_path, example)
    if entry.stage == "onnx":
        return make_runner(kind, path=onnx_path)  # the graph's own inputs say whether it takes noise
    if entry.stage == "engine":
        from gendd_deploy.trt.builder import fp32_engine

        return make_runner(kind, path=fp32_engine(onnx_path))
    raise UsageError(f"gendd bench cannot make a {entry.stage} artifact for runtime '{kind}' from a model")


INT8 = "onnxruntime int8"  # the bench's label for ONNX Runtime on the int8 QDQ graph (--precision int8)


def _int8_runner(model: DeployedModel, folder: Path, example: torch.Tensor, cal_x: np.ndarray, *, name: str):
    """ONNX Runtime on the model's int8 QDQ graph (as `gendd export --precision int8` writes it,
    MinMax ranges from calibration-split images; export also tries Entropy and Percentile)."""
    fp32 = _runner("onnxruntime", model, folder, example, name=name, device=torch.device("cpu"))
    path = folder / f"{_slug(name)}.int8.onnx"
    names = [i.name for i in fp32.session.get_inputs()]
    quantize.quantize_int8(folder / f"{_slug(name)}.onnx", path, cal_x, input_names=names, noise=lambda n, i: fp32.noise(n, SEED + i), method="minmax")
    return make_runner("onnxruntime", path=path)


def _graph_ops(folder: Path, name: str) -> dict | None:
    """Op-type counts and weight shapes of the ONNX graph the bench exported for `name` (None if it
    exported none): two models with equal ones run the same computation at the same cost."""

    path = folder / f"{_slug(name)}.onnx"
    if not path.exists():
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    weights = sorted("x".join(map(str, t.dims)) for t in graph.initializer)
    return {"ops": dict(sorted(ops.items())), "weight_shapes": weights}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _interleaved_latency(runners: dict, images: np.ndarray, batch: int, reps: int, budget_s: float) -> dict[str, list[float]]:
    """Milliseconds per run of every runner at `batch`, timed in turn (runtime/timing.py): at most
    `reps` runs each, or `budget_s` of its own time (>= 2 runs)."""
    x = np.ascontiguousarray(np.resize(images, (batch,) + images.shape[1:]), dtype=np.float32)
    calls = {name: (lambda r=r, z=r.noise(batch, SEED): r.run(x, z)) for name, r in runners.items()}
    return time_in_turn(calls, max_runs=reps, min_runs=2, min_s=budget_s)


def _top1(runner, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    return top1_over(lambda x, i: runner.run(x, runner.noise(len(x), SEED + i)), array_batches(images, labels, batch))


def _readout_summary(models: dict, metrics: dict, calibrated_top1: float | None) -> dict | None:
    """The calibrated student's test top-1 (all test images) against the best GenDD read-out the
    distill stage scored on the same images."""
    calibrated = next((m for m in models if m.startswith("gendd calibrated")), None)
    scored = {k[: -len("_top1")]: v for k, v in metrics.items() if k.endswith("_top1") and k not in ("test_top1", "teacher_top1")}
    if calibrated is None or calibrated_top1 is None or not scored:
        return None
    best = max(scored, key=scored.get)
    return {
        "calibrated": calibrated, "calibrated_top1": round(calibrated_top1, 2), "test_images": metrics.get("test_images"),
        "best_readout": best, "best_top1": scored[best], "gap": round(scored[best] - calibrated_top1, 2), "readouts": scored,
    }


def run_bench(
    make_ctx, *, models: list[str] | None = None, runtimes: list[str] | None = None, batches: list[int],
    reps: int, limit: int, budget_s: float, out: Path, console, precisions: list[str] = ("fp32",),
) -> dict:
    """make_ctx(overrides) -> Context (the plain ce / kd students are the recipe with another method).
    `precisions` with "int8" adds ONNX Runtime on each model's int8 graph (runtime "onnxruntime int8")."""
    ctx = make_ctx([])
    wanted = list(models or DEFAULT_MODELS)
    bad = [m for m in wanted if m not in MODEL_CHOICES]
    if bad:
        raise UsageError(f"--models {', '.join(bad)}: unknown; choose from {', '.join(MODEL_CHOICES)}")
    data = ctx.data()
    n = min(limit, len(data.test)) if limit > 0 else len(data.test)
    all_x = to_model_input(data.test.get_batch(torch.arange(len(data.test))), data.mean, data.std).numpy()
    all_y = data.test.labels.numpy()
    test_x, test_y = all_x[:n], all_y[:n]
    example = torch.from_numpy(test_x[:2])
    status = runtime_status()
    wanted_rt = runtimes or [name for name, e in registry.RUNTIMES.items() if e.bench_default]
    skipped = {r: status.get(r, "not registered") for r in wanted_rt if status.get(r, "not registered") is not None}
    use = [r for r in wanted_rt if r not in skipped]
    if "int8" in precisions:
        if "onnxruntime" in use:
            use.append(INT8)
        else:
            skipped[INT8] = "needs the onnxruntime runtime in --runtime"
    for r, why in skipped.items():
        ctx.log(f"[dim]bench: runtime {r} skipped: {escape(str(why))}[/]")
    rows = []
    chosen, student_metrics = _models(make_ctx, ctx, wanted)  # builds what is missing (training needs grad)
    threads = {"torch": usable_cpus(), "onnxruntime": {"intra_op": usable_cpus(), "spinning": False}}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads["torch"])  # pinned: oversubscribed threads made eager rows unreliable
    console.print(f"bench: threads: torch {threads['torch']}, onnxruntime intra-op {threads['onnxruntime']['intra_op']} (no spinning); models timed in turn per runtime")
    device = ctx.device()
    calibrated_top1, graphs, sizes = None, {}, {}
    with tempfile.TemporaryDirectory(prefix="gendd-bench-") as tmp, torch.no_grad():
        refs = {name: make_runner("torch", model=m) for name, m in chosen.items()}  # parity reference: eager on the CPU
        cal = next((m for m in chosen if m.startswith("gendd calibrated")), None)
        if cal is not None:  # the deployed student on the test images distill scored its read-outs on
            m = int(student_metrics.get("test_images") or len(all_x))
            calibrated_top1 = _top1(refs[cal], all_x[:m], all_y[:m], 256)
        for kind in use:
            runners, quality = {}, {}
            for name, model in chosen.items():
                if kind == INT8:
                    runners[name] = _int8_runner(model, Path(tmp), example, calibration_images(ctx, 256), name=name)
                else:
                    runners[name] = _runner(kind, model, Path(tmp), example, name=name, device=device)
                par = parity(refs[name], runners[name], test_x[: min(64, n)], 32, SEED) if kind != "torch" else None
                quality[name] = (_top1(runners[name], test_x, test_y, 64), None if par is None else record(par, reference="torch eager (CPU)", atol=None, rtol=None, min_agreement=None))
                console.print(f"bench: {escape(name)} / {kind}: top-1 {quality[name][0]:.2f} on {n} test images")
                if kind == "onnxruntime":
                    graphs[name] = _graph_ops(Path(tmp), name)
                if kind in ("onnxruntime", INT8):
                    sizes[(name, kind)] = round((Path(tmp) / f"{_slug(name)}{'.int8' if kind == INT8 else ''}.onnx").stat().st_size / 2**20, 3)
            for b in batches:
                times = _interleaved_latency(runners, test_x, b, reps, budget_s)
                for name, ts in times.items():
                    stats = timing_summary(ts)
                    p50 = stats["p50_ms"]
                    rows.append({
                        "model": name, "runtime": kind, "providers": runners[name].providers(), "batch": b, **stats,
                        "precision": "int8" if kind == INT8 else "fp32",
                        "onnx_exporter": None if kind in ("torch", "aoti") else "torchscript" if name in TIMED_ONLY else "dynamo",
                        "model_mb": sizes.get((name, kind), sizes.get((name, "onnxruntime")) if kind == "tensorrt" else None),
                        "images_per_s": round(1000.0 * b / p50, 1), "top1": round(quality[name][0], 2), "top1_images": n,
                        "parity": quality[name][1],  # vs torch eager on the same images and noise; None for torch itself
                    })
                    console.print(f"bench: {escape(name)} / {kind} / batch {b}: p50 {p50:.3f} ms, {rows[-1]['images_per_s']:.0f} images/s")
    torch.set_num_threads(previous_threads)
    ratios = _ratios(rows, chosen)
    summary = _readout_summary(chosen, student_metrics, calibrated_top1)
    if summary and graphs:  # latency ratios of equal graphs are noise; say when the graphs are equal
        cal_ops = graphs.get(summary["calibrated"])
        summary["same_graph_as"] = [m for m in PLAIN if m in graphs and cal_ops is not None and graphs[m] == cal_ops]
    result = {
        "pipeline": ctx.pipeline, "device": str(device), "models": list(chosen), "rows": rows, "ratios": ratios,
        "readouts": summary, "onnx_ops": graphs, "skipped_runtimes": skipped, "test_images": n, "threads": threads,
    }
    _print(console, rows, ratios, summary, skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {out}")
    return result


def _ratios(rows: list[dict], models: dict) -> list[dict]:
    """Calibrated GenDD student's p50 latency over the plain students, the probe, the reference
    sampler and the teacher (the target: <= 1.05x a plain student); and ORT over eager."""
    calibrated = next((m for m in models if m.startswith("gendd calibrated")), None)
    if calibrated is None:
        return []
    by = {(r["model"], r["runtime"], r["batch"]): r["p50_ms"] for r in rows}
    out = []
    for (model, runtime, batch), p50 in by.items():
        if model != calibrated:
            continue
        for other in (*PLAIN, "gendd probe", "gendd reference", "teacher"):
            if (other, runtime, batch) in by:
                out.append({"runtime": runtime, "batch": batch, "vs": other, "ratio": round(p50 / by[(other, runtime, batch)], 3)})
    for runtime in sorted({r["runtime"] for r in rows}):  # compiled vs eager (and int8 vs fp32) for the deployed student
        for batch in sorted({r["batch"] for r in rows}):
            for base, label in (("torch", "torch eager (same model)"), ("onnxruntime", "onnxruntime fp32 (same model)")):
                if runtime != base and (runtime == INT8 or base == "torch") and (calibrated, runtime, batch) in by and (calibrated, base, batch) in by:
                    out.append({"runtime": runtime, "batch": batch, "vs": label, "ratio": round(by[(calibrated, runtime, batch)] / by[(calibrated, base, batch)], 3)})
    return out


def _print(console, rows, ratios, summary, skipped: dict | None = None) -> None:
    t = Table(title="gendd bench")
    for col in ("model", "runtime", "batch", "status", "p50 ms", "p95 ms", "p99 ms", "mean ms", "images/s", "top-1", "max |diff| vs torch", "ONNX MB"):
        t.add_column(col)
    for r in rows:
        d, mb = (r["parity"] or {}).get("max_abs_diff"), r["model_mb"]
        t.add_row(
            escape(r["model"]), r["runtime"], str(r["batch"]), "ok", f"{r['p50_ms']:.3f}", f"{r['p95_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['mean_ms']:.3f}",
            f"{r['images_per_s']:.0f}", f"{r['top1']:.2f}", "-" if d is None else f"{d:.1e}", "-" if mb is None else f"{mb:.3f}",
        )
    for runtime, why in (skipped or {}).items():  # every runtime asked for gets a row, as `yolo benchmark` prints them
        t.add_row("-", runtime, "-", escape(f"skipped: {str(why).split(';')[0][:80]}"), *["-"] * 8)
    console.print(t)
    if ratios:
        rt = Table(title="latency ratios, calibrated GenDD student (p50, same run, timed in turn)")
        for col in ("runtime", "batch", "vs", "ratio"):
            rt.add_column(col)
        for r in ratios:
            rt.add_row(r["runtime"], str(r["batch"]), r["vs"], f"{r['ratio']:.3f}")
        console.print(rt)
    if summary:
        gap = summary["gap"]
        where = "level with it" if abs(gap) < 0.005 else (f"{gap:.2f} points below it" if gap > 0 else f"{-gap:.2f} points above it")
        console.print(
            f"calibrated student {escape(summary['calibrated'])}: {summary['calibrated_top1']:.2f}% on all {summary['test_images']} test images; "
            f"best GenDD read-out {summary['best_readout']} {summary['best_top1']:.2f}% ({where}); "
            f"published sampler {summary['readouts'].get('published', float('nan')):.2f}%"
        )
        if summary.get("same_graph_as"):
            console.print(f"its ONNX graph has the same operators and weight shapes as the {' and the '.join(summary['same_graph_as'])}'s")
