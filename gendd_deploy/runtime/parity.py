"""Parity of a candidate's logits with a reference's, and the gate that enforces it: the one
module every gate uses (export: ONNX / AOTI vs PyTorch; build: reduced-precision ONNX and the
TensorRT engine vs ONNX Runtime fp32; the runtime benchmark).

The tolerance is scaled to the logits, as numpy.allclose and Polygraphy scale theirs: a logit of
image i may differ by `atol + rtol * scale_i`, where scale_i is the largest |logit| of image i in
the reference. Two float32 programs that only order their sums differently disagree in
proportion to the values summed: a MobileNetV3 student with logits up to 136 differed from
PyTorch by up to 7.7e-4 on ONNX Runtime, while PyTorch float32 itself was 6.0e-4 away from
PyTorch float64 (and ONNX Runtime 5.5e-4): rounding, about 1e-5 of the logit scale, which a fixed
atol of 1e-4 wrongly refused. An op exported differently (a wrong epsilon, an approximated
activation) moves logits by a larger share of their scale and is still refused, as is any change
of top-1 beyond `min_agreement`."""

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
    row_diff = np.nan_to_num(diff, nan=np.inf).max(1) if diff.size else np.zeros(n)
    row_scale = np.abs(ref).max(1) if diff.size else np.zeros(n)
    rel = np.divide(row_diff, row_scale, out=np.where(row_diff > 0, np.inf, 0.0), where=row_scale > 0)
    return {
        "max_abs_diff": (float(diff.max()) if diff.size else 0.0) if finite else float("inf"),
        "mean_abs_diff": float(np.nan_to_num(diff, nan=0.0, posinf=0.0).mean()) if diff.size else 0.0,
        "max_rel_diff": float(rel.max()) if n and finite else (0.0 if finite else float("inf")),  # |diff| / the image's logit scale
        "logit_scale": float(row_scale.max()) if n and np.isfinite(row_scale).all() else 0.0,
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()) if n else 1.0,
        "n": n,
        "finite": finite,
        "_rows": (row_diff, row_scale),  # per image, for gate(); not recorded
    }


def parity(reference: Runner, candidate: Runner, images: np.ndarray, batch: int, seed: int) -> dict:
    """Run both on `images` (N, C, H, W) float32 in batches; batch i gets noise reference.noise(b, seed + i).

    Returns compare()'s figures over all images, plus the two runners' names."""
    ref, got = logits_pair(reference, candidate, images, batch, seed)
    return {**compare(ref, got), "reference": reference.name, "candidate": candidate.name}


def logits_pair(reference: Runner, candidate: Runner, images: np.ndarray, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Both runners' logits on `images`, batch by batch with the same noise (see parity())."""
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
    return np.concatenate(refs), np.concatenate(gots)


def figures(result: dict) -> dict:
    """The result without its per-image arrays: what can be written as JSON."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def within(result: dict, atol: float, rtol: float = 0.0) -> bool:
    """Every logit of every image within atol + rtol * that image's logit scale (NaN / inf never are)."""
    if not result.get("finite", True):
        return False
    rows = result.get("_rows")
    if rows is None:  # a result without per-image rows (read back from JSON): the whole-run bound
        return bool(result["max_abs_diff"] <= atol + rtol * result.get("logit_scale", 0.0))
    row_diff, row_scale = rows
    return bool(np.all(row_diff <= atol + rtol * row_scale))


def record(result: dict, *, reference: str, atol: float | None, min_agreement: float | None, rtol: float | None = 0.0) -> dict:
    """The one parity record every manifest and bench row carries, nested under "parity": the
    figures of compare() / parity(), what they were compared against, and the bounds of the gate."""
    return {
        "reference": reference,
        "max_abs_diff": result["max_abs_diff"],
        "mean_abs_diff": result["mean_abs_diff"],
        "max_rel_diff": result.get("max_rel_diff"),
        "logit_scale": result.get("logit_scale"),
        "top1_agreement": result["top1_agreement"],
        "n": result["n"],
        "atol": atol,
        "rtol": rtol,
        "min_agreement": min_agreement,
    }


def gate(result: dict, atol: float, min_agreement: float, what: str, *, rtol: float = 0.0, images: str = "images", hint: str = "") -> None:
    """Raise GateError (with the measured numbers) unless every logit is within atol + rtol x its
    image's logit scale (within()) and top1_agreement >= min_agreement. `images` names what was
    compared on, `hint` is appended to the message."""
    failures = []
    if not result.get("finite", True):
        failures.append("non-finite logits (overflow in reduced precision?)")
    elif not within(result, atol, rtol):
        bound = f"atol {atol:g}" + (f" + rtol {rtol:g} x logit scale (up to {result.get('logit_scale', 0.0):.3g})" if rtol else "")
        rel = f" ({result['max_rel_diff']:.2g} of its image's logit scale at most)" if result.get("max_rel_diff") is not None else ""
        failures.append(f"max abs logit diff {result['max_abs_diff']:.3g}{rel} is over {bound}")
    if not result["top1_agreement"] >= min_agreement:
        failures.append(f"top-1 agreement {result['top1_agreement']:.4f} < {min_agreement:g}")
    if failures:
        raise GateError(
            f"{what}: parity gate failed on {result['n']} {images}: " + "; ".join(failures)
            + f" (mean abs diff {result['mean_abs_diff']:.3g})" + (f"; {hint}" if hint else "")
        )
