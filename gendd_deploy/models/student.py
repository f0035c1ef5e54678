"""The GenDD student: backbone + LayerNorm condition + diffusion head + frozen teacher classifier.

Training (gendd-method.md, "Training"):
  z = LayerNorm(f_s)                                  (B, D_s), gradients reach the backbone
  target = (1 - lam) f_t + lam c, c = W_t[y] or y_soft @ W_t    (B, D_t), no gradient
  feature mixup with one m ~ Beta(beta, beta) per batch
  loss = head.loss(target, z, K, cfg_drop) + CE(probe(f_s.detach()), y)
Inference: sample teacher-like features from z, average draws, apply the frozen teacher fc.
The kd / ce students are the bare backbone with its own classifier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gendd_deploy.models import backbone as bb
from gendd_deploy.models.diffusion import DiffusionHead
from gendd_deploy.models.schedule import SamplingSchedule


@torch.no_grad()
def contract(f_t: torch.Tensor, y: torch.Tensor, w_t: torch.Tensor, lam: float) -> torch.Tensor:
    """Distribution contraction: pull the teacher feature towards its class centre.

    f_t (B, D_t); y (B,) class ids or (B, C) soft labels; w_t (C, D_t) teacher fc weight.
    """
    if lam == 0.0:
        return f_t
    centre = w_t[y] if y.ndim == 1 else y.to(w_t.dtype) @ w_t  # (B, D_t)
    return (1.0 - lam) * f_t + lam * centre


def feature_mixup(z: torch.Tensor, target: torch.Tensor, beta: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One m ~ Beta(beta, beta) and one permutation per batch, applied to condition and target alike."""
    if beta <= 0:
        return z, target
    m = _beta(beta, generator)
    perm = torch.randperm(z.shape[0], generator=generator).to(z.device)
    return m * z + (1 - m) * z[perm], m * target + (1 - m) * target[perm]


def _beta(beta: float, generator: torch.Generator) -> float:
    # Beta(a, a) from two Gamma draws: torch's Beta sampler takes no generator.
    a = torch._standard_gamma(torch.full((2,), float(beta)), generator=generator)
    return float(a[0] / a.sum())


@dataclass(frozen=True, kw_only=True)
class HeadSpec:
    """The diffusion head's shape: the student manifest's `info.head` section, named as the recipe's
    [distill] fields. Written by distill, read back by the loader, so a reload builds the same head."""

    head_width: int
    head_depth: int
    token_dim: int
    train_timesteps: int
    teacher_dim: int

    @classmethod
    def from_recipe(cls, dc, teacher_dim: int) -> "HeadSpec":
        return cls(head_width=dc.head_width, head_depth=dc.head_depth, token_dim=dc.token_dim, train_timesteps=dc.train_timesteps, teacher_dim=teacher_dim)

    @classmethod
    def from_manifest(cls, d: dict) -> "HeadSpec":
        # manifests written before the names followed the recipe say width / depth
        return cls(
            head_width=d.get("head_width", d.get("width")), head_depth=d.get("head_depth", d.get("depth")),
            token_dim=d["token_dim"], train_timesteps=d["train_timesteps"], teacher_dim=d["teacher_dim"],
        )

    def to_manifest(self, head: nn.Module) -> dict:
        """The section as stored, with what the built head adds (token count, parameter count)."""
        return {**asdict(self), "num_tokens": self.teacher_dim // self.token_dim, "params": sum(p.numel() for p in head.parameters())}


class GenDDStudent(nn.Module):
    def __init__(self, backbone: nn.Module, teacher_fc: nn.Linear, spec: HeadSpec):
        super().__init__()
        if teacher_fc.in_features != spec.teacher_dim:
            raise ValueError(f"the teacher classifier takes {teacher_fc.in_features} features, the head spec says {spec.teacher_dim}")
        self.spec = spec
        self.backbone = backbone  # its own classifier is the linear probe
        d_s, d_t = bb.feature_dim(backbone), teacher_fc.in_features
        self.norm = nn.LayerNorm(d_s)
        self.head = DiffusionHead(feature_dim=d_t, cond_dim=d_s, token_dim=spec.token_dim, width=spec.head_width, depth=spec.head_depth, train_timesteps=spec.train_timesteps)
        self.teacher_fc = nn.Linear(d_t, teacher_fc.out_features)
        self.teacher_fc.load_state_dict(teacher_fc.state_dict())
        self.teacher_fc.requires_grad_(False)
        # per-feature range of the training targets; x0 estimates are clipped to it while sampling
        self.register_buffer("clip_lo", torch.full((d_t,), -1e4))
        self.register_buffer("clip_hi", torch.full((d_t,), 1e4))

    @property
    def feature_dim_teacher(self) -> int:
        return self.teacher_fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return bb.pooled_features(self.backbone, x)  # (B, D_s)

    def condition(self, f_s: torch.Tensor) -> torch.Tensor:
        return self.norm(f_s)  # (B, D_s)

    def probe_logits(self, f_s: torch.Tensor) -> torch.Tensor:
        return bb.classifier(self.backbone)(f_s)

    def forward(self, *args, **kwargs):
        """Training forward = the GenDD loss (DistributedDataParallel hooks its gradients here)."""
        return self.gendd_loss(*args, **kwargs)

    def gendd_loss(self, x, f_t, y, *, lam, beta, mul, cfg_drop, probe_ce, generator) -> tuple[torch.Tensor, dict]:
        f_s = self.features(x)
        z = self.condition(f_s)
        target = contract(f_t.float(), y, self.teacher_fc.weight, lam) if y is not None else f_t.float()
        z, target = feature_mixup(z, target, beta, generator)
        loss = self.head.loss(target, z.float(), mul=mul, cfg_drop=cfg_drop)
        parts = {"diff": loss.detach()}
        if probe_ce and y is not None:
            ce = F.cross_entropy(self.probe_logits(f_s.detach()), y)
            loss = loss + ce
            parts["probe_ce"] = ce.detach()
        return loss, parts

    def sample_features(self, f_s: torch.Tensor, schedule: SamplingSchedule, sampler: str, *, draws: int, guidance: float, temperature: float, noise=None, clip: bool = True) -> torch.Tensor:
        """Teacher-like features (B, D_t) sampled by the head, conditioned on student features f_s."""
        z = self.condition(f_s).float()
        return self.head.sample(z, schedule, sampler=sampler, draws=draws, guidance=guidance, temperature=temperature, noise=noise, clip=(self.clip_lo, self.clip_hi) if clip else None)

    def sample_logits(self, x: torch.Tensor, schedule: SamplingSchedule, sampler: str, *, draws: int, guidance: float, temperature: float, noise=None, clip: bool = True) -> torch.Tensor:
        f_s = self.features(x)
        return self.teacher_fc(self.sample_features(f_s, schedule, sampler, draws=draws, guidance=guidance, temperature=temperature, noise=noise, clip=clip))


DDIM0_STEPS, DDIM0_T_START = 8, 900


def deterministic_schedule(student: GenDDStudent) -> SamplingSchedule:
    """DDIM-8 from t = 900: with temperature 0 (x_T = 0) the cheap deterministic sampler that
    distill reports as ddim0 and that the sampler-distilled read-out is fitted to."""
    return SamplingSchedule(student.head.train_schedule, DDIM0_STEPS, t_start=DDIM0_T_START)


def stage1_projector(d_s: int, d_t: int) -> nn.Linear:
    """Stage-1 warm-up maps f_s into the teacher's feature space; logits = teacher_fc(proj(f_s)).

    The method keeps both classifiers frozen (the teacher's fc and the student's own probe), so
    only the backbone and this projection learn in stage 1.
    """
    return nn.Linear(d_s, d_t)
