"""PyTorch eager runner: the reference every exported runtime is checked against."""

from __future__ import annotations

import numpy as np
import torch

from gendd_deploy.models.deployed import DeployedModel
from gendd_deploy.runtime.base import Runner


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, model: DeployedModel, device: str | torch.device = "cpu"):
        super().__init__(model.noise_tail)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def run(self, images: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        nz = torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32)).to(self.device) if self.needs_noise else None
        if self.needs_noise and nz is None:
            raise ValueError(f"this model needs a noise input of shape (B, {', '.join(map(str, self.noise_shape_tail))})")
        return self.model(x, nz).float().cpu().numpy()

    def providers(self) -> list[str]:
        return [self.device.type.upper()]
