"""The diffusion schedule of GenDD's head: IDDPM's cosine schedule over the training timesteps, a
respaced sampling chain, the hybrid loss's variational term, and one DDPM / DDIM sampler step.

Faithful to openai/improved-diffusion as LTH14/mar and jiequancui/Generative-Distribution-
Distillation use it. Opt-in deviations (defaults reproduce the authors' sampler): the chain may
start below T-1 (t_start) and floor alpha_bar in the x0 estimate (min_alpha_bar).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

SAMPLERS = ("ddpm", "ddim")


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    # IDDPM's decoder for data scaled to [-1, 1] in 256 bins (kept as is, as MAR does)
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM get_named_beta_schedule("cosine"): betas discretising alpha_bar, clipped at 0.999."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ],
        dtype=np.float64,
    )


def _gaussian_coefs(betas: np.ndarray) -> dict[str, np.ndarray]:
    """IDDPM GaussianDiffusion.__init__ in float64, indexed by chain position (ascending t)."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    if len(betas) > 1:
        # the posterior variance is 0 at the first position: IDDPM reuses position 1's value
        post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    else:
        # IDDPM has no value here; only used by a ddpm step that adds no noise anyway
        post_logvar = np.log(betas)
    return {
        "betas": betas,
        "log_betas": np.log(betas),
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": np.sqrt(ab),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ab),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ab),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ab - 1.0),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_logvar,
        "posterior_mean_coef1": betas * np.sqrt(ab_prev) / (1.0 - ab),
        "posterior_mean_coef2": (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
    }


class TrainSchedule(nn.Module):
    """IDDPM cosine schedule over all training timesteps. Float64 numpy in `.np`; the same
    arrays as float32 non-persistent buffers (they follow .to(device), stay out of state_dict)."""

    def __init__(self, num_timesteps: int = 1000):
        super().__init__()
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        # MAR trains with create_diffusion(""), a SpacedDiffusion over every timestep: betas
        # recomputed from alphas_cumprod (differs from the raw cosine betas only by rounding)
        ab = np.cumprod(1.0 - _cosine_betas(num_timesteps))
        self.np = _gaussian_coefs(1.0 - ab / np.append(1.0, ab[:-1]))
        for name, arr in self.np.items():
            self.register_buffer(name, torch.from_numpy(arr).float(), persistent=False)

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # (N,) coefficients gathered at t, shaped to broadcast over like's trailing dims
        return getattr(self, name)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self._at("sqrt_alphas_cumprod", t, x0) * x0
            + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def vlb_bits(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, var_values: torch.Tensor) -> torch.Tensor:
        """IDDPM's variational bound per row, in bits, with the mean frozen (eps detached): only
        var_values get its gradient. The decoder NLL at t = 0, the posterior KL elsewhere."""
        at = lambda name: self._at(name, t, x0)  # noqa: E731
        pred_x0 = at("sqrt_recip_alphas_cumprod") * x_t - at("sqrt_recipm1_alphas_cumprod") * eps.detach()
        model_mean = at("posterior_mean_coef1") * pred_x0 + at("posterior_mean_coef2") * x_t
        min_log = at("posterior_log_variance_clipped")
        frac = (var_values + 1) / 2
        model_log_var = frac * at("log_betas") + (1 - frac) * min_log
        true_mean = at("posterior_mean_coef1") * x0 + at("posterior_mean_coef2") * x_t
        kl = _normal_kl(true_mean, min_log, model_mean, model_log_var).mean(dim=-1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, means=model_mean, log_scales=0.5 * model_log_var).mean(dim=-1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


class SamplingSchedule:
    """A respaced chain over a subset of the training timesteps (IDDPM space_timesteps +
    SpacedDiffusion): betas are recomputed from the kept alphas_cumprod, so the chain is an
    exact coarser diffusion. Coefficient arrays are float64 numpy indexed by chain position in
    IDDPM order (position j <-> training timestep `timestep_map[j]`, ascending); `timesteps` is
    the order the sampler visits them (descending)."""

    def __init__(
        self,
        train: TrainSchedule,
        steps: int,
        t_start: int | None = None,
        min_alpha_bar: float = 0.0,
    ):
        T = train.num_timesteps
        t_start = T - 1 if t_start is None else int(t_start)
        if not 0 <= t_start < T:
            raise ValueError(f"t_start must be in [0, {T - 1}], got {t_start}")
        if not 1 <= steps <= t_start + 1:
            raise ValueError(f"steps must be in [1, t_start + 1 = {t_start + 1}], got {steps}")
        if not 0.0 <= min_alpha_bar < 1.0:
            raise ValueError(f"min_alpha_bar must be in [0, 1), got {min_alpha_bar}")
        self.steps = int(steps)
        self.t_start = t_start
        self.min_alpha_bar = float(min_alpha_bar)

        if steps == 1:
            kept = [t_start]
        else:
            # IDDPM space_timesteps for one section of size t_start + 1 (same float accumulation)
            stride = t_start / (steps - 1)
            kept, cur = [], 0.0
            for _ in range(steps):
                kept.append(round(cur))
                cur += stride
        self.timestep_map: list[int] = sorted(set(kept))
        assert len(self.timestep_map) == steps
        self.timesteps: list[int] = self.timestep_map[::-1]

        # SpacedDiffusion: betas from the ratio of consecutive kept alphas_cumprod
        train_ab = train.np["alphas_cumprod"]
        betas, last = [], 1.0
        for t in self.timestep_map:
            betas.append(1.0 - train_ab[t] / last)
            last = train_ab[t]
        coefs = _gaussian_coefs(np.array(betas))
        for name, arr in coefs.items():
            setattr(self, name, arr)
        # alpha_bar used only to recover x0 from eps (sqrt(1/ab) would amplify errors 2e4x at t=999)
        self.x0_alphas_cumprod = np.maximum(self.alphas_cumprod, self.min_alpha_bar)

    def __len__(self) -> int:
        return self.steps

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "t_start": self.t_start,
            "min_alpha_bar": self.min_alpha_bar,
            "timesteps": list(self.timesteps),
        }

    def __repr__(self) -> str:
        return (
            f"SamplingSchedule(steps={self.steps}, t_start={self.t_start}, "
            f"min_alpha_bar={self.min_alpha_bar})"
        )


# --------------------------------------------------------------------------- one sampler step
# Chain position j is a python int and every coefficient a python float, so a sampler written
# with these exports to ONNX / torch.export as a fixed unrolled graph.


def predict_x0(schedule: SamplingSchedule, j: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x0 recovered from x_t and eps at chain position j (alpha_bar floored by min_alpha_bar)."""
    ab = float(schedule.x0_alphas_cumprod[j])
    return math.sqrt(1.0 / ab) * x - math.sqrt(1.0 / ab - 1.0) * eps


def ddpm_step(schedule: SamplingSchedule, j: int, x: torch.Tensor, x0: torch.Tensor, var_values: torch.Tensor, step_noise: torch.Tensor | None) -> torch.Tensor:
    """IDDPM p_sample with the learned variance; no noise at the last step (j = 0)."""
    mean = float(schedule.posterior_mean_coef1[j]) * x0 + float(schedule.posterior_mean_coef2[j]) * x
    if j == 0:
        return mean
    frac = (var_values + 1) / 2
    log_var = frac * float(schedule.log_betas[j]) + (1 - frac) * float(schedule.posterior_log_variance_clipped[j])
    return mean + torch.exp(0.5 * log_var) * step_noise


def ddim_step(schedule: SamplingSchedule, j: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """IDDPM ddim_sample with eta = 0; eps re-derived from the (possibly clipped) x0."""
    if j == 0:
        return x0
    ab = float(schedule.x0_alphas_cumprod[j])
    eps = (math.sqrt(1.0 / ab) * x - x0) / math.sqrt(1.0 / ab - 1.0)
    ab_prev = float(schedule.alphas_cumprod_prev[j])
    return math.sqrt(ab_prev) * x0 + math.sqrt(1.0 - ab_prev) * eps
