"""Deterministic splits, as index tensors into a source's official train (or full) set.

- Calibration is held out of the official train split only; the test split is never touched.
- Everything is drawn from a `torch.Generator` with an explicit seed, so the same config gives
  byte-identical splits. `index_digest` hashes the indices into the data fingerprint, so a change
  in torch's permutation algorithm would show up as a new fingerprint rather than a silent
  mismatch with cached artifacts.
"""

from __future__ import annotations

import hashlib

import torch

from gendd_deploy import seeds
from gendd_deploy.errors import UsageError


def holdout_calib(n: int, calib_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split range(n) into (train, calib) index tensors (int64).

    calib = the first max(1, round(fraction * n)) entries of randperm(n) seeded with `seed`, in
    permutation order, so any prefix of calib is itself a random sample (a calibration limit keeps
    its class mix). train = the rest, in sorted original order.
    """
    if n < 2:
        raise UsageError(f"need at least 2 training images to hold out a calibration split, got {n}")
    k = max(1, round(calib_fraction * n))
    gen = seeds.generator(seed)
    perm = torch.randperm(n, generator=gen)
    calib = perm[:k].clone()
    train = torch.sort(perm[k:]).values
    return train, calib


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, hold out round(fraction * count) images: returns (kept, held), both sorted int64.

    Classes are visited in sorted order and draw from one generator, so the result depends only
    on the labels, the fraction and the seed.
    """
    gen = seeds.generator(seed)
    held = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()  # (count_c,), sorted
        take = round(fraction * len(members))
        held.append(members[torch.randperm(len(members), generator=gen)[:take]])
    held_idx = torch.sort(torch.cat(held)).values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_idx] = False
    return torch.nonzero(keep).flatten(), held_idx


def take_first(idx: torch.Tensor, limit: int | None) -> torch.Tensor:
    """The first `limit` indices (all of them when limit is None or larger)."""
    return idx if limit is None else idx[:limit]


def index_digest(*parts: torch.Tensor) -> str:
    """sha256 over int64 index tensors, with their lengths so ([1, 2], [3]) != ([1], [2, 3])."""
    h = hashlib.sha256()
    for p in parts:
        p = p.to(torch.int64).contiguous()
        h.update(len(p).to_bytes(8, "little"))
        h.update(p.numpy().tobytes())
    return h.hexdigest()


def long_tail(labels: torch.Tensor, imbalance_factor: float, seed: int) -> torch.Tensor:
    """Indices (sorted int64) of an exponentially long-tailed subset, as CIFAR-LT builds it.

    Class c (in sorted label order, c = 0..C-1) keeps floor(n_max * factor ** (-c / (C - 1)))
    images, n_max being the largest class count: the head class keeps all of its images, the last
    keeps 1/factor of them. Which images a class keeps is a seeded random draw.
    """
    classes = torch.unique(labels).tolist()
    n_max = max(int((labels == c).sum()) for c in classes)
    gen = seeds.generator(seed)
    kept = []
    for rank, c in enumerate(classes):
        members = torch.nonzero(labels == c).flatten()
        share = imbalance_factor ** (-rank / max(len(classes) - 1, 1))
        take = max(1, min(len(members), int(n_max * share)))
        kept.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.sort(torch.cat(kept)).values
