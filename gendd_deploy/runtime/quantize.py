"""INT8 post-training static quantization of an exported graph, its accuracy gate, and the choice
of precision (`[export] precision = "fp32" | "int8" | "auto"`).

The quantizer is ONNX Runtime's own (`onnxruntime.quantization.quantize_static`): it installs with
onnxruntime, runs on any CPU, and writes the QDQ format (QuantizeLinear / DequantizeLinear pairs
around float ops) that both ONNX Runtime and TensorRT read, TensorRT as explicit quantization. The
graph keeps its float32 inputs and outputs, so serving, Triton and the bench take it unchanged.

    weights      int8, symmetric, per output channel
    activations  ranges calibrated on calibration-split images by MinMax, Entropy or Percentile;
                 for ONNX Runtime uint8 with a zero point ("u8s8"), for TensorRT int8 symmetric
                 ("s8s8": TensorRT takes only zero-point-0 activations)

The two graphs differ because the runtimes do: ONNX Runtime's CPU kernels fuse a u8s8 QDQ pattern
into QLinearConv but leave most s8s8 convolutions as dequantize -> float conv -> quantize. On the
Fashion-MNIST student (2 CPUs, batch 32) the s8s8 graph ran 3.0x slower than float32 and the
u8s8 graph level with it (docs/results.md).

The gate compares the int8 graph with the float32 graph on other calibration-split images (never
test images): top-1 of both against the labels with a paired bootstrap interval of the
difference, logit error and top-1 agreement. Every calibration method is tried; the one with the
smallest top-1 loss is kept, and refused when that loss is over `[export] max_top1_drop` points.
`auto` then times both graphs on this machine and keeps int8 only when it is faster.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gendd_deploy.errors import GateError, MissingDependency
from gendd_deploy.runtime.base import Runner
from gendd_deploy.runtime.parity import compare, figures, logits_pair
from gendd_deploy.runtime.timing import summary as timing_summary
from gendd_deploy.runtime.timing import time_in_turn

METHODS = ("minmax", "entropy", "percentile")
AUTO_MIN_SPEEDUP = 1.05  # auto keeps int8 only when its p50 is at least this much lower than fp32's


def _quantization():
    try:
        from onnxruntime import quantization
    except ImportError as e:
        raise MissingDependency(f"INT8 export needs onnxruntime's quantization tools ({e}); pip install onnxruntime") from None
    return quantization


def quantize_int8(
    src: Path, dst: Path, images: np.ndarray, *, input_names: list[str], noise: Callable[[int, int], np.ndarray | None], method: str,
    target: str = "onnxruntime", batch: int = 32,
) -> dict:
    """Write the QDQ int8 graph of `src` to `dst`, activation ranges calibrated on `images`
    (float32, N x C x H x W, preprocessed as at evaluation) with `method`, in the activation type
    `target` ("onnxruntime": u8s8, "tensorrt": s8s8) runs fast. `noise(n, i)` gives the noise input
    of calibration batch i (None for graphs without one). Returns what was done."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose from {', '.join(METHODS)}")
    if target not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"int8 target {target!r}: onnxruntime or tensorrt")
    symmetric = target == "tensorrt"
    q = _quantization()
    batch = max(1, min(batch, len(images)))
    images = images[: len(images) // batch * batch]  # equal batches: the histogram calibrators stack them
    feeds = []
    for i, start in enumerate(range(0, len(images), batch)):
        x = np.ascontiguousarray(images[start : start + batch], dtype=np.float32)
        z = noise(len(x), i)
        feeds.append({input_names[0]: x, **({input_names[1]: np.ascontiguousarray(z, dtype=np.float32)} if z is not None else {})})

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self._next = iter(feeds)

        def get_next(self):
            return next(self._next, None)

    prepared = dst.with_name(dst.stem + ".prepared.onnx")
    try:
        q.shape_inference.quant_pre_process(str(src), str(prepared))  # shapes + fusions the quantizer expects
        source = prepared
    except Exception:  # noqa: BLE001 - the quantizer also works on the graph as exported
        source = src
    methods = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy, "percentile": q.CalibrationMethod.Percentile}
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress
            q.quantize_static(
                str(source), str(dst), Reader(),
                quant_format=q.QuantFormat.QDQ, per_channel=True,
                activation_type=q.QuantType.QInt8 if symmetric else q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                calibrate_method=methods[method],
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
            )
    finally:
        prepared.unlink(missing_ok=True)
    return {
        "format": "QDQ", "tool": "onnxruntime.quantization.quantize_static",
        "weights": "int8 symmetric, per channel", "activations": "int8 symmetric" if symmetric else "uint8 with zero point",
        "target": target, "method": method, "calibration_images": int(len(images)),
    }


@dataclass
class GateResult:
    """The int8 graph against the float32 graph on the gate images."""

    method: str
    fp32_top1: float  # percent, against the labels
    int8_top1: float
    interval: tuple[float, float]  # paired bootstrap 95% interval of int8 - fp32 top-1, points
    parity: dict  # compare(): logit error and top-1 agreement, int8 vs fp32

    @property
    def drop(self) -> float:
        return self.fp32_top1 - self.int8_top1

    def to_dict(self) -> dict:
        return {
            "method": self.method, "fp32_top1": round(self.fp32_top1, 3), "int8_top1": round(self.int8_top1, 3),
            "top1_drop": round(self.drop, 3), "drop_interval": [round(-self.interval[1], 3), round(-self.interval[0], 3)],
            **{k: v for k, v in figures(self.parity).items() if k != "finite"},
        }


def paired_interval(a_correct: np.ndarray, b_correct: np.ndarray, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of (a's top-1 - b's top-1) in points, resampling the images once for both."""
    rng = np.random.default_rng(seed)
    diff = a_correct.astype(np.float64) - b_correct.astype(np.float64)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[idx].mean(axis=1) * 100.0
    lo, hi = np.quantile(means, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return float(lo), float(hi)


def gate_int8(fp32: Runner, int8: Runner, images: np.ndarray, labels: np.ndarray, *, method: str, batch: int, seed: int) -> GateResult:
    ref, got = logits_pair(fp32, int8, images, batch, seed)
    ok_ref, ok_got = ref.argmax(1) == labels, got.argmax(1) == labels
    return GateResult(method, 100.0 * ok_ref.mean(), 100.0 * ok_got.mean(), paired_interval(ok_got, ok_ref, seed=seed), compare(ref, got))


def refuse(results: list[GateResult], max_drop: float, images: int) -> None:
    """GateError naming every method's figures when even the best loses more than max_drop points."""
    best = min(results, key=lambda r: r.drop)
    if best.drop <= max_drop:
        return
    lines = "; ".join(f"{r.method}: {r.int8_top1:.2f}% vs fp32 {r.fp32_top1:.2f}% (-{r.drop:.2f} points, agreement {r.parity['top1_agreement']:.4f})" for r in results)
    raise GateError(
        f"int8 loses more than [export] max_top1_drop = {max_drop:g} top-1 points on {images} held-out calibration images with every "
        f"calibration method ({lines}); export --precision fp32, or raise max_top1_drop if that loss is acceptable"
    )


def timed(runners: dict[str, Runner], images: np.ndarray, batches: list[int], *, reps: int = 30, budget_s: float = 2.0, seed: int = 0) -> dict[int, dict[str, dict]]:
    """p50 / p99 ... of every runner at every batch, timed in turn on this machine."""
    out = {}
    for b in batches:
        x = np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])), dtype=np.float32)
        calls = {name: (lambda r=r, z=r.noise(b, seed): r.run(x, z)) for name, r in runners.items()}
        out[b] = {name: timing_summary(ts) for name, ts in time_in_turn(calls, max_runs=reps, min_runs=3, min_s=budget_s, warmup=2).items()}
    return out


def auto_choice(timing: dict[int, dict[str, dict]], batch: int) -> tuple[str, str]:
    """('int8' | 'fp32', why) from the timing at `batch`: int8 when its p50 is AUTO_MIN_SPEEDUP x lower."""
    t = timing[batch]
    f, i = t["fp32"]["p50_ms"], t["int8"]["p50_ms"]
    if i * AUTO_MIN_SPEEDUP <= f:
        return "int8", f"int8 passed the accuracy gate and runs in {i:.3g} ms against fp32's {f:.3g} ms at batch {batch} here ({f / i:.2f}x faster)"
    return "fp32", (
        f"int8 passed the accuracy gate but runs in {i:.3g} ms against fp32's {f:.3g} ms at batch {batch} here "
        f"({f / i:.2f}x; auto needs {AUTO_MIN_SPEEDUP:g}x): on this model the quantize / dequantize overhead eats the integer speed-up"
    )
