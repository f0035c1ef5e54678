"""GenDD's diffusion head: MAR's SimpleMLPAdaLN over split tokens, IDDPM's cosine schedule,
hybrid loss, and DDPM / DDIM samplers over a respaced chain.

Faithful to jiequancui/Generative-Distribution-Distillation (diffloss.py, diff_model.py), which
is LTH14/mar's DiffLoss plus a per-token index embedding, on top of openai/improved-diffusion.
Deviations, all opt-in (defaults reproduce the authors' sampler):
  - SamplingSchedule(t_start=...) starts the chain below T-1; (min_alpha_bar=...) floors
    alpha_bar in the x0 estimate; sample(clip=...) clips x0 to the training-target range.
  - sample(sampler="ddim") with temperature scaling the starting noise (temperature 0 gives the
    deterministic "expected target" read-out).
  - A 1-step chain is [t_start], not IDDPM's [0].
The sampler is written to export (ONNX, torch.export): a python loop over python ints with
python-float coefficients, noise passed in, no data-dependent control flow.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLERS = ("ddpm", "ddim")


# --------------------------------------------------------------------------- schedules


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


# --------------------------------------------------------------------------- IDDPM loss terms


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


# --------------------------------------------------------------------------- the head (MAR)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal 256-dim frequency embedding -> Linear -> SiLU -> Linear (DiT / MAR)."""

    def __init__(self, width: int, frequency_dim: int = 256, max_period: int = 10000):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width)
        )

    def forward(self, t: torch.Tensor | int) -> torch.Tensor:
        """t: (N,) integer tensor -> (N, w); or a python int -> (w,), which traces to
        constant-only ops (no input dependence) in exported graphs."""
        weight = self.mlp[0].weight
        half = self.frequency_dim // 2
        # float32 as in MAR, so a python-int t gives bit-identical embeddings to a tensor t
        freqs = torch.exp(
            -math.log(self.max_period)
            * torch.arange(half, dtype=torch.float32, device=weight.device)
            / half
        )
        if isinstance(t, int):
            args = freqs * float(t)  # (half,)
        else:
            args = t[:, None].float() * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_dim % 2:
            emb = F.pad(emb, (0, 1))
        return self.mlp(emb.to(weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        h = self.mlp(_modulate(self.in_ln(x), shift, scale))
        return x + gate * h


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiffusionHead(nn.Module):
    """p(f_t | z): the teacher feature (B, D_t) is cut into n = D_t / d contiguous tokens, each
    modelled independently by MAR's SimpleMLPAdaLN conditioned on
    y = time_embed(t) + cond_embed(z) + index_embed[token]; outputs [eps, var_values] (2d)."""

    def __init__(
        self,
        feature_dim: int,
        cond_dim: int,
        token_dim: int = 64,
        width: int = 1024,
        depth: int = 3,
        train_timesteps: int = 1000,
    ):
        super().__init__()
        if token_dim < 1 or feature_dim % token_dim != 0:
            raise ValueError(
                f"feature_dim ({feature_dim}) must be a multiple of token_dim ({token_dim})"
            )
        self.feature_dim = feature_dim
        self.cond_dim = cond_dim
        self.token_dim = token_dim
        self.width = width
        self.depth = depth
        self.num_tokens = feature_dim // token_dim

        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.index_embed = nn.Embedding(self.num_tokens, width)  # GenDD's pos_embed
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * token_dim)
        self.train_schedule = TrainSchedule(train_timesteps)
        self._init_weights()

    def _init_weights(self):
        # MAR initialize_weights; the index embedding keeps nn.Embedding's N(0, 1) as in GenDD
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ---- tokens

    def to_tokens(self, feat: torch.Tensor) -> torch.Tensor:
        if feat.shape[-1] != self.feature_dim:
            raise ValueError(f"expected features of dim {self.feature_dim}, got {feat.shape[-1]}")
        return feat.reshape(-1, self.num_tokens, self.token_dim)  # (B, n, d)

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(-1, self.feature_dim)  # (B, D_t)

    # ---- network

    def _denoise(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (..., d) noisy tokens, y (..., w) broadcastable conditioning -> (..., 2d)."""
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def _rows(self, target: torch.Tensor, cond: torch.Tensor):
        """(B*n) rows: token, its sample's z, its index (GenDD forward_train_stage2 order)."""
        B, n = target.shape[0], self.num_tokens
        x = self.to_tokens(target).reshape(B * n, self.token_dim)
        z = cond[:, None, :].expand(B, n, self.cond_dim).reshape(B * n, self.cond_dim)
        index = torch.arange(n, device=target.device).repeat(B)
        return x, z, index

    # ---- training

    def loss(
        self, target: torch.Tensor, cond: torch.Tensor, mul: int = 10, cfg_drop: float = 0.2
    ) -> torch.Tensor:
        """IDDPM hybrid loss (MSE on eps + VLB in bits training only the variance), mean over
        the B * n * mul rows. target (B, D_t), cond (B, cond_dim)."""
        if cond.shape[-1] != self.cond_dim or cond.shape[0] != target.shape[0]:
            raise ValueError(
                f"cond must be (B={target.shape[0]}, {self.cond_dim}), got {tuple(cond.shape)}"
            )
        if mul < 1 or not 0.0 <= cfg_drop <= 1.0:
            raise ValueError(f"need mul >= 1 and cfg_drop in [0, 1], got {mul}, {cfg_drop}")
        sched = self.train_schedule
        x0, z, index = self._rows(target, cond)
        x0, z, index = x0.repeat(mul, 1), z.repeat(mul, 1), index.repeat(mul)  # (N, .)
        N = x0.shape[0]
        if self.training and cfg_drop > 0:
            keep = (torch.rand(N, device=z.device) >= cfg_drop).to(z.dtype)
            z = z * keep[:, None]

        t = torch.randint(0, sched.num_timesteps, (N,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = sched.q_sample(x0, t, noise)
        y = self.time_embed(t) + self.cond_embed(z) + self.index_embed(index)
        eps, var_values = self._denoise(x_t, y).chunk(2, dim=-1)

        mse = ((noise - eps) ** 2).mean(dim=-1)

        # VLB term with the mean frozen: only var_values get its gradient
        at = lambda name: sched._at(name, t, x0)  # noqa: E731
        pred_x0 = (
            at("sqrt_recip_alphas_cumprod") * x_t
            - at("sqrt_recipm1_alphas_cumprod") * eps.detach()
        )
        model_mean = at("posterior_mean_coef1") * pred_x0 + at("posterior_mean_coef2") * x_t
        min_log = at("posterior_log_variance_clipped")
        frac = (var_values + 1) / 2
        model_log_var = frac * at("log_betas") + (1 - frac) * min_log
        true_mean = at("posterior_mean_coef1") * x0 + at("posterior_mean_coef2") * x_t
        kl = _normal_kl(true_mean, min_log, model_mean, model_log_var).mean(dim=-1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(
            x0, means=model_mean, log_scales=0.5 * model_log_var
        ).mean(dim=-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).mean()

    # ---- sampling

    @staticmethod
    def noise_shape(batch: int, draws: int, steps: int, num_tokens: int, token_dim: int) -> tuple:
        """Slot 0 is x_T; slot k >= 1 is the noise added after step k (the last is unused)."""
        return (batch, steps + 1, draws, num_tokens, token_dim)

    def sample(
        self,
        cond: torch.Tensor,
        schedule: SamplingSchedule,
        sampler: str = "ddpm",
        draws: int = 1,
        guidance: float = 1.0,
        temperature: float = 1.0,
        noise: torch.Tensor | None = None,
        clip: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """cond (B, cond_dim) -> (B, D_t), the mean of `draws` samples.
        ddpm: IDDPM p_sample with the learned variance, x_T = noise (unscaled, as MAR), per-step
        noise * temperature. ddim: eta = 0, x_T = temperature * noise.
        Guidance mixes eps only; the variance comes from the conditional branch."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond must be (B, {self.cond_dim}), got {tuple(cond.shape)}")
        n, d = self.num_tokens, self.token_dim
        steps = schedule.steps
        expected = self.noise_shape(cond.shape[0], draws, steps, n, d)
        if noise is None:
            noise = torch.randn(expected, device=cond.device, dtype=cond.dtype)
        elif tuple(noise.shape) != tuple(expected):
            raise ValueError(
                f"noise must have shape (batch, steps + 1, draws, num_tokens, token_dim) = "
                f"{tuple(expected)}, got {tuple(noise.shape)}"
            )
        guided = float(guidance) != 1.0

        # step-invariant part of y, per sample (not per draw): (B, 1, n, w)
        index = self.index_embed.weight  # (n, w): every token index, in order
        y_c = (self.cond_embed(cond)[:, None, :] + index)[:, None]
        if guided:
            y_u = (self.cond_embed(torch.zeros_like(cond))[:, None, :] + index)[:, None]
            y_base = torch.cat([y_c, y_u], dim=0)  # (2B, 1, n, w): conditional rows first
        else:
            y_base = y_c

        if clip is not None:
            # per-feature range (D_t,) in the token layout (n, d)
            lo, hi = (
                c.to(noise.dtype).reshape(-1).expand(self.feature_dim).reshape(n, d) for c in clip
            )

        x = noise[:, 0]  # (B, draws, n, d)
        if sampler == "ddim":
            x = x * float(temperature)
        for j in reversed(range(steps)):  # chain position, python int
            t = schedule.timestep_map[j]
            y = y_base + self.time_embed(t)
            if guided:
                out = self._denoise(torch.cat([x, x], dim=0), y)
                out_c, out_u = out.reshape(2, -1, draws, n, 2 * d).unbind(0)
                eps_c, var_values = out_c.chunk(2, dim=-1)
                eps_u = out_u[..., :d]
                eps = eps_u + float(guidance) * (eps_c - eps_u)
            else:
                eps, var_values = self._denoise(x, y).chunk(2, dim=-1)

            ab = float(schedule.x0_alphas_cumprod[j])
            x0 = math.sqrt(1.0 / ab) * x - math.sqrt(1.0 / ab - 1.0) * eps
            if clip is not None:
                x0 = torch.minimum(torch.maximum(x0, lo), hi)

            if sampler == "ddpm":
                mean = (
                    float(schedule.posterior_mean_coef1[j]) * x0
                    + float(schedule.posterior_mean_coef2[j]) * x
                )
                if j == 0:
                    x = mean  # no noise at the last step
                else:
                    frac = (var_values + 1) / 2
                    log_var = frac * float(schedule.log_betas[j]) + (1 - frac) * float(
                        schedule.posterior_log_variance_clipped[j]
                    )
                    step_noise = noise[:, steps - j]  # noise slot k = step number k
                    if float(temperature) != 1.0:
                        step_noise = step_noise * float(temperature)
                    x = mean + torch.exp(0.5 * log_var) * step_noise
            else:
                if j == 0:
                    x = x0
                else:
                    # eps re-derived from the (clipped) x0, as IDDPM ddim_sample
                    eps = (math.sqrt(1.0 / ab) * x - x0) / math.sqrt(1.0 / ab - 1.0)
                    ab_prev = float(schedule.alphas_cumprod_prev[j])
                    x = math.sqrt(ab_prev) * x0 + math.sqrt(1.0 - ab_prev) * eps

        return x.reshape(-1, draws, self.feature_dim).mean(dim=1)
