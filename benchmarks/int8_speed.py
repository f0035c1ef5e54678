"""INT8 vs float32 on ONNX Runtime (CPU) for a timm student at full resolution: p50 / p99 latency,
images/s and size on disk, timed in turn in one run.

The model has random weights and the activation ranges come from random images: latency and
size do not depend on what was learned (accuracy is gated by `gendd export --precision int8` and
measured by `gendd bench --precision int8`). Three graphs: float32; int8 u8s8 (uint8 activations
with a zero point, as the export writes for ONNX Runtime); int8 s8s8 (symmetric activations, the
form TensorRT builds), to show what the activation type costs on this CPU.

Examples:
    python benchmarks/int8_speed.py --out int8_resnet18.json
    python benchmarks/int8_speed.py --model mobilenetv3_large_100 --batch 1 8 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gendd_deploy.models.backbone import create_backbone  # noqa: E402
from gendd_deploy.models.deployed import DeployedModel  # noqa: E402
from gendd_deploy.runtime import quantize  # noqa: E402
from gendd_deploy.runtime.onnx_export import export_onnx  # noqa: E402
from gendd_deploy.runtime.ort import OrtRunner, usable_cpus  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default="resnet18", help="a timm model name")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20, help="timed runs per graph and batch at most")
    ap.add_argument("--budget-s", type=float, default=10.0, help="stop timing a graph at a batch after this many seconds")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.image_size < 32 or min(args.batch) < 1 or args.calibration_images < 1:
        ap.error("--image-size >= 32, --batch >= 1, --calibration-images >= 1")

    torch.manual_seed(0)
    net = create_backbone(args.model, args.classes, 3, False, {}).eval()
    model = DeployedModel(net).eval()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((max(args.calibration_images, max(args.batch)), 3, args.image_size, args.image_size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="gendd-int8-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        print(f"exporting {args.model} at {args.image_size}x{args.image_size} ...", file=sys.stderr, flush=True)
        export_onnx(model, fp32_path, torch.from_numpy(images[:2]), exporter="torchscript")
        graphs = {"fp32": fp32_path}
        for label, target in (("int8 u8s8", "onnxruntime"), ("int8 s8s8", "tensorrt")):
            print(f"quantizing ({label}) ...", file=sys.stderr, flush=True)
            graphs[label] = Path(tmp) / f"{target}.onnx"
            quantize.quantize_int8(fp32_path, graphs[label], images[: args.calibration_images], input_names=["images"], noise=lambda n, i: None, method="minmax", target=target, batch=16)
        runners = {label: OrtRunner(path) for label, path in graphs.items()}
        sizes = {label: path.stat().st_size / 2**20 for label, path in graphs.items()}
        print("timing ...", file=sys.stderr, flush=True)
        timing = quantize.timed(runners, images, args.batch, reps=args.reps, budget_s=args.budget_s)
    rows = []
    for b, per in timing.items():
        for label, t in per.items():
            rows.append({"graph": label, "batch": b, **t, "images_per_s": round(1000.0 * b / t["p50_ms"], 1), "model_mb": round(sizes[label], 2),
                         "p50_vs_fp32": round(t["p50_ms"] / per["fp32"]["p50_ms"], 3)})
    print(f"{'graph':>10}  {'batch':>5}  {'p50 ms':>8}  {'p99 ms':>8}  {'images/s':>9}  {'MB':>6}  {'p50 / fp32':>10}")
    for r in rows:
        print(f"{r['graph']:>10}  {r['batch']:>5}  {r['p50_ms']:>8.2f}  {r['p99_ms']:>8.2f}  {r['images_per_s']:>9.0f}  {r['model_mb']:>6.1f}  {r['p50_vs_fp32']:>10.3f}")
    result = {
        "model": args.model, "image_size": args.image_size, "classes": args.classes, "calibration": "minmax, random images",
        "threads": {"intra_op": usable_cpus(), "spinning": False},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
