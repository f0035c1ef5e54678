"""Export the deployed student. Reads: student, sampler. Writes: onnx. Example: gendd export -p pipelines/quickstart.toml

The student with the read-out calibrate chose (a GenDD student's sampler or fitted read-out, a kd /
ce student's own head or fitted read-out) becomes one ONNX graph images [, noise] -> logits with a
dynamic batch dim. Before anything is published
the graph is run in ONNX Runtime (CPU) against PyTorch on the calibration split, with the same
noise, and every logit must agree within [export] atol + rtol x the image's largest |logit|
(runtime/parity.py says why the tolerance scales), and top-1 within min_agreement.
`gendd export --aoti` also writes an AOTInductor package (artifact "aoti") under the same gate.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import torch

from gendd_deploy.artifacts import Artifact, Draft
from gendd_deploy.data.augment import to_model_input
from gendd_deploy.errors import GateError, UsageError
from gendd_deploy.loaders import AOTI_FILE, ONNX_FILE, TRT_INT8_FILE, deployed_from_artifacts
from gendd_deploy.models.deployed import DeployedModel
from gendd_deploy.runtime import make_runner
from gendd_deploy.runtime import quantize
from gendd_deploy.runtime.aoti import MAX_BATCH, export_aoti
from gendd_deploy.runtime.onnx_export import ExportError, export_onnx
from gendd_deploy.runtime.parity import gate, parity, record
from gendd_deploy.spec import SPEC_KEY, DeployedSpec, stamp_onnx
from gendd_deploy.stages.base import Context, Stage
from gendd_deploy.stages.calibrate import CalibrateStage
from gendd_deploy.stages.distill import DistillStage


def calibration_images(ctx: Context, limit: int | None) -> np.ndarray:
    """The first `limit` calibration images, preprocessed as at evaluation: float32 (N, C, H, W)."""
    data = ctx.data()
    n = min(len(data.calib), limit or len(data.calib))
    if n == 0:
        raise UsageError(f"the calibration split of {ctx.recipe.source} is empty; raise [data] calib_fraction")
    u8 = data.calib.get_batch(torch.arange(n))
    return to_model_input(u8, data.mean, data.std).numpy()


PARITY_REFERENCE = "PyTorch eager (CPU), same images and noise, calibration split"


def float32_floor(model: DeployedModel, images: np.ndarray, batch: int, seed: int, result: dict) -> str:
    """Why a parity gate failed, in one sentence: the same model in float64 tells float32 rounding
    (PyTorch float32 itself is about as far from float64 as the candidate is from PyTorch) from a
    real mismatch (an op exported differently: the candidate is much further off than that)."""
    try:
        with torch.no_grad():
            f64 = copy.deepcopy(model).double()
            reference = make_runner("torch", model=model)
            floor = parity(reference, _Float64(f64), images, batch, seed)
    except Exception as e:  # noqa: BLE001 - a model that cannot run in float64: no diagnosis, the gate still stands
        return f"(no float64 diagnosis: {type(e).__name__})"
    ratio = result["max_abs_diff"] / max(floor["max_abs_diff"], 1e-30)
    told = f"PyTorch float32 itself differs from float64 by up to {floor['max_abs_diff']:.2g} ({floor['max_rel_diff']:.1g} of the logit scale)"
    if ratio <= 4 and result["top1_agreement"] >= floor["top1_agreement"]:
        return f"{told}, {ratio:.1f}x less than this: float32 rounding, not a mismatch; raise [export] rtol or atol"
    return f"{told}, {ratio:.0f}x less than this: a real mismatch (an op exported differently?), not rounding"


class _Float64:
    """A float64 copy of a deployed model behind the runner interface parity() takes."""

    name = "torch float64"

    def __init__(self, model: DeployedModel):
        self.model = model

    def run(self, images: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        x = torch.from_numpy(images).double()
        z = None if noise is None else torch.from_numpy(noise).double()
        return self.model(x, z).numpy()

# ---- stages ---------------------------------------------------------------------------------------


class _DeployStage(Stage):
    """Shared by onnx and aoti: inputs (student [+ sampler]), the model, the parity gate, the manifest."""

    def inputs(self, ctx: Context) -> dict[str, Stage]:
        # every method: calibrate chose the read-out (a sampler, a fitted head, or the student's own)
        return {"student": DistillStage(), "sampler": CalibrateStage()}

    def _gate(self, ctx: Context, model: DeployedModel, candidate, images: np.ndarray, what: str) -> dict:
        ec = ctx.recipe.export
        result = parity(make_runner("torch", model=model), candidate, images, ec.parity_batch, ctx.recipe.pipeline.seed)
        try:
            gate(result, ec.atol, ec.min_agreement, what, rtol=ec.rtol)
        except GateError as e:
            raise GateError(f"{e}; {float32_floor(model, images, ec.parity_batch, ctx.recipe.pipeline.seed, result)}") from None
        return result

    def _record(self, ctx: Context, draft: Draft, inputs: dict[str, Artifact], model: DeployedModel, *, io: dict, result: dict, file: str, export_s: float) -> None:
        ec, s = ctx.recipe.export, model.setting
        student_info = inputs["student"].manifest["info"]
        spec = DeployedSpec.from_io(
            io,
            preprocess=student_info.get("preprocess"),
            class_names=tuple(student_info["class_names"]) if student_info.get("class_names") else None,
            method=student_info["method"],
            readout=s.label() if s is not None else "probe",
            setting=s.to_dict() if s is not None else None,
            fixed_noise_seed=int(inputs["sampler"].manifest["info"].get("fixed_noise_seed") or 0) if s is not None and s.noise == "fixed" else None,
            max_batch=io.get("max_batch"),
        )
        if spec.noise_tail != model.noise_tail:  # the graph must take exactly the noise the model draws
            raise ExportError(f"the exported graph takes noise {spec.noise_tail}, the model draws {model.noise_tail}; export again")
        draft.info.update(
            {
                SPEC_KEY: spec.to_manifest(),
                **{k: io[k] for k in ("exporter", "opset", "nodes", "torch") if k in io},
            }
        )
        draft.metrics.update(
            {
                "parity": record(result, reference=PARITY_REFERENCE, atol=ec.atol, rtol=ec.rtol, min_agreement=ec.min_agreement),
                f"{Path(file).suffix.lstrip('.')}_bytes": draft.path(file).stat().st_size,
                "export_s": round(export_s, 2),
            }
        )
        ctx.log(
            f"[bold]{self.name}[/]: {s.label() if s else student_info['method']} -> {file}; parity on {result['n']} calibration images: "
            f"max abs diff {result['max_abs_diff']:.2g} ({result['max_rel_diff']:.2g} of the logit scale; atol {ec.atol:g}, rtol {ec.rtol:g}), top-1 agreement {result['top1_agreement']:.4f}"
        )


class ExportStage(_DeployStage):
    name = command = "export"
    artifact = "onnx"

    def config(self, ctx: Context) -> dict:
        return ctx.recipe.export.model_dump()

    def build(self, ctx: Context, draft: Draft, inputs: dict[str, Artifact]) -> None:
        ec = ctx.recipe.export
        model = deployed_from_artifacts(inputs["student"], inputs.get("sampler"))
        images = calibration_images(ctx, ec.parity_limit)
        t0 = time.perf_counter()
        io = export_onnx(model, draft.path(ONNX_FILE), torch.from_numpy(images[:2]), opset=ec.opset, exporter=ec.exporter)
        export_s = time.perf_counter() - t0
        if io["opset"] != ec.opset:  # never publish one opset under another's fingerprint
            raise ExportError(f"the {io['exporter']} exporter wrote opset {io['opset']} where [export] opset = {ec.opset}; choose an opset it writes (e.g. 18)")
        ort = make_runner("onnxruntime", path=draft.path(ONNX_FILE), device="cpu")
        result = self._gate(ctx, model, ort, images, "ONNX Runtime (CPU) vs PyTorch")
        precision = choose_precision(ctx, draft, ort, [t["name"] for t in io["inputs"]]) if ec.precision != "fp32" else {"requested": "fp32", "kept": "fp32"}
        self._record(ctx, draft, inputs, model, io=io, result=result, file=ONNX_FILE, export_s=export_s)
        spec = DeployedSpec.from_manifest(draft.info)
        for name in (ONNX_FILE, TRT_INT8_FILE):  # the file says what it is, without its manifest
            if draft.path(name).is_file():
                stamp_onnx(draft.path(name), spec, [a.as_input() for a in inputs.values()])
        draft.metrics["onnx_bytes"] = draft.path(ONNX_FILE).stat().st_size
        draft.info["precision"] = precision
        draft.info["providers"] = ort.providers()


def choose_precision(ctx: Context, draft: Draft, fp32, input_names: list[str]) -> dict:
    """[export] precision int8 / auto: quantize the float32 graph in the draft with every
    calibration method (ranges from the first calibration-split images), gate each against the
    float32 graph on the next ones, and keep int8 (int8: refused past max_top1_drop; auto: only
    when it passes and is faster here). The kept graph ends up as the draft's model.onnx.
    Returns the manifest's `precision` record: what was asked, kept, why, and the figures."""
    ec, seed = ctx.recipe.export, ctx.recipe.pipeline.seed
    data = ctx.data()
    n_cal = min(ec.int8_calibration_images, len(data.calib) // 2)
    n_gate = min(ec.int8_gate_images, len(data.calib) - n_cal)
    if n_cal < 1 or n_gate < 1:
        raise UsageError(f"int8 export needs calibration images to set ranges and others to gate on; the calibration split has {len(data.calib)}")
    images = calibration_images(ctx, n_cal + n_gate)
    cal_x, gate_x, gate_y = images[:n_cal], images[n_cal:], data.calib.labels[n_cal : n_cal + n_gate].numpy()
    results, done = [], {}
    for method in quantize.METHODS:
        path = draft.path(f"model.int8.{method}.onnx")
        done[method] = (path, quantize.quantize_int8(draft.path(ONNX_FILE), path, cal_x, input_names=input_names, noise=lambda n, i: fp32.noise(n, seed + i), method=method))
        r = quantize.gate_int8(fp32, make_runner("onnxruntime", path=path, device="cpu"), gate_x, gate_y, method=method, batch=ec.parity_batch, seed=seed)
        results.append(r)
        ctx.log(f"export: int8 ({method} ranges, {n_cal} images): top-1 {r.int8_top1:.2f}% vs fp32 {r.fp32_top1:.2f}% on {n_gate} held-out calibration images, agreement {r.parity['top1_agreement']:.4f}")
    record = {"requested": ec.precision, "calibration_images": n_cal, "gate_images": n_gate, "split": "calibration", "max_top1_drop": ec.max_top1_drop, "gate": [r.to_dict() for r in results]}
    try:
        quantize.refuse(results, ec.max_top1_drop, n_gate)
        passed = True
    except GateError as e:
        if ec.precision == "int8":
            raise
        passed, why = False, str(e)
    best = min(results, key=lambda r: r.drop)
    kept = "fp32"
    if passed:
        int8 = make_runner("onnxruntime", path=done[best.method][0], device="cpu")
        batch = ctx.recipe.calibrate.latency_batch
        timing = quantize.timed({"fp32": fp32, "int8": int8}, gate_x, sorted({1, batch}), seed=seed)
        record["timing"] = {str(b): t for b, t in timing.items()}
        if ec.precision == "int8":
            kept, why = "int8", f"asked for; top-1 {best.int8_top1:.2f}% against fp32's {best.fp32_top1:.2f}% ({-best.drop:+.2f} points; {ec.max_top1_drop:g} may be lost)"
        else:
            kept, why = quantize.auto_choice(timing, batch)
        record["quantization"] = done[best.method][1]
    if kept == "int8":
        record["tensorrt_graph"] = _tensorrt_graph(ctx, draft, fp32, input_names, best.method, cal_x, gate_x, gate_y)
        os.replace(done[best.method][0], draft.path(ONNX_FILE))
    for path, _ in done.values():
        path.unlink(missing_ok=True)
    ctx.log(f"export: precision {kept} ({why})")
    return {**record, "kept": kept, "why": why}


def _tensorrt_graph(ctx: Context, draft: Draft, fp32, input_names: list[str], method: str, cal_x: np.ndarray, gate_x: np.ndarray, gate_y: np.ndarray) -> dict:
    """The same quantization in the form TensorRT builds (s8s8: symmetric int8 activations), for
    `gendd build` with [build] precision = "int8", under the same accuracy gate. Its record."""
    ec, seed = ctx.recipe.export, ctx.recipe.pipeline.seed
    path = draft.path(TRT_INT8_FILE)
    info = quantize.quantize_int8(draft.path(ONNX_FILE), path, cal_x, input_names=input_names, noise=lambda n, i: fp32.noise(n, seed + i), method=method, target="tensorrt")
    r = quantize.gate_int8(fp32, make_runner("onnxruntime", path=path, device="cpu"), gate_x, gate_y, method=method, batch=ec.parity_batch, seed=seed)
    if r.drop > ec.max_top1_drop:
        path.unlink()
        return {"file": None, "why": f"the s8s8 graph loses {r.drop:.2f} top-1 points (over {ec.max_top1_drop:g}); build int8 engines from another export", "gate": r.to_dict()}
    return {"file": TRT_INT8_FILE, "quantization": info, "gate": r.to_dict()}


class AotiStage(_DeployStage):
    name = "aoti"
    command = "export --aoti"
    artifact = "aoti"

    def config(self, ctx: Context) -> dict:
        cfg = ctx.recipe.export.model_dump(exclude={"opset"})  # opset shapes the ONNX graph only
        return {**cfg, "max_batch": MAX_BATCH, "device": "cpu", "torch": torch.__version__}

    def build(self, ctx: Context, draft: Draft, inputs: dict[str, Artifact]) -> None:
        ec = ctx.recipe.export
        model = deployed_from_artifacts(inputs["student"], inputs.get("sampler"))
        images = calibration_images(ctx, ec.parity_limit)
        t0 = time.perf_counter()
        io = export_aoti(model, draft.path(AOTI_FILE), torch.from_numpy(images[:2]))
        export_s = time.perf_counter() - t0
        runner = make_runner("aoti", path=draft.path(AOTI_FILE))
        result = self._gate(ctx, model, runner, images, "AOTInductor (CPU) vs PyTorch")
        self._record(ctx, draft, inputs, model, io=io, result=result, file=AOTI_FILE, export_s=export_s)
        draft.info["exporter"] = "torch.export + aoti_compile_and_package"


def export_aoti_artifact(ctx: Context) -> Artifact:
    """`gendd export --aoti`: the AOTInductor package of the deployed student (reused when it exists)."""
    return AotiStage().run(ctx)
