"""Fitted read-outs: one Linear(D_s, C) on the frozen, finished student backbone.

A GenDD student classifies by sampling teacher-like features through the diffusion head. Once the
backbone is trained, a single linear map from its pooled feature f_s to logits can carry the same
information at the plain student's cost. Two fits, both on training images only:

- `fit_ce`: the student's own classifier refit with cross-entropy on frozen features (full-batch
  L-BFGS with a small L2 penalty). Needs labels.
- `fit_ridge`: label-free. Closed-form ridge regression from f_s to the teacher feature f_t, then
  composed with the frozen teacher classifier: logits = W_t (A f_s + a) + b_t, folded into one
  Linear. Works for unlabelled students.
- `fit_sampler` (sampler distillation): the same closed-form ridge, but towards the teacher-like
  features the deterministic sampler (DDIM-8 from zero noise) draws for each training image, so
  the Linear imitates the sampler rather than the teacher. Label-free as well.

Each returns a plain `nn.Linear`, which exports as exactly a plain student's graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    return (x - mean) / std, mean, std


def _fold(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """Linear on standardised inputs -> the same Linear on raw inputs."""
    w = weight / std  # (C, D)
    b = bias - w @ mean
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin


def fit_ce(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-4, max_iter: int = 200) -> nn.Linear:
    """Multinomial logistic regression on frozen features (N, D) -> Linear(D, C), full-batch L-BFGS."""
    x, mean, std = _standardise(feats.double())
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, labels) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return _fold(w.detach(), b.detach(), mean, std).float()


def fit_ridge(feats: torch.Tensor, teacher_feats: torch.Tensor, teacher_fc: nn.Linear, ridge: float = 1e-3) -> nn.Linear:
    """Closed-form ridge f_s -> f_t, composed with the teacher classifier: Linear(D_s, C)."""
    x, mean, std = _standardise(feats.double())
    y = teacher_feats.double()
    y_mean = y.mean(0)
    n, d = x.shape
    gram = x.T @ x / n + ridge * torch.eye(d, dtype=torch.float64)
    a = torch.linalg.solve(gram, x.T @ (y - y_mean) / n).T  # (D_t, D_s), on standardised inputs
    w_t, b_t = teacher_fc.weight.detach().cpu().double(), teacher_fc.bias.detach().cpu().double()
    weight = w_t @ a  # (C, D_s)
    bias = w_t @ y_mean + b_t
    return _fold(weight, bias, mean, std).float()
