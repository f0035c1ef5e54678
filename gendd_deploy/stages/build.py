"""Build a TensorRT engine. Reads: onnx. Writes: engine (and timing_cache). Example: gendd build -p pipelines/quickstart.toml

Needs TensorRT 10/11 and an NVIDIA GPU; without them the stage refuses before it fingerprints its
inputs or opens a draft, so nothing is written. The precision follows the installed TensorRT major
version (trt/plan.py): builder flags on 10, a converted and separately gated ONNX graph on 11. The
engine is gated against ONNX Runtime fp32 on the calibration split, its latency measured at the
profile's opt batch, and its manifest records what it is tied to (TensorRT, CUDA, GPU, compute
capability) so that a runner on another machine refuses it. The timing cache is its own artifact,
keyed by GPU model + compute capability + TensorRT version, and reused by every later build.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gendd_deploy.artifacts import Artifact, Draft, fingerprint, sha256_file
from gendd_deploy.errors import UsageError
from gendd_deploy.runtime import make_noise, make_runner
from gendd_deploy.runtime.parity import compare, gate, record
from gendd_deploy.runtime.tensorrt import ENGINE_FILE, require_tensorrt, trt_major
from gendd_deploy.spec import SPEC_KEY, DeployedSpec
from gendd_deploy.stages.base import Context, Stage
from gendd_deploy.stages.export import ExportStage, calibration_images
from gendd_deploy.trt.builder import EngineBuilder
from gendd_deploy.trt.plan import (
    GATE_HINT,
    precision_plan,
    profile_shapes,
    profile_to_json,
    timing_cache_key,
)
from gendd_deploy.trt.precision import convert_precision, converter_identity, gate_conversion, ort_logits

PARITY_REFERENCE = "ONNX Runtime CPU, fp32 graph, calibration split"
TIMING_CACHE = "timing_cache"  # stage / artifact name of the timing cache
TIMING_FILE = "timing.cache"


def calibration_inputs(ctx: Context, noise_tail: tuple | None, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The export's calibration images (stages/export.calibration_images) and seeded noise (N, *tail) for the parity gates."""
    images = calibration_images(ctx, limit)
    noise = make_noise((len(images),) + tuple(noise_tail), seed) if noise_tail else None
    return images, noise


# ---- the timing cache artifact ----------------------------------------------------------------


def timing_cache_fp(key: dict) -> str:
    return fingerprint(TIMING_CACHE, key, {})


def find_timing_cache(ctx: Context, key: dict) -> Artifact | None:
    """Newest timing cache for this GPU model + compute capability + TensorRT version, verified."""
    art = ctx.store.find(ctx.pipeline, TIMING_CACHE, timing_cache_fp(key))
    return ctx.store.check_input(art, f"delete {art.path}") if art is not None else None


def save_timing_cache(ctx: Context, key: dict, data: bytes, previous: Artifact | None) -> Artifact:
    """Publish the grown cache as a new version (same fingerprint); keep `previous` when unchanged."""
    if previous is not None and previous.file(TIMING_FILE).read_bytes() == data:
        return previous
    # `previous` is named in info, not as an input: older caches stay collectable by `gendd artifacts gc`
    with ctx.store.draft(ctx.pipeline, TIMING_CACHE, timing_cache_fp(key), key, []) as d:
        d.path(TIMING_FILE).write_bytes(data)
        d.info = {**key, "bytes": len(data), "grown_from": previous.ref if previous else None}
        return d.publish()


# ---- the stage ---------------------------------------------------------------------------------


def int8_graph(onnx_art: Artifact) -> Path:
    """The QDQ graph an int8 engine is built from: written by `gendd export` with [export]
    precision = "int8" (or "auto" when it kept int8), in TensorRT's form (symmetric activations)."""
    record = onnx_art.manifest["info"].get("precision") or {}
    name = (record.get("tensorrt_graph") or {}).get("file")
    if record.get("kept") != "int8" or not name:
        why = (record.get("tensorrt_graph") or {}).get("why") or f"it is a {record.get('kept', 'fp32')} export"
        raise UsageError(f"[build] precision = 'int8' needs an int8 export with a TensorRT graph; {onnx_art.ref} has none ({why}). Export with --precision int8")
    return onnx_art.file(name)


class BuildStage(Stage):
    name = command = "build"
    artifact = "engine"
    uses_data = True  # the parity gate runs on the calibration split

    def inputs(self, ctx: Context) -> dict[str, Stage]:
        return {"onnx": ExportStage()}

    def fingerprint(self, ctx: Context) -> str:
        require_tensorrt("gendd build")  # refuse before inputs are resolved or any folder is made
        return super().fingerprint(ctx)

    def config(self, ctx: Context) -> dict:
        here = require_tensorrt("gendd build")
        plan = precision_plan(trt_major(here["tensorrt"]), ctx.recipe.build.precision)
        cfg = {
            **ctx.recipe.build.model_dump(),
            "tensorrt": here["tensorrt"],
            "gpu": here["gpu"],
            "gpu_capability": here["gpu_capability"],
            "precision_plan": plan.to_dict(),
        }
        if plan.onnx_conversion:
            cfg["conversion"] = converter_identity(plan.onnx_conversion)
        return cfg

    def build(self, ctx: Context, draft: Draft, inputs: dict[str, Artifact]) -> None:
        here = require_tensorrt("gendd build")
        bc, ec = ctx.recipe.build, ctx.recipe.export
        onnx_art = inputs["onnx"]
        src = onnx_art.file("model.onnx")
        spec = DeployedSpec.from_manifest(onnx_art.manifest["info"], onnx_art.ref)  # copied unchanged into the engine's manifest
        tail = spec.noise_tail
        shapes = profile_shapes(spec.io(), bc)
        plan = precision_plan(trt_major(here["tensorrt"]), bc.precision)
        ctx.log(f"[bold]build[/]: {plan.describe()}; profile batch {bc.min_batch}/{bc.opt_batch}/{bc.max_batch}")

        if plan.precision == "int8":  # the export's s8s8 QDQ graph; the reference runs that same graph on ORT CPU
            src = int8_graph(onnx_art)
        images, noise = calibration_inputs(ctx, tail, ec.parity_limit, ctx.recipe.pipeline.seed)
        ref = ort_logits(src, images, noise, ec.parity_batch)  # the fp32 (or QDQ) graph on ORT CPU: the reference

        graph, conversion = src, None
        if plan.onnx_conversion:
            graph = draft.path(f"model.{plan.onnx_conversion}.onnx")
            conversion = convert_precision(src, graph, plan.onnx_conversion)
            conversion["gate"] = gate_conversion(
                src, graph, images, noise, plan.onnx_conversion, atol=bc.atol, min_agreement=bc.min_agreement, batch=ec.parity_batch, ref=ref
            )
            g = conversion["gate"]
            ctx.log(f"build: {plan.onnx_conversion} graph vs fp32 on ORT CPU ({g['gate']}): max |diff| {g['max_abs_diff']:.3g}, top-1 agreement {g['top1_agreement']:.4f}")
            if g["reason"]:
                ctx.log(f"build: {g['reason']}")

        key = timing_cache_key(here)
        cache_in = find_timing_cache(ctx, key)
        built = EngineBuilder(bc.workspace_mb).build(graph, plan, shapes, cache_in.file(TIMING_FILE).read_bytes() if cache_in else None)
        draft.path(ENGINE_FILE).write_bytes(built.plan)
        cache_out = save_timing_cache(ctx, key, built.timing_cache, cache_in)
        ctx.log(f"build: engine built in {built.build_s:.1f}s; timing cache {cache_out.ref}" + (" (reused)" if cache_in else " (new)"))

        runner = make_runner("tensorrt", path=draft.path(ENGINE_FILE), spec=spec, check=False)
        report = compare(ref, runner.run(images, noise))
        gate(report, bc.atol, bc.min_agreement, f"TensorRT {bc.precision} engine vs ONNX Runtime fp32", images="calibration images", hint=GATE_HINT)
        draft.metrics.update(
            parity=record(report, reference=PARITY_REFERENCE, atol=bc.atol, min_agreement=bc.min_agreement),
            latency=runner.latency_ms(bc.opt_batch),  # {"batch", p50_ms ... n}: runtime/timing.summary
            build_s=round(built.build_s, 3),
        )
        if conversion:
            g = conversion["gate"]
            draft.metrics["conversion_parity"] = {
                "gate": g["gate"],
                **record(g, reference="ONNX Runtime CPU, fp32 graph, calibration split", atol=bc.atol, min_agreement=bc.min_agreement),
            }
        draft.info = {
            "engine": ENGINE_FILE,
            **here,  # tensorrt, cuda, gpu, gpu_capability: what the engine is tied to
            "precision": bc.precision,
            "precision_plan": plan.to_dict(),
            "graph": graph.name if graph != src else f"{onnx_art.ref}/{src.name}",
            "conversion": conversion,
            "profile": profile_to_json(shapes),
            "workspace_mb": bc.workspace_mb,
            SPEC_KEY: spec.to_manifest(),
            "onnx": {"ref": onnx_art.ref, "fingerprint": onnx_art.fingerprint, "sha256": sha256_file(src)},
            "timing_cache": {"key": key, "used": cache_in.ref if cache_in else None, "saved": cache_out.ref},
        }


def export_and_build(ctx: Context) -> tuple[Artifact, Artifact]:
    """`gendd export --trt`: refuse up front without TensorRT / a GPU, then export and build."""
    require_tensorrt("gendd export --trt")

    onnx_art = ExportStage().run(ctx)
    return onnx_art, BuildStage().run(ctx)
