"""The model that ships: images (+ noise) -> logits, with the sampler settings baked in.

`DeployedModel` wraps a GenDD student with one `SamplerSetting` (or the linear probe), a kd / ce
student with its own head or a fitted read-out, or a teacher, and is what export, calibrate, bench
and serve all run. Its forward is
export-friendly: the sampler is unrolled over python-int steps, and noise is either an input
(noise = "fresh"), a seeded tensor frozen into the model ("fixed"), or zero ("zero"). A setting
whose output does not depend on the noise (the probe, DDIM at temperature 0) takes no noise input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from gendd_deploy import seeds
from gendd_deploy.models import backbone as bb
from gendd_deploy.models.schedule import SamplingSchedule
from gendd_deploy.models.student import GenDDStudent


@dataclass(frozen=True)
class SamplerSetting:
    # sampler: the diffusion head; probe: the in-training linear probe (a kd / ce student's own
    # head); readout: a Linear fitted on the frozen backbone after training (models/readout.py),
    # named by `readout`
    kind: Literal["sampler", "probe", "readout"] = "sampler"
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps: int = 64
    draws: int = 5
    guidance: float = 2.0
    temperature: float = 1.0
    noise: Literal["fresh", "fixed", "zero"] = "fresh"
    t_start: int | None = None  # None = the last training timestep (the published sampler)
    min_alpha_bar: float = 0.0
    clip: bool = True  # clip the x0 estimate to the training targets' range (not in the authors' sampler)
    readout: str | None = None  # kind = "readout": the fitted read-out's name (fit_ce, fit_ridge, fit_sampler)

    @classmethod
    def published(cls) -> "SamplerSetting":
        """The authors' evaluation: DDPM, 64 respaced steps, 5 draws, guidance 2.0, temperature 1.0, no clipping."""
        return cls(clip=False)

    @classmethod
    def probe(cls) -> "SamplerSetting":
        return cls(kind="probe", steps=0, draws=0, guidance=1.0, temperature=0.0, noise="zero")

    @classmethod
    def fitted(cls, name: str) -> "SamplerSetting":
        return cls(kind="readout", steps=0, draws=0, guidance=1.0, temperature=0.0, noise="zero", readout=name)

    @property
    def linear(self) -> bool:
        """One Linear on the pooled feature: the plain student's graph and cost."""
        return self.kind in ("probe", "readout")

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerSetting":
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def deterministic(self) -> bool:
        """Output independent of noise: the probe, DDIM at temperature 0, or zero/fixed noise."""
        return self.linear or self.noise != "fresh" or (self.sampler == "ddim" and self.temperature == 0.0)

    def head_passes(self) -> int:
        """Head forward passes per token per image: steps x draws x (2 with guidance)."""
        if self.linear:
            return 0
        return self.steps * self.draws * (2 if self.guidance != 1.0 else 1)

    def label(self) -> str:
        if self.kind == "probe":
            return "probe"
        if self.kind == "readout":
            return f"linear {self.readout}"
        t0 = "" if self.t_start is None else f" t{self.t_start}"
        extra = "" if self.clip else " noclip"
        return f"{self.sampler}-{self.steps} x{self.draws} cfg{self.guidance:g} T{self.temperature:g} {self.noise}{t0}{extra}"


class DeployedModel(nn.Module):
    """images (B, C, H, W) [, noise (B, steps+1, draws, n, d)] -> logits (B, num_classes)."""

    def __init__(self, model: nn.Module, setting: SamplerSetting | None = None, fixed_noise_seed: int = 0):
        super().__init__()
        self.model = model
        self.setting = setting
        self.is_gendd = isinstance(model, GenDDStudent)
        if self.is_gendd and setting is None:
            raise ValueError("a GenDD student needs a SamplerSetting (or SamplerSetting.probe())")
        if not self.is_gendd and setting is not None and setting.kind == "sampler":
            raise ValueError(f"a kd / ce student has no sampler; deploy its own head (probe) or a fitted read-out, not '{setting.label()}'")
        if setting is not None and setting.kind == "readout" and setting.readout not in getattr(model, "readouts", {}):
            have = ", ".join(getattr(model, "readouts", {})) or "none"
            raise ValueError(f"the student has no fitted read-out '{setting.readout}' (it has: {have}); re-run distill")
        self.schedule = None
        if self.is_gendd and setting.kind == "sampler":
            self.schedule = SamplingSchedule(model.head.train_schedule, setting.steps, t_start=setting.t_start, min_alpha_bar=setting.min_alpha_bar)
            if setting.noise == "fixed":
                g = seeds.generator(fixed_noise_seed)
                self.register_buffer("fixed_noise", torch.randn(self.noise_shape(1), generator=g))

    def linear_head(self) -> nn.Linear:
        """The Linear a linear setting applies to the pooled feature (B, D_s): the student's own
        head (the probe) or a fitted read-out."""
        s = self.setting
        if s is not None and s.kind == "readout":
            return self.model.readouts[s.readout]
        if s is None or s.kind == "probe":
            return bb.classifier(self.model.backbone if self.is_gendd else self.model)
        raise ValueError(f"'{s.label()}' is a sampler, not a linear read-out")

    @property
    def needs_noise(self) -> bool:
        return self.is_gendd and self.setting.kind == "sampler" and not self.setting.deterministic

    def noise_shape(self, batch: int) -> tuple:
        h, s = self.model.head, self.setting
        return h.noise_shape(batch, s.draws, s.steps, h.num_tokens, h.token_dim)

    @property
    def noise_tail(self) -> tuple | None:
        """The noise input's shape past the batch dimension, None when the model takes no noise."""
        return tuple(self.noise_shape(1)[1:]) if self.needs_noise else None

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        s = self.setting
        if not self.is_gendd:
            if s is not None and s.kind == "readout":
                return self.linear_head()(bb.pooled_features(self.model, images))
            return self.model(images)  # its own head
        f_s = self.model.features(images)  # (B, D_s)
        if s.linear:
            return self.linear_head()(f_s)
        z = self.model.condition(f_s)
        if s.noise == "fixed":
            noise = self.fixed_noise.expand(images.shape[0], *self.fixed_noise.shape[1:])
        elif s.noise == "zero" or (noise is None and s.deterministic):
            noise = z.new_zeros((images.shape[0],) + self.noise_shape(1)[1:])
        elif noise is None:
            raise ValueError(f"sampler '{s.label()}' needs a noise input of shape {self.noise_shape(images.shape[0])}")
        feat = self.model.head.sample(
            z, self.schedule, sampler=s.sampler, draws=s.draws, guidance=s.guidance, temperature=s.temperature,
            noise=noise, clip=(self.model.clip_lo, self.model.clip_hi) if s.clip else None,
        )  # (B, D_t)
        return self.model.teacher_fc(feat)
