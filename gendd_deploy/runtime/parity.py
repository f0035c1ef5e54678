"""Parity of a candidate's logits with a reference's, and the gate that enforces it: the one
module every gate uses (export: ONNX / AOTI vs PyTorch; build: reduced-precision ONNX and the
TensorRT engine vs ONNX Runtime fp32; the runtime benchmark)."""

from __future__ import annotations

import numpy as np

from gendd_deploy.errors import GateError
from gendd_deploy.runtime.base import Runner


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """max / mean abs difference and top-1 agreement of logits `got` vs `ref`, both (N, K).

    A non-finite entry anywhere makes max_abs_diff inf and `finite` False (a failure, never a
    silently ignored entry)."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise GateError(f"output shapes differ: reference {ref.shape}, candidate {got.shape}")
    diff = np.abs(ref - got)
    finite = bool(np.isfinite(diff).all())
    n = int(ref.shape[0])
    return {
        "max_abs_diff": (float(diff.max()) if diff.size else 0.0) if finite else float("inf"),
        "mean_abs_diff": float(np.nan_to_num(diff, nan=0.0, posinf=0.0).mean()) if diff.size else 0.0,
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()) if n else 1.0,
        "n": n,
        "finite": finite,
    }


def parity(reference: Runner, candidate: Runner, images: np.ndarray, batch: int, seed: int) -> dict:
    """Run both on `images` (N, C, H, W) float32 in batches; batch i gets noise reference.noise(b, seed + i).

    Returns compare()'s figures over all images, plus the two runners' names."""
    if len(images) == 0:
        raise ValueError("parity needs at least one image")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    refs, gots = [], []
    for i, start in enumerate(range(0, len(images), batch)):
        x = np.ascontiguousarray(images[start : start + batch], dtype=np.float32)
        noise = reference.noise(len(x), seed + i)
        ref, got = np.asarray(reference.run(x, noise)), np.asarray(candidate.run(x, noise))
        if ref.shape != got.shape:
            raise GateError(f"{candidate.name} returned logits of shape {got.shape}, {reference.name} {ref.shape}")
        refs.append(ref)
        gots.append(got)
    return {**compare(np.concatenate(refs), np.concatenate(gots)), "reference": reference.name, "candidate": candidate.name}


def record(result: dict, *, reference: str, atol: float, min_agreement: float) -> dict:
    """The one parity record every manifest and bench row carries, nested under "parity": the
    figures of compare() / parity(), what they were compared against, and the bounds of the gate."""
    return {
        "reference": reference,
        "max_abs_diff": result["max_abs_diff"],
        "mean_abs_diff": result["mean_abs_diff"],
        "top1_agreement": result["top1_agreement"],
        "n": result["n"],
        "atol": atol,
        "min_agreement": min_agreement,
    }


def gate(result: dict, atol: float, min_agreement: float, what: str, *, images: str = "images", hint: str = "") -> None:
    """Raise GateError (with the measured numbers) unless max_abs_diff <= atol and top1_agreement
    >= min_agreement. `images` names what was compared on, `hint` is appended to the message."""
    failures = []
    if not result.get("finite", True):
        failures.append("non-finite logits (overflow in reduced precision?)")
    elif not result["max_abs_diff"] <= atol:  # `not <=` so NaN / inf fail too
        failures.append(f"max abs logit diff {result['max_abs_diff']:.3g} > atol {atol:g}")
    if not result["top1_agreement"] >= min_agreement:
        failures.append(f"top-1 agreement {result['top1_agreement']:.4f} < {min_agreement:g}")
    if failures:
        raise GateError(
            f"{what}: parity gate failed on {result['n']} {images}: " + "; ".join(failures)
            + f" (mean abs diff {result['mean_abs_diff']:.3g})" + (f"; {hint}" if hint else "")
        )
