"""Runtime benchmark: latency, throughput, parity and top-1 of teacher and students per runtime.

Models: the teacher, the plain student (its linear probe, no sampling), the GenDD student with the
published reference sampler and with the calibrated sampler. Runtimes: torch eager, ONNX Runtime,
AOTInductor (opt-in: compiling takes minutes) and TensorRT where registered and available.
Each model is exported for the bench into a temporary folder (the published onnx artifact stays as
it is). Ratios are computed within this one run. Example: gendd bench -p pipelines/quickstart.toml
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table

from gendd_deploy.models.deployed import DeployedModel, SamplerSetting
from gendd_deploy.runtime import make_runner, runtime_status
from gendd_deploy.runtime.parity import parity
from gendd_deploy.stages import Context, run_chain

SEED = 1234


def _models(ctx: Context) -> dict[str, DeployedModel]:
    from gendd_deploy.stages.calibrate import CalibrateStage
    from gendd_deploy.stages.distill import DistillStage, load_student
    from gendd_deploy.stages.teacher import TeacherStage, load_teacher

    sampler_art = run_chain(CalibrateStage(), ctx)
    student = load_student(DistillStage().require(ctx))
    models = {"teacher": DeployedModel(load_teacher(TeacherStage().require(ctx)))}
    if not hasattr(student, "head"):
        models["student"] = DeployedModel(student)
        return models
    setting = SamplerSetting.from_dict(sampler_art.manifest["info"]["setting"])
    seed = int(sampler_art.manifest["info"].get("fixed_noise_seed") or 0)
    models["student probe"] = DeployedModel(student, SamplerSetting.probe())
    models["gendd reference"] = DeployedModel(student, SamplerSetting.published())
    models[f"gendd calibrated ({setting.label()})"] = DeployedModel(student, setting, seed)
    return models


def _runner(kind: str, model: DeployedModel, folder: Path, example: torch.Tensor, name: str, device: torch.device):
    """A runner of `kind` for the CPU-resident `model`; torch eager and AOTInductor run on `device`
    (the recipe's: the GPU where there is one), ONNX Runtime on the providers it has."""
    tail = model.noise_shape(1)[1:] if model.needs_noise else None
    slug = "".join(c if c.isalnum() else "_" for c in name)
    on_device = model if device.type == "cpu" else copy.deepcopy(model).to(device)
    if kind == "torch":
        return make_runner("torch", model=on_device, device=device)
    if kind == "onnxruntime":
        from gendd_deploy.runtime.onnx_export import export_onnx

        path = folder / f"{slug}.onnx"
        export_onnx(model, path, example)
        return make_runner("onnxruntime", onnx_path=path, noise_shape_tail=tail)
    if kind == "aoti":
        from gendd_deploy.runtime.aoti import export_aoti

        path = folder / f"{slug}.pt2"
        export_aoti(on_device, path, example)
        return make_runner("aoti", aoti_path=path, noise_shape_tail=tail, device=device)
    return make_runner(kind, model=model, noise_shape_tail=tail)


def _latency(runner, images: np.ndarray, batch: int, reps: int, budget_s: float) -> list[float]:
    x = np.ascontiguousarray(np.resize(images, (batch,) + images.shape[1:]), dtype=np.float32)
    noise = runner.noise(batch, SEED)
    runner.run(x, noise)  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < reps and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        runner.run(x, noise)
        times.append(1000.0 * (time.perf_counter() - t0))
    return times


def _top1(runner, images: np.ndarray, labels: np.ndarray, batch: int) -> float:
    correct = 0
    for i, s in enumerate(range(0, len(images), batch)):
        x = np.ascontiguousarray(images[s : s + batch])
        correct += int((runner.run(x, runner.noise(len(x), SEED + i)).argmax(1) == labels[s : s + batch]).sum())
    return 100.0 * correct / max(1, len(images))


def run_bench(ctx: Context, runtimes: list[str] | None, batches: list[int], reps: int, limit: int, budget_s: float, out: Path, console) -> dict:
    from gendd_deploy.data.augment import to_model_input

    data = ctx.data()
    n = min(limit, len(data.test))
    test_x = to_model_input(data.test.get_batch(torch.arange(n)), data.mean, data.std).numpy()
    test_y = data.test.labels[:n].numpy()
    example = torch.from_numpy(test_x[:2])
    status = runtime_status()
    wanted = runtimes or [r for r in ("torch", "onnxruntime", "tensorrt") if r in status]
    skipped = {r: status.get(r, "not registered") for r in wanted if status.get(r, "not registered") is not None}
    use = [r for r in wanted if r not in skipped]
    for r, why in skipped.items():
        ctx.log(f"[dim]bench: runtime {r} skipped: {escape(str(why))}[/]")
    rows = []
    models, device = _models(ctx), ctx.device()  # builds what is missing (training needs grad)
    with tempfile.TemporaryDirectory(prefix="gendd-bench-") as tmp, torch.no_grad():
        for name, model in models.items():
            torch_ref = make_runner("torch", model=model)  # parity reference: eager on the CPU
            for kind in use:
                runner = _runner(kind, model, Path(tmp), example, name, device)
                par = parity(torch_ref, runner, test_x[: min(64, n)], 32, SEED) if kind != "torch" else None
                acc = _top1(runner, test_x, test_y, 64)
                for b in batches:
                    ts = _latency(runner, test_x, b, reps, budget_s)
                    p50 = statistics.median(ts)
                    rows.append({
                        "model": name, "runtime": kind, "providers": runner.providers(), "batch": b,
                        "p50_ms": round(p50, 3), "p95_ms": round(float(np.percentile(ts, 95)), 3), "reps": len(ts),
                        "images_per_s": round(1000.0 * b / p50, 1), "top1": round(acc, 2), "top1_images": n,
                        "max_abs_diff_vs_torch": None if par is None else par["max_abs_diff"],
                    })
                    ctx.log(f"bench: {name} / {kind} / batch {b}: p50 {p50:.2f} ms")
    ratios = _ratios(rows, models)
    result = {"pipeline": ctx.pipeline, "device": str(device), "rows": rows, "ratios": ratios, "skipped_runtimes": skipped, "test_images": n}
    _print(console, rows, ratios)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {out}")
    return result


def _ratios(rows: list[dict], models: dict) -> list[dict]:
    """Calibrated GenDD student's p50 latency over the plain student, reference sampler and teacher."""
    calibrated = next((m for m in models if m.startswith("gendd calibrated")), None)
    if calibrated is None:
        return []
    by = {(r["model"], r["runtime"], r["batch"]): r["p50_ms"] for r in rows}
    out = []
    for (model, runtime, batch), p50 in by.items():
        if model != calibrated:
            continue
        for other in ("student probe", "gendd reference", "teacher"):
            if (other, runtime, batch) in by:
                out.append({"runtime": runtime, "batch": batch, "vs": other, "ratio": round(p50 / by[(other, runtime, batch)], 3)})
    for runtime in {r["runtime"] for r in rows}:  # ORT vs eager for the deployed student
        for batch in {r["batch"] for r in rows}:
            if (calibrated, runtime, batch) in by and (calibrated, "torch", batch) in by and runtime != "torch":
                out.append({"runtime": runtime, "batch": batch, "vs": "torch eager (same model)", "ratio": round(by[(calibrated, runtime, batch)] / by[(calibrated, "torch", batch)], 3)})
    return out


def _print(console, rows, ratios) -> None:
    t = Table(title="gendd bench")
    for col in ("model", "runtime", "batch", "p50 ms", "p95 ms", "images/s", "top-1", "max |diff| vs torch"):
        t.add_column(col)
    for r in rows:
        d = r["max_abs_diff_vs_torch"]
        t.add_row(r["model"], r["runtime"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['images_per_s']:.0f}", f"{r['top1']:.2f}", "-" if d is None else f"{d:.1e}")
    console.print(t)
    if ratios:
        rt = Table(title="latency ratios, calibrated GenDD student (p50, same run)")
        for col in ("runtime", "batch", "vs", "ratio"):
            rt.add_column(col)
        for r in ratios:
            rt.add_row(r["runtime"], str(r["batch"]), r["vs"], f"{r['ratio']:.3f}")
        console.print(rt)
