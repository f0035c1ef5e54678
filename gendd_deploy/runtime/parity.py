"""Parity of two runners on the same images and the same noise, and the gate that enforces it."""

from __future__ import annotations

import numpy as np

from gendd_deploy.errors import GateError
from gendd_deploy.runtime.base import Runner


def parity(reference: Runner, candidate: Runner, images: np.ndarray, batch: int, seed: int) -> dict:
    """Run both on `images` (N, C, H, W) float32 in batches; batch i gets noise reference.noise(b, seed + i).

    Returns max_abs_diff and mean_abs_diff over all logits, top1_agreement (fraction of images whose
    argmax matches) and n.
    """
    if len(images) == 0:
        raise ValueError("parity needs at least one image")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    max_diff, abs_sum, count, agree = 0.0, 0.0, 0, 0
    for i, start in enumerate(range(0, len(images), batch)):
        x = np.ascontiguousarray(images[start : start + batch], dtype=np.float32)
        noise = reference.noise(len(x), seed + i)
        ref = np.asarray(reference.run(x, noise), dtype=np.float64)
        got = np.asarray(candidate.run(x, noise), dtype=np.float64)
        if ref.shape != got.shape:
            raise GateError(f"{candidate.name} returned logits of shape {got.shape}, {reference.name} {ref.shape}")
        diff = np.abs(ref - got)
        # NaN anywhere is a parity failure, not a silently ignored entry
        max_diff = max(max_diff, float("inf") if not np.isfinite(diff).all() else float(diff.max()))
        abs_sum += float(np.nan_to_num(diff, nan=0.0, posinf=0.0).sum())
        count += diff.size
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
    n = len(images)
    return {
        "max_abs_diff": max_diff,
        "mean_abs_diff": abs_sum / count,
        "top1_agreement": agree / n,
        "n": n,
        "reference": reference.name,
        "candidate": candidate.name,
    }


def gate(result: dict, atol: float, min_agreement: float, what: str) -> None:
    """Raise GateError (with the measured numbers) unless max_abs_diff <= atol and top1_agreement >= min_agreement."""
    failures = []
    if not result["max_abs_diff"] <= atol:  # `not <=` so NaN / inf fail too
        failures.append(f"max abs logit diff {result['max_abs_diff']:.3g} > atol {atol:g}")
    if not result["top1_agreement"] >= min_agreement:
        failures.append(f"top-1 agreement {result['top1_agreement']:.4f} < {min_agreement:g}")
    if failures:
        raise GateError(
            f"{what}: parity gate failed on {result['n']} images: " + "; ".join(failures)
            + f" (mean abs diff {result['mean_abs_diff']:.3g})"
        )
