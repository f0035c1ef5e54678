"""Calibrate the sampler. Reads: student. Writes: sampler. Example: gendd calibrate -p pipelines/quickstart.toml

GenDD's published read-out (64-step DDPM, 5 draws, guidance 2) costs ~640 head passes per token;
gendd-method.md reports that a deterministic few-step DDIM can match or beat it. This stage
measures that on the calibration split (never the test split) for a grid of `SamplerSetting`s
plus the linear probe and the fitted read-outs, and picks the cheapest setting shown to be at most
`tolerance` top-1 points below the best (the lower end of its paired bootstrap interval).
The grid, the choice and the report are gendd_deploy/calibration.py; this module measures.

- Accuracy runs in PyTorch through `DeployedModel` (the export stage later proves ORT == torch).
  The backbone is the same for every setting, so it runs once per batch and its features are
  fed through each setting's `DeployedModel` (see `_headless`).
- Noise: batch b of every setting uses `make_noise(shape, noise_seed + b)`; "fixed" settings
  freeze `fixed_noise_seed` into the model, as the deployed model will.
- Latency is measured on the runtime the recipe targets, once per graph structure (sampler,
  steps, draws, guidance, noise input), and shared by the settings that have that structure.

The artifact holds `table.json` (every setting) and `accuracy_vs_latency.png`; the manifest's
info carries the chosen `setting`, `fixed_noise_seed`, the `reason` and the `reference`.
A kd / ce student has no sampler; its candidates are its own head (the probe setting) and the
read-outs distill fitted to its backbone, chosen under the same rule, so every method can ship a
fitted head.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from gendd_deploy import seeds
from gendd_deploy.artifacts import Artifact, Draft
from gendd_deploy.calibration import MIN_ALPHA_BAR, PROBE, REFERENCE, Result, build_grid, candidates, choose, plot, structure, table
from gendd_deploy.loaders import load_student
from gendd_deploy.models import backbone as bb
from gendd_deploy.models.deployed import DeployedModel, SamplerSetting
from gendd_deploy.models.student import GenDDStudent
from gendd_deploy.runtime import make_runner, registry
from gendd_deploy.runtime.base import make_noise
from gendd_deploy.runtime.onnx_export import export_onnx, export_onnx_fast
from gendd_deploy.runtime.timing import summary as timing_summary
from gendd_deploy.runtime.timing import time_in_turn
from gendd_deploy.stages.base import Context, Stage
from gendd_deploy.stages.distill import DistillStage
from gendd_deploy.evaluation import top1
from gendd_deploy.training import Timer, model_input, progress_bar

# --------------------------------------------------------------------------- evaluation


def _headless(student: GenDDStudent) -> GenDDStudent:
    """A shallow view of the student whose `features` is the identity: DeployedModel(view, s)
    takes pooled features (B, D_s) in place of images, so the backbone runs once for all settings
    while the sampler code run is exactly DeployedModel's."""
    view = copy.copy(student)
    view.features = lambda f_s: f_s  # instance attribute on the copy; the student is untouched
    return view


@torch.no_grad()
def calib_features(ctx: Context, student: torch.nn.Module, n: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pooled student features per eval batch [(b, D_s)] and labels (n,) of the first n calibration
    images; `student` is a GenDD student or a plain (kd / ce) backbone."""
    calib, bs = ctx.data().calib, ctx.recipe.data.eval_batch_size
    features = student.features if isinstance(student, GenDDStudent) else lambda x: bb.pooled_features(student, x)
    feats = []
    for i in range(0, n, bs):
        x = model_input(ctx.data(), calib.get_batch(torch.arange(i, min(n, i + bs))), device)
        feats.append(features(x))
    return feats, calib.labels[:n]


@torch.no_grad()
def predict_setting(student: torch.nn.Module, setting: SamplerSetting, feats: list[torch.Tensor], *, noise_seed: int, fixed_noise_seed: int) -> torch.Tensor:
    """Predicted classes (n,) of one setting; batch b gets noise from seed noise_seed + b. A linear
    setting (own head, fitted read-out) applies the deployed model's Linear to the features."""
    if setting.linear:
        head = DeployedModel(student, setting).linear_head()
        return torch.cat([head(f_s).argmax(1).cpu() for f_s in feats])
    model = DeployedModel(_headless(student), setting, fixed_noise_seed).to(feats[0].device)
    preds = []
    for b, f_s in enumerate(feats):
        noise = None
        if model.needs_noise:
            noise = torch.from_numpy(make_noise(model.noise_shape(f_s.shape[0]), noise_seed + b)).to(f_s.device)
        preds.append(model(f_s, noise).argmax(1).cpu())
    return torch.cat(preds)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with n intra-op threads (None: unchanged). The accuracy sweep is hundreds of
    small matmuls (rows = images x draws x tokens, width w): on a 2-core CPU shared with other
    work, a second thread mostly waits at barriers. Measured on the quickstart student, the
    reference sampler over 216 images: 1 thread 5.7 s, 2 threads 3.1 s idle / 35 s under load."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- latency


def export_for_timing(model: DeployedModel, path: Path, example: torch.Tensor) -> None:
    """ONNX export for latency only, with the TorchScript exporter (`export_onnx_fast`): the same
    graph as `export_onnx`, whose dynamo exporter takes 4-15 s per setting on a 2-core CPU against
    0.1-1.5 s here. The export stage makes, and parity-checks, the shipped graph."""
    try:
        export_onnx_fast(model, path, example)
    except Exception:  # noqa: BLE001 - a torch without the TorchScript exporter: the slow, shipped path
        export_onnx(model, path, example)


def timing_runner(runtime: str, model: DeployedModel, example: torch.Tensor, tmp: Path, device: torch.device):
    """A runner for `model` on the target runtime ([calibrate] runtime, a registered one): torch
    runs the module; any other runs the model exported to a temporary .onnx, which the session
    holds, so the file is deleted at once. No TensorRT execution provider: it would build an engine
    per setting (`device` cuda asks onnxruntime for CUDA, then the CPU)."""
    if registry.get(runtime).stage is None:
        return make_runner(runtime, model=model, device=device)
    path = tmp / f"timing-{uuid.uuid4().hex[:8]}.onnx"
    on_cpu = next(model.parameters()).device.type == "cpu"
    with torch_threads(1):  # tracing is python-bound; see torch_threads
        # a copy when the student lives on a GPU: .cpu() would move the caller's student too
        export_for_timing((model if on_cpu else copy.deepcopy(model).cpu()).eval(), path, example.cpu())
    runner = make_runner(runtime, path=path, device=device.type)
    path.unlink()
    return runner


def time_runner(runner, images: np.ndarray, seed: int, *, min_runs: int = 5, min_s: float = 0.2, max_runs: int = 200) -> float:
    """p50 wall time (ms) of runner.run on one batch after one warm-up run: at least `min_runs`
    runs and, up to `max_runs`, at least `min_s` seconds (runtime/timing.py: time_in_turn, summary)."""
    noise = runner.noise(images.shape[0], seed)
    ms = time_in_turn({"runner": lambda: runner.run(images, noise)}, max_runs=max_runs, min_runs=min_runs, min_s=min_s)
    return timing_summary(ms["runner"])["p50_ms"]


# --------------------------------------------------------------------------- the stage


class CalibrateStage(Stage):
    name = command = "calibrate"
    artifact = "sampler"

    def inputs(self, ctx: Context) -> dict[str, Stage]:
        return {"student": DistillStage()}

    def config(self, ctx: Context) -> dict:
        # eval_batch_size shapes the fresh noise each batch gets, hence the sampled predictions
        return {
            "calibrate": ctx.recipe.calibrate.model_dump(),
            "seed": ctx.recipe.pipeline.seed,
            "eval_batch_size": ctx.recipe.data.eval_batch_size,
            "min_alpha_bar": MIN_ALPHA_BAR,  # part of every candidate setting
        }

    def build(self, ctx: Context, draft: Draft, inputs: dict[str, Artifact]) -> None:
        cc = ctx.recipe.calibrate
        student_art = inputs["student"]
        timer = Timer()
        student = load_student(student_art, ctx.device())
        gendd = isinstance(student, GenDDStudent)
        if gendd:
            T = student.head.train_schedule.num_timesteps
            grid, n_candidates = build_grid(cc, T), len(set(candidates(cc, T)) | {PROBE, REFERENCE})
        else:  # a kd / ce student: its own head, then the fitted read-outs
            grid, n_candidates = [PROBE], 1
        if n_candidates > len(grid):  # max_settings caps the sampler grid; fitted read-outs come on top
            worst = max(s.head_passes() for s in grid if s != REFERENCE)
            ctx.log(
                f"calibrate: \\[calibrate] max_settings = {cc.max_settings} keeps the {len(grid)} cheapest of {n_candidates} sampler settings "
                f"(up to {worst} head passes, plus the reference); raise it or narrow the grid to search further"
            )
        fitted = [SamplerSetting.fitted(name) for name in sorted(getattr(student, "readouts", {}))] if cc.readouts else []
        grid = grid[:1] + fitted + grid[1:]
        results, sweep = self._sweep(ctx, student, grid)
        chosen, best = choose(results, cc.tolerance, resamples=cc.bootstrap, confidence=cc.confidence, seed=ctx.recipe.pipeline.seed)
        chosen.chosen = True
        by = {r.setting: r for r in results}
        ref, probe = by.get(REFERENCE), by[PROBE]
        n = sweep["calib_images"]
        lo, hi = chosen.interval or (chosen.top1 - best.top1,) * 2
        ratios = f"{chosen.latency_ms / probe.latency_ms:.3g}x the probe's (own head's) latency"
        if ref is not None:
            ratios = f"{chosen.latency_ms / ref.latency_ms:.3g}x the reference's latency and " + ratios
        reason = (
            f"{chosen.setting.label()}: the lowest latency ({chosen.latency_ms:.3g} ms per {cc.latency_batch} images on {cc.runtime}) "
            f"among the {len(results)} settings shown at most {cc.tolerance:g} top-1 points below the best ({best.setting.label()}, "
            f"{best.top1:.2f}%); it scores {chosen.top1:.2f}% on {n} calibration images ({cc.confidence:.0%} paired bootstrap interval "
            f"vs the best: {lo:+.2f} to {hi:+.2f} points), {ratios}"
        )
        table_json = {"runtime": cc.runtime, "latency_batch": cc.latency_batch, "calib_images": n, "settings": [r.row() for r in results]}
        draft.path("table.json").write_text(json.dumps(table_json, indent=1))
        plot(results, chosen, draft.path("accuracy_vs_latency.png"), title=f"{ctx.pipeline}: {n} calibration images, {cc.runtime}, batch {cc.latency_batch}", tolerance=cc.tolerance)
        draft.info.update(
            {
                "setting": chosen.setting.to_dict(),
                "label": chosen.setting.label(),
                "fixed_noise_seed": sweep.pop("fixed_noise_seed"),
                "eval_noise_seed": sweep.pop("eval_noise_seed"),
                "reason": reason,
                "reference": REFERENCE.to_dict(),
                "method": student_art.manifest["info"]["method"],
                "choice": {
                    "best": {"setting": best.setting.to_dict(), "label": best.setting.label(), "top1": round(best.top1, 3)},
                    "chosen": {"label": chosen.setting.label(), "top1": round(chosen.top1, 3), "latency_ms": round(chosen.latency_ms, 4)},
                    "tolerance": cc.tolerance,
                    "test": (
                        f"non-inferiority: paired bootstrap over the calibration images, {cc.bootstrap} resamples; a cheaper setting is kept "
                        f"when the lower end of its {cc.confidence:.0%} interval of top-1 minus the best's is >= -tolerance"
                    ),
                    "interval_vs_best": [round(lo, 3), round(hi, 3)],
                    "latency_vs_probe": round(chosen.latency_ms / probe.latency_ms, 4),
                    "latency_vs_reference": round(chosen.latency_ms / ref.latency_ms, 4) if ref is not None else None,
                },
                "grid": {"candidates": n_candidates, "readouts": len(fitted), "evaluated": len(grid), "max_settings": cc.max_settings},
                **sweep,
            }
        )
        draft.metrics.update(
            {
                "calib_top1": round(chosen.top1, 3),
                **({"reference_top1": round(ref.top1, 3), "reference_latency_ms": round(ref.latency_ms, 4)} if ref is not None else {}),
                "probe_top1": round(probe.top1, 3),
                "best_top1": round(best.top1, 3),
                "latency_ms": round(chosen.latency_ms, 4),
                "probe_latency_ms": round(probe.latency_ms, 4),
                "n_settings": len(results),
                "calib_images": n,
                "runtime": cc.runtime,
                "wall_s": round(timer(), 2),
            }
        )
        if not ctx.quiet:
            ctx.console.print(table(results, chosen, best, batch=cc.latency_batch, runtime=cc.runtime))
        ctx.log(f"calibrate: {reason}")

    def _sweep(self, ctx: Context, student: torch.nn.Module, grid: list[SamplerSetting]) -> tuple[list[Result], dict]:
        """Top-1, agreement with the reference and latency of every setting; plus what the
        manifest should say about how they were measured."""
        cc, seed, device = ctx.recipe.calibrate, ctx.recipe.pipeline.seed, ctx.device()
        fixed_noise_seed = seed
        noise_seed = seeds.calibration_noise_base(seed)
        calib = ctx.data().calib
        n = min(len(calib), cc.limit or len(calib))
        eval_threads = 1 if device.type == "cpu" else None
        timer = Timer()
        with torch_threads(eval_threads):
            feats, labels = calib_features(ctx, student, n, device)
        example = model_input(ctx.data(), calib.get_batch(torch.arange(cc.latency_batch) % len(calib)), torch.device("cpu"))
        results, latency, preds, providers = [], {}, {}, None
        spent = {"features": timer(), "accuracy": 0.0, "latency": 0.0}
        with progress_bar(ctx.console, ctx.quiet) as bar, tempfile.TemporaryDirectory(prefix="gendd-calibrate-") as tmp:
            task = bar.add_task("calibrate", total=len(grid), info="")
            for s in grid:
                bar.update(task, info=s.label())
                t0 = time.perf_counter()
                with torch_threads(eval_threads):
                    preds[s] = predict_setting(student, s, feats, noise_seed=noise_seed, fixed_noise_seed=fixed_noise_seed)
                t1 = time.perf_counter()
                key = structure(s)
                if key not in latency:
                    runner = timing_runner(cc.runtime, DeployedModel(student, s, fixed_noise_seed).eval(), example, Path(tmp), device)
                    latency[key] = time_runner(runner, example.numpy(), noise_seed)
                    providers = runner.providers()
                    del runner
                spent["accuracy"] += t1 - t0
                spent["latency"] += time.perf_counter() - t1
                results.append(Result(s, top1(preds[s], labels), latency_ms=latency[key], correct=preds[s] == labels))
                bar.advance(task)
        agree_with = preds.get(REFERENCE, preds[PROBE])  # a kd / ce student has no reference sampler: its own head
        for r in results:
            r.agreement = (preds[r.setting] == agree_with).float().mean().item()
        return results, {
            "calib_images": n,
            "fixed_noise_seed": fixed_noise_seed,
            "eval_noise_seed": noise_seed,
            "eval_threads": eval_threads or torch.get_num_threads(),
            "latency": {"runtime": cc.runtime, "providers": providers, "batch": cc.latency_batch, "structures": len(latency), "statistic": "p50_ms of runtime.timing.summary, after one warm-up"},
            "time_s": {k: round(v, 2) for k, v in spent.items()},
        }
