"""AOTInductor runner: a `.pt2` package from `torch._inductor.aoti_compile_and_package`, loaded
and run without the model's Python code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gendd_deploy.runtime.base import Runner


class AotiRunner(Runner):
    name = "aoti"

    def __init__(self, path: str | Path, noise_shape_tail: tuple | None = None, device: str = "cpu"):
        super().__init__(noise_shape_tail)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no AOTInductor package at {self.path}")
        self.device = torch.device(device)
        self.model = torch._inductor.aoti_load_package(str(self.path))

    @torch.no_grad()
    def run(self, images: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        args = [torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)]
        if self.needs_noise:
            if noise is None:
                raise ValueError(f"{self.path.name} needs a noise input of shape (B, {', '.join(map(str, self.noise_shape_tail))})")
            args.append(torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32)).to(self.device))
        out = self.model(*args)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.float().cpu().numpy()

    def providers(self) -> list[str]:
        return [str(self.device).upper() if self.device.type == "cpu" else str(self.device)]
