"""The runner interface: one small class per inference runtime, used by calibrate, bench and serve.

A runner takes float32 NCHW images as numpy and returns float32 logits. Models whose sampler
needs noise take it as a second input; the runner makes it from a seed, exactly as PyTorch's
generator would, so every runtime can be compared on the same noise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


def make_noise(shape: tuple, seed: int) -> np.ndarray:
    """Standard normal noise from torch's CPU generator: the same numbers for every runtime."""
    import torch  # on use: the registry and a serving path without noise need no torch

    from gendd_deploy import seeds

    return torch.randn(shape, generator=seeds.generator(seed)).numpy()


class Runner(ABC):
    name: str = ""

    def __init__(self, noise_shape_tail: tuple | None = None):
        # shape of one image's noise (steps+1, draws, n, d), or None for noise-free models
        self.noise_shape_tail = tuple(noise_shape_tail) if noise_shape_tail else None

    @property
    def needs_noise(self) -> bool:
        return self.noise_shape_tail is not None

    def noise(self, batch: int, seed: int) -> np.ndarray | None:
        return make_noise((batch,) + self.noise_shape_tail, seed) if self.needs_noise else None

    @abstractmethod
    def run(self, images: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """images float32 (B, C, H, W) [, noise float32 (B, *noise_shape_tail)] -> logits float32 (B, K)."""

    def providers(self) -> list[str]:
        """The execution providers / devices this session actually uses."""
        return ["CPU"]

    def describe(self) -> dict:
        return {"runtime": self.name, "providers": self.providers(), "needs_noise": self.needs_noise}
