"""Named random streams: every seeded generator of the pipeline is made here, one formula each.

A stream is a function of the run's seed and its position (epoch, view, batch, rank), so a
resumed run replays exactly what an uninterrupted one drew, and two streams never share numbers
by accident. The constants are large odd multipliers that keep streams of nearby seeds apart;
changing one changes every artifact trained with it, so they are fixed.
"""

from __future__ import annotations

import torch


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (the one way the package makes one)."""
    return torch.Generator().manual_seed(int(seed))


def epoch_order(seed: int, epoch: int) -> torch.Generator:
    """The shuffled order of one training epoch."""
    return generator(seed * 100_003 + epoch)


def augmentation(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Online augmentation and diffusion noise of one epoch on one process."""
    return generator(seed * 7919 + epoch * 64 + rank)


def cache_view(seed: int, view: int) -> torch.Generator:
    """Augmentation parameters of one cached teacher view."""
    return generator(seed * 1000 + view)


def view_choice(seed: int, epoch: int) -> torch.Generator:
    """Which cached view each training image uses in one epoch."""
    return generator(seed * 31337 + epoch)


def eval_noise(student_seed: int, batch_index: int) -> torch.Generator:
    """Sampler noise of one evaluation batch in distill (the same whatever the process count)."""
    return generator(student_seed + 12345 + batch_index)


def calibration_noise_base(seed: int) -> int:
    """First seed of calibrate's per-batch evaluation noise (batch b uses base + b), apart from
    the fixed-noise seed a deployed model carries."""
    return 1_000_003 * (seed + 1)


def global_draws(seed: int, rank: int) -> int:
    """Seed of torch's global generator during distillation (timesteps, diffusion noise, CFG
    dropout): different per process so ranks do not draw the same numbers."""
    return seed * 1000 + rank + 1
