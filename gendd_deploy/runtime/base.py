"""The runner interface: one small class per inference runtime, used by calibrate, bench and serve.

A runner takes float32 NCHW images as numpy and returns float32 logits. Models whose sampler
needs noise take it as a second input; the runner makes it from a seed (`make_noise`, NumPy only, so
serving needs no torch), so every runtime can be compared on the same noise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


def make_noise(shape: tuple, seed: int) -> np.ndarray:
    """Standard normal float32 noise from NumPy's Philox generator keyed by `seed`: the same numbers
    for every runtime, every process and every machine (calibrate, bench and serve all draw here)."""
    return np.random.Generator(np.random.Philox(key=int(seed) & (2**64 - 1))).standard_normal(shape, dtype=np.float32)


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
