"""GenDD's diffusion head: MAR's SimpleMLPAdaLN over split tokens, trained with IDDPM's hybrid
loss and sampled with DDPM or DDIM over a respaced chain (the schedule: models/schedule.py).

Faithful to jiequancui/Generative-Distribution-Distillation (diffloss.py, diff_model.py), which
is LTH14/mar's DiffLoss plus a per-token index embedding, on top of openai/improved-diffusion.
Deviations, all opt-in (defaults reproduce the authors' sampler):
  - SamplingSchedule(t_start=..., min_alpha_bar=...) (see models/schedule.py); sample(clip=...)
    clips x0 to the training-target range.
  - sample(sampler="ddim") with temperature scaling the starting noise (temperature 0 gives the
    deterministic "expected target" read-out).
  - A 1-step chain is [t_start], not IDDPM's [0].
The sampler is written to export (ONNX, torch.export): a python loop over python ints with
python-float coefficients, noise passed in, no data-dependent control flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gendd_deploy.models.schedule import SAMPLERS, SamplingSchedule, TrainSchedule, ddim_step, ddpm_step, predict_x0

__all__ = ["DiffusionHead", "SAMPLERS", "SamplingSchedule", "TrainSchedule"]


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

        vb = sched.vlb_bits(x0, x_t, t, eps, var_values)
        return (mse + vb).mean()

    # ---- sampling

    @staticmethod
    def noise_shape(batch: int, draws: int, steps: int, num_tokens: int, token_dim: int) -> tuple:
        """Slot 0 is x_T; slot k >= 1 is the noise added after step k (the last is unused)."""
        return (batch, steps + 1, draws, num_tokens, token_dim)

    def _step_invariant_y(self, cond: torch.Tensor, guided: bool) -> torch.Tensor:
        """cond_embed(z) + index_embed, per sample (not per draw): (B, 1, n, w); with guidance the
        unconditional rows (z = 0) follow the conditional ones: (2B, 1, n, w)."""
        index = self.index_embed.weight  # (n, w): every token index, in order
        y_c = (self.cond_embed(cond)[:, None, :] + index)[:, None]
        if not guided:
            return y_c
        y_u = (self.cond_embed(torch.zeros_like(cond))[:, None, :] + index)[:, None]
        return torch.cat([y_c, y_u], dim=0)

    def _guided_eps(self, x: torch.Tensor, y: torch.Tensor, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free guidance on eps; the variance comes from the conditional branch."""
        d = self.token_dim
        out_c, out_u = self._denoise(torch.cat([x, x], dim=0), y).reshape(2, *x.shape[:-1], 2 * d).unbind(0)
        eps_c, var_values = out_c.chunk(2, dim=-1)
        eps_u = out_u[..., :d]
        return eps_u + float(guidance) * (eps_c - eps_u), var_values

    def sample(
        self,
        cond: torch.Tensor,
        schedule: SamplingSchedule,
        sampler: str = "ddpm",
        *,
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

        y_base = self._step_invariant_y(cond, guided)
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
            eps, var_values = self._guided_eps(x, y, guidance) if guided else self._denoise(x, y).chunk(2, dim=-1)
            x0 = predict_x0(schedule, j, x, eps)
            if clip is not None:
                x0 = torch.minimum(torch.maximum(x0, lo), hi)
            if sampler == "ddpm":
                step_noise = None if j == 0 else noise[:, steps - j]  # noise slot k = step number k
                if step_noise is not None and float(temperature) != 1.0:
                    step_noise = step_noise * float(temperature)
                x = ddpm_step(schedule, j, x, x0, var_values, step_noise)
            else:
                x = ddim_step(schedule, j, x, x0)

        return x.reshape(-1, draws, self.feature_dim).mean(dim=1)
