"""Calibration's decision, apart from the stage that measures it: the grid of sampler settings,
the choice among measured results (a non-inferiority test against the best: a paired bootstrap
interval whose lower end must stay within the tolerance, then latency), and the report (table and accuracy-vs-latency plot).
The stage (stages/calibrate.py) runs the measurements; everything here is pure and tested alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.table import Table

from gendd_deploy import seeds
from gendd_deploy.config import CalibrateConfig
from gendd_deploy.models.deployed import SamplerSetting

REFERENCE = SamplerSetting.published()
PROBE = SamplerSetting.probe()
FEW_STEPS = 8  # t_start candidates apply to samplers with at most this many steps
# Floor for alpha_bar in the x0 estimate of every candidate (not the reference): at t = 999 the
# cosine alpha_bar is ~2e-9 and recovering x0 multiplies float32 rounding by ~2e4, enough to fail
# the export's 1e-4 parity gate (gendd-method.md, "Numerical pitfalls"). 1e-3 caps it at ~32x.
MIN_ALPHA_BAR = 1e-3


# --------------------------------------------------------------------------- the grid


def canonical(s: SamplerSetting, num_timesteps: int, samplers: tuple | list = ("ddpm", "ddim")) -> SamplerSetting:
    """The cheapest equivalent spelling of a setting, so equivalent settings collapse to one.

    - one-step ddpm takes x_T unscaled and adds no noise at its only (last) step, whose posterior
      mean is exactly x0: temperature is irrelevant, and it is one-step ddim at temperature 1
      (written as ddim when ddim is in `samplers`);
    - ddim at temperature 0: x_T = 0 * noise and ddim adds no noise later, so the noise mode is
      irrelevant: the same as zero noise;
    - zero noise: the output ignores temperature (x_T = 0 and every step's noise is 0) and
      draws are identical, so temperature 0 and one draw;
    - t_start = T - 1 is the default (None).
    """
    if s.linear:
        return s
    if s.sampler == "ddpm" and s.steps == 1:
        s = replace(s, sampler="ddim" if "ddim" in samplers else "ddpm", temperature=1.0)
    if s.sampler == "ddim" and s.temperature == 0.0:
        s = replace(s, noise="zero")
    if s.noise == "zero":
        s = replace(s, temperature=0.0, draws=1)
    if s.t_start == num_timesteps - 1:
        s = replace(s, t_start=None)
    return s


def _chains(cfg: CalibrateConfig, num_timesteps: int) -> list[tuple[int, int | None]]:
    """(steps, t_start) pairs of the grid: t_start only shapes few-step chains (longer ones start
    at the default T - 1), and a t_start the chain cannot start at is dropped."""
    pairs = []
    for steps in (s for s in cfg.steps if s <= num_timesteps):
        for t_start in (cfg.t_starts or [None]) if steps <= FEW_STEPS else [None]:
            if t_start is None or steps - 1 <= t_start < num_timesteps:
                pairs.append((steps, t_start))
    return pairs


def candidates(cfg: CalibrateConfig, num_timesteps: int) -> list[SamplerSetting]:
    """Every distinct sampler setting of the config's grid (equivalents collapsed, invalid t_start
    dropped), cheapest first (head passes); at equal cost deterministic settings first
    (gendd-method.md: they read out best), then grid order, so a cap is reproducible."""
    seen: dict[SamplerSetting, None] = {}
    grid = itertools.product(cfg.samplers, _chains(cfg, num_timesteps), cfg.draws, cfg.guidance, cfg.temperatures, cfg.noise_modes)
    for sampler, (steps, t_start), draws, guidance, temperature, noise in grid:
        s = SamplerSetting(
            sampler=sampler, steps=steps, draws=draws, guidance=float(guidance), temperature=float(temperature),
            noise=noise, t_start=t_start, min_alpha_bar=MIN_ALPHA_BAR,
        )
        seen.setdefault(canonical(s, num_timesteps, cfg.samplers), None)
    return sorted(seen, key=lambda s: (s.head_passes(), not s.deterministic))


def build_grid(cfg: CalibrateConfig, num_timesteps: int) -> list[SamplerSetting]:
    """The settings to evaluate: the probe, the cheapest candidates, and the published reference
    (always, where its cost puts it); `cfg.max_settings` counts all of them (at least 2)."""
    ranked = [s for s in candidates(cfg, num_timesteps) if s != REFERENCE]
    grid = [PROBE] + ranked[: max(cfg.max_settings - 2, 0)]
    at = next((i for i, s in enumerate(grid) if s.head_passes() > REFERENCE.head_passes()), len(grid))
    grid.insert(at, REFERENCE)
    return grid


def structure(s: SamplerSetting) -> tuple:
    """What the exported graph depends on; latency is measured once per structure."""
    if s.linear:
        return ("linear",)  # probe and fitted read-outs: backbone + one Linear, the plain student's graph
    needs_noise = not s.deterministic
    return (s.sampler, s.steps, s.draws, s.guidance != 1.0, needs_noise)


# --------------------------------------------------------------------------- choosing


@dataclass
class Result:
    setting: SamplerSetting
    top1: float
    agreement: float = float("nan")  # with the reference's predictions, in [0, 1]
    latency_ms: float = float("nan")  # per batch of latency_batch images
    chosen: bool = False
    correct: torch.Tensor | None = field(default=None, repr=False)  # (n,) bool, per calibration image
    interval: tuple[float, float] | None = None  # paired bootstrap interval of top-1 minus the best's, points

    def row(self) -> dict:
        return {
            "label": self.setting.label(),
            "setting": self.setting.to_dict(),
            "top1": round(self.top1, 3),
            "agreement": round(self.agreement, 4),
            "latency_ms": round(self.latency_ms, 4),
            "head_passes": self.setting.head_passes(),
            "deterministic": self.setting.deterministic,
            "vs_best_interval": [round(v, 3) for v in self.interval] if self.interval else None,
            "chosen": self.chosen,
        }


def paired_intervals(results: list[Result], best: Result, *, resamples: int, confidence: float, seed: int) -> None:
    """Set r.interval: the bootstrap interval of (r's top-1 - best's top-1) in points, resampling
    the calibration images with the same draws for every result (a paired comparison)."""
    n = len(best.correct)
    g = seeds.generator(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    q = torch.tensor([(1 - confidence) / 2, 1 - (1 - confidence) / 2], dtype=torch.float64)
    ref = best.correct.to(torch.float64)
    for r in results:
        diff = r.correct.to(torch.float64) - ref  # (n,) in {-1, 0, 1}
        means = diff[idx].mean(dim=1) * 100.0
        lo, hi = torch.quantile(means, q).tolist()
        r.interval = (lo, hi)


def choose(results: list[Result], tolerance: float, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[Result, Result]:
    """(chosen, best): the lowest-latency result shown to be at most `tolerance` points worse than
    the best (a non-inferiority test). With per-image outcomes (`correct`) that is a paired
    bootstrap: a result is kept when the *lower* end of its interval vs the best is >= -tolerance,
    so what ships is, with the interval's confidence, no more than `tolerance` points below the
    best measured; without them, a plain threshold on top-1. Equal-cost results (same latency:
    the same graph structure) go to the best point estimate after fewer head passes and
    deterministic settings (the same answer for the same image), then list order."""
    if not results:
        raise ValueError("no calibration results to choose from")
    best = max(results, key=lambda r: r.top1)  # first of equals: the cheaper, grid is cheapest first
    if all(r.correct is not None for r in results):
        paired_intervals(results, best, resamples=resamples, confidence=confidence, seed=seed)
        ok = [(i, r) for i, r in enumerate(results) if r.interval[0] >= -tolerance - 1e-9]
    else:
        ok = [(i, r) for i, r in enumerate(results) if r.top1 >= best.top1 - tolerance - 1e-9]
    _, chosen = min(ok, key=lambda ir: (ir[1].latency_ms, ir[1].setting.head_passes(), not ir[1].setting.deterministic, -ir[1].top1, ir[0]))
    return chosen, best


# --------------------------------------------------------------------------- reporting


def _tag(r: Result, chosen: Result, best: Result) -> str:
    tags = [t for t, hit in (("chosen", r is chosen), ("best", r is best), ("reference", r.setting == REFERENCE), ("probe", r.setting == PROBE)) if hit]
    return ", ".join(tags)


TABLE_LEGEND = (
    "setting: sampler-steps, xN draws averaged, cfgG guidance scale, TN temperature, noise fresh / fixed / zero, "
    "tN first timestep (none: the last), noclip; probe: the linear probe; linear fit_*: a fitted read-out. "
    "top-1: on the calibration images. agree: share of them given the reference sampler's class. "
    "ms: per batch. passes: head passes per token per image."
)


def table(results: list[Result], chosen: Result, best: Result, *, batch: int, runtime: str, top: int = 25):
    """A rich table sorted by latency: the `top` fastest plus the reference, probe, best and chosen,
    with a legend of the labels underneath. Fits 80 columns: labels never wrap."""
    ranked = sorted(results, key=lambda r: (r.latency_ms, r.setting.head_passes()))
    marked = {id(chosen), id(best)} | {id(r) for r in results if r.setting in (REFERENCE, PROBE)}
    shown = [r for i, r in enumerate(ranked) if i < top or id(r) in marked]
    t = Table(
        title=f"calibration: {len(results)} settings, latency per {batch} images on {runtime} (showing {len(shown)})",
        caption=TABLE_LEGEND, caption_justify="left",
    )
    for col, just in (("setting", "left"), ("top-1 %", "right"), ("agree", "right"), ("ms", "right"), ("passes", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    t.add_column("", justify="left", overflow="fold")
    for r in shown:
        style = "bold green" if r is chosen else None
        t.add_row(r.setting.label(), f"{r.top1:.2f}", f"{r.agreement:.3f}", f"{r.latency_ms:.3g}", str(r.setting.head_passes()), _tag(r, chosen, best), style=style)
    return t


def pareto_front(results: list[Result]) -> list[Result]:
    """Results no other result beats on both latency and top-1, by latency."""
    front, best = [], -1.0
    for r in sorted(results, key=lambda r: (r.latency_ms, -r.top1)):
        if r.top1 > best:
            front.append(r)
            best = r.top1
    return front


def plot(results: list[Result], chosen: Result, path: Path, *, title: str, tolerance: float = 0.0) -> None:
    """Accuracy vs latency: every setting, the Pareto front, the tolerance band under the best, the
    chosen point with its interval; the accuracy axis zoomed to where the choice is made."""
    import matplotlib  # imported on use: slow to import, and only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = max(results, key=lambda r: r.top1)
    front = pareto_front(results)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([r.latency_ms for r in results], [r.top1 for r in results], s=12, alpha=0.5, color="tab:blue", label="setting")
    ax.step([r.latency_ms for r in front], [r.top1 for r in front], where="post", color="tab:green", lw=1.2, label="Pareto front")
    ax.axhspan(best.top1 - tolerance, best.top1, color="tab:green", alpha=0.12, label=f"tolerance {tolerance:g} pts under the best")
    for r in results:
        name = "reference" if r.setting == REFERENCE else "probe" if r.setting == PROBE else r.setting.label() if r.setting.kind == "readout" else None
        if name:
            ax.scatter([r.latency_ms], [r.top1], s=40, color="tab:orange" if name == "reference" else "tab:gray", zorder=3)
            ax.annotate(name, (r.latency_ms, r.top1), textcoords="offset points", xytext=(5, -10), fontsize=8)
    if chosen.interval:
        lo, hi = chosen.interval
        ax.errorbar([chosen.latency_ms], [chosen.top1], yerr=[[chosen.top1 - (best.top1 + lo)], [best.top1 + hi - chosen.top1]],
                    color="tab:red", capsize=4, lw=1, zorder=4)
    ax.scatter([chosen.latency_ms], [chosen.top1], s=140, facecolors="none", edgecolors="tab:red", linewidths=2, zorder=5, label=f"chosen: {chosen.setting.label()}")
    # zoom: from a little under the lowest point that matters (front near the best, chosen) to the best
    relevant = [r.top1 for r in front if r.top1 >= best.top1 - 5.0] + [chosen.top1, best.top1 - tolerance]
    if chosen.interval:
        relevant.append(best.top1 + chosen.interval[0])
    lo_y, hi_y = min(relevant), best.top1
    pad = max(0.5, 0.15 * (hi_y - lo_y))
    ax.set_ylim(lo_y - pad, hi_y + pad)
    below = sum(1 for r in results if r.top1 < lo_y - pad)
    if below:
        ax.text(0.01, 0.02, f"{below} setting(s) below the axis", transform=ax.transAxes, fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("latency per batch (ms, log scale)")
    ax.set_ylabel("top-1 on the calibration split (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
