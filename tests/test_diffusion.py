"""Diffusion head, schedules and samplers (gendd_deploy.models.diffusion)."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from gendd_deploy.models.diffusion import DiffusionHead
from gendd_deploy.models.schedule import SamplingSchedule, TrainSchedule

D_T, COND, TOK, WIDTH = 128, 16, 64, 64  # 2 tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


def make_head(seed=0, randomize=False, **kw):
    torch.manual_seed(seed)
    head = DiffusionHead(D_T, COND, token_dim=TOK, width=WIDTH, depth=2, **kw).eval()
    if randomize:  # leave MAR's zero init so outputs depend on x, t, z and the token index
        with torch.no_grad():
            for block in head.res_blocks:
                nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
            nn.init.normal_(head.final_layer.adaLN_modulation[-1].weight, std=0.05)
            nn.init.normal_(head.final_layer.linear.weight, std=0.05)
    return head


def noise_for(head, batch, draws, sched, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = head.noise_shape(batch, draws, sched.steps, head.num_tokens, head.token_dim)
    return torch.randn(shape, generator=g)


# ---- tokens, init


def test_token_round_trip():
    head = make_head()
    feat = torch.randn(5, D_T)
    tokens = head.to_tokens(feat)
    assert head.num_tokens == 2 and tokens.shape == (5, 2, TOK)
    assert torch.equal(tokens[:, 1], feat[:, TOK:])  # contiguous split
    assert torch.equal(head.from_tokens(tokens), feat)


def test_feature_dim_not_multiple_of_token_dim():
    with pytest.raises(ValueError, match=r"100.*64"):
        DiffusionHead(100, COND, token_dim=64, width=WIDTH)


def test_index_embedding_gives_each_token_its_own_conditioning():
    head = make_head(randomize=True)
    x, z, index = head._rows(torch.randn(3, D_T), torch.randn(3, COND))
    assert index.tolist() == [0, 1, 0, 1, 0, 1]
    assert torch.equal(z[0], z[1])
    t = torch.full((6,), 500)
    y = head.time_embed(t) + head.cond_embed(z) + head.index_embed(index)
    assert not torch.allclose(y[0], y[1])  # same sample, same t, different token
    same_x = torch.zeros(6, TOK)
    out = head._denoise(same_x, y)
    assert not torch.allclose(out[0], out[1])


def test_zero_init_output_independent_of_condition():
    head = make_head()
    sched = SamplingSchedule(head.train_schedule, 4, min_alpha_bar=1e-3)
    noise = noise_for(head, 3, 2, sched)
    a = head.sample(torch.randn(3, COND), sched, "ddpm", draws=2, guidance=2.0, noise=noise)
    b = head.sample(torch.randn(3, COND) * 5, sched, "ddpm", draws=2, guidance=2.0, noise=noise)
    assert torch.equal(a, b)
    x, z, index = head._rows(torch.randn(3, D_T), torch.randn(3, COND))
    y = head.time_embed(torch.full((6,), 10)) + head.cond_embed(z) + head.index_embed(index)
    assert torch.count_nonzero(head._denoise(x, y)) == 0


def test_time_embedding_int_matches_tensor():
    head = make_head()
    e_int = head.time_embed(737)
    e_tensor = head.time_embed(torch.tensor([737]))[0]
    assert torch.equal(e_int, e_tensor)


# ---- loss


def test_hybrid_loss_finite_and_falling():
    head = make_head().train()
    torch.manual_seed(0)
    target = torch.randn(8, D_T) * 0.5
    cond = torch.randn(8, COND)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    losses = []
    for _ in range(200):
        loss = head.loss(target, cond, mul=10)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:30]), np.mean(losses[-30:])
    assert last < 0.8 * first, (first, last)


def test_vb_term_trains_only_variance():
    # the VLB term sees eps detached: eps-output weights get gradient only from the MSE term
    head = make_head(randomize=True).train()
    torch.manual_seed(0)
    target, cond = torch.randn(4, D_T), torch.randn(4, COND)
    head.loss(target, cond, mul=2, cfg_drop=0.0).backward()
    w_grad = head.final_layer.linear.weight.grad
    assert w_grad[TOK:].abs().sum() > 0  # variance rows get the VLB gradient
    assert torch.isfinite(w_grad).all()


@pytest.mark.parametrize("share", [0.0, 0.3])
def test_cfg_dropout_share(share):
    head = make_head().train()
    seen = []
    head.cond_embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    torch.manual_seed(0)
    head.loss(torch.randn(100, D_T), torch.randn(100, COND) + 3.0, mul=10, cfg_drop=share)
    z = seen[-1]
    assert z.shape[0] == 100 * 2 * 10
    dropped = (z == 0).all(dim=1).float().mean().item()
    assert abs(dropped - share) < 0.04
    head.eval()
    head.loss(torch.randn(10, D_T), torch.randn(10, COND) + 3.0, mul=2, cfg_drop=0.5)
    assert (seen[-1] == 0).all(dim=1).sum() == 0  # no dropout outside training


# ---- schedules


def test_train_schedule_matches_iddpm_cosine():
    ts = TrainSchedule()
    ab = ts.np["alphas_cumprod"]
    assert ts.num_timesteps == 1000 and ts.betas.dtype == torch.float32
    assert ts.np["betas"].max() <= 0.999
    assert 1e-10 < ab[-1] < 1e-8  # ~2e-9, the pitfall min_alpha_bar is for
    x0, noise, t = torch.ones(3, 4), torch.zeros(3, 4), torch.tensor([0, 500, 999])
    assert torch.allclose(ts.q_sample(x0, t, noise)[:, 0], ts.sqrt_alphas_cumprod[t])


@pytest.mark.parametrize(
    "steps,t_start", [(64, None), (4, None), (4, 800), (1, None), (1, 900), (16, 15)]
)
def test_respaced_schedule(steps, t_start):
    train = TrainSchedule()
    s = SamplingSchedule(train, steps, t_start=t_start)
    first = 999 if t_start is None else t_start
    assert len(s.timesteps) == steps == len(s)
    assert s.timesteps[0] == first
    assert s.timesteps == sorted(set(s.timesteps), reverse=True)
    if steps > 1:
        assert s.timesteps[-1] == 0
        gaps = -np.diff(s.timesteps)
        assert gaps.max() - gaps.min() <= 1  # evenly spaced
    # betas recomputed from the kept alphas_cumprod reproduce them
    assert np.allclose(s.alphas_cumprod, train.np["alphas_cumprod"][s.timestep_map], rtol=1e-12)
    assert np.isfinite(s.posterior_log_variance_clipped).all()
    assert np.all(s.betas > 0) and np.all(s.betas < 1)


def test_respaced_matches_iddpm_space_timesteps():
    s = SamplingSchedule(TrainSchedule(), 4)
    assert s.timesteps == [999, 666, 333, 0]
    with pytest.raises(ValueError):
        SamplingSchedule(TrainSchedule(), 20, t_start=10)


# ---- sampling


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_deterministic_for_fixed_noise(sampler):
    head = make_head(randomize=True)
    sched = SamplingSchedule(head.train_schedule, 5, t_start=800)
    cond, noise = torch.randn(3, COND), noise_for(head, 3, 2, sched)
    a = head.sample(cond, sched, sampler, draws=2, guidance=2.0, noise=noise)
    b = head.sample(cond, sched, sampler, draws=2, guidance=2.0, noise=noise.clone())
    assert a.shape == (3, D_T) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    other = noise_for(head, 3, 2, sched, seed=7)
    c = head.sample(cond, sched, sampler, draws=2, guidance=2.0, noise=other)
    assert not torch.allclose(a, c)


def test_ddim_temperature_zero_ignores_noise():
    head = make_head(randomize=True)
    sched = SamplingSchedule(head.train_schedule, 3, t_start=900)
    cond = torch.randn(2, COND)
    n1, n2 = noise_for(head, 2, 3, sched, 1), noise_for(head, 2, 3, sched, 2)
    a = head.sample(cond, sched, "ddim", draws=3, temperature=0.0, noise=n1)
    b = head.sample(cond, sched, "ddim", draws=3, temperature=0.0, noise=n2)
    assert torch.equal(a, b)


def test_draws_average():
    head = make_head(randomize=True)
    sched = SamplingSchedule(head.train_schedule, 2, t_start=500)
    cond, noise = torch.randn(2, COND), noise_for(head, 2, 3, sched)
    mean = head.sample(cond, sched, "ddpm", draws=3, noise=noise)
    singles = [
        head.sample(cond, sched, "ddpm", draws=1, noise=noise[:, :, k : k + 1]) for k in range(3)
    ]
    assert torch.allclose(mean, torch.stack(singles).mean(0), atol=1e-6)


def test_guidance_one_has_no_unconditional_pass():
    head = make_head(randomize=True)
    sched = SamplingSchedule(head.train_schedule, 3, t_start=700)
    rows = []
    head.input_proj.register_forward_hook(lambda m, inp, out: rows.append(inp[0].numel() // TOK))
    cond, noise = torch.randn(4, COND), noise_for(head, 4, 2, sched)
    g1 = head.sample(cond, sched, "ddpm", draws=2, guidance=1.0, noise=noise)
    assert rows == [4 * 2 * 2] * 3  # B * draws * n rows per step, conditional only
    rows.clear()
    g2 = head.sample(cond, sched, "ddpm", draws=2, guidance=2.0, noise=noise)
    assert rows == [2 * 4 * 2 * 2] * 3
    assert not torch.allclose(g1, g2)


def test_wrong_noise_shape():
    head = make_head()
    sched = SamplingSchedule(head.train_schedule, 4)
    with pytest.raises(ValueError, match=r"\(3, 5, 2, 2, 64\)"):
        head.sample(torch.randn(3, COND), sched, "ddim", draws=2, noise=torch.randn(3, 4, 2, 2, 64))


def test_clip_respected():
    head = make_head(randomize=True)
    with torch.no_grad():
        head.final_layer.linear.bias[:TOK].fill_(3.0)  # eps far off: x0 would leave the range
    sched = SamplingSchedule(head.train_schedule, 1, t_start=900)
    lo, hi = -0.5 * torch.ones(D_T), torch.linspace(0.1, 1.0, D_T)
    cond = torch.randn(6, COND)
    noise = noise_for(head, 6, 1, sched)
    free = head.sample(cond, sched, "ddim", temperature=0.0, noise=noise)
    out = head.sample(cond, sched, "ddim", temperature=0.0, noise=noise, clip=(lo, hi))
    assert ((free < lo) | (free > hi)).any()
    assert ((out >= lo) & (out <= hi)).all()


# ---- export


class _Sampler(nn.Module):
    def __init__(self, head, sched):
        super().__init__()
        self.head, self.sched = head, sched
        self.register_buffer("lo", torch.full((D_T,), -3.0))
        self.register_buffer("hi", torch.full((D_T,), 3.0))

    def forward(self, cond, noise):
        return self.head.sample(
            cond, self.sched, "ddim", draws=2, guidance=2.0, noise=noise, clip=(self.lo, self.hi)
        )


def _export_setup():
    head = make_head(randomize=True)
    # t_start 700 + floor + clip: all sampler options in the graph, outputs mostly inside the clip
    sched = SamplingSchedule(head.train_schedule, 2, t_start=700, min_alpha_bar=1e-3)
    return _Sampler(head, sched).eval(), sched, head


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_onnx_export_dynamic_batch(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    module, sched, head = _export_setup()
    batch = torch.export.Dim("batch", min=1, max=4096)
    args = (torch.randn(3, COND), noise_for(head, 3, 2, sched))
    path = tmp_path / "sampler.onnx"
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=True,
        input_names=["cond", "noise"],
        output_names=["feat"],
        dynamic_shapes={"cond": {0: batch}, "noise": {0: batch}},
    )
    assert not [n.op_type for n in onnx.load(str(path)).graph.node if "Random" in n.op_type]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 7):
        cond, noise = torch.randn(b, COND), noise_for(head, b, 2, sched, seed=b)
        with torch.no_grad():
            ref = module(cond, noise).numpy()
        (got,) = sess.run(None, {"cond": cond.numpy(), "noise": noise.numpy()})
        assert got.shape == (b, D_T)
        assert np.abs(got - ref).max() <= 1e-4


def test_torch_export_dynamic_batch():
    module, sched, head = _export_setup()
    batch = torch.export.Dim("batch", min=1, max=4096)
    args = (torch.randn(3, COND), noise_for(head, 3, 2, sched))
    dynamic = {"cond": {0: batch}, "noise": {0: batch}}
    ep = torch.export.export(module, args, dynamic_shapes=dynamic)
    assert "rand" not in str(ep.graph)  # noise comes in as an input
    for b in (1, 5):
        cond, noise = torch.randn(b, COND), noise_for(head, b, 2, sched, seed=b)
        with torch.no_grad():
            assert torch.allclose(ep.module()(cond, noise), module(cond, noise), atol=1e-5)
