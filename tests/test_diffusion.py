"""Tests for the diffusion package, checked against independent float64 math."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffusion import create_diffusion
from diffusion import gaussian_diffusion as gd
from diffusion.diffusion_utils import (
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from diffusion.respace import SpacedDiffusion, space_timesteps
from diffusion.timestep_sampler import UniformSampler, create_named_schedule_sampler

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def hand_alphas_cumprod(betas):
    """Cumulative product of (1 - beta) with a plain Python loop (float64)."""
    out, running = [], 1.0
    for b in betas:
        running *= 1.0 - float(b)
        out.append(running)
    return np.array(out, dtype=np.float64)


def make_diffusion(steps=1000, schedule="linear", var=gd.ModelVarType.LEARNED_RANGE,
                   mean=gd.ModelMeanType.EPSILON, loss=gd.LossType.MSE):
    return gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule(schedule, steps),
        model_mean_type=mean,
        model_var_type=var,
        loss_type=loss,
    )


class ZeroDataEps(nn.Module):
    """Ideal eps-predictor for data that is always exactly zero.

    For x_0 = 0, x_t = sqrt(1 - acp_t) * eps, so eps = x_t / sqrt(1 - acp_t).
    `t` are ORIGINAL timesteps, looked up in the original schedule.
    """

    def __init__(self, original_alphas_cumprod, v_value=0.0):
        super().__init__()
        self.acp = torch.tensor(original_alphas_cumprod, dtype=torch.float64)
        self.v_value = v_value
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        scale = (1.0 - self.acp[t]).sqrt().float().view(-1, 1, 1, 1)
        eps = x / scale
        return torch.cat([eps, torch.full_like(x, self.v_value)], dim=1)


class SplitModel(nn.Module):
    """Tiny learned-sigma model with separate parameters for eps and v."""

    def __init__(self, channels=3):
        super().__init__()
        self.eps_conv = nn.Conv2d(channels, channels, 1)
        self.v_conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x, t, y=None):
        return torch.cat([self.eps_conv(x), torch.tanh(self.v_conv(x))], dim=1)


class Recorder:
    """Records the timesteps it is called with; returns a fixed eps/v output."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, t, **kwargs):
        self.seen.append(t.clone())
        return torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)


# ---------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------

def test_linear_schedule_values():
    betas = gd.get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)

    betas500 = gd.get_named_beta_schedule("linear", 500)
    assert betas500.shape == (500,)
    assert betas500[0] == pytest.approx(2e-4, abs=1e-15)
    assert betas500[-1] == pytest.approx(0.04, abs=1e-15)


def test_cosine_schedule_matches_formula():
    T = 200
    betas = gd.get_named_beta_schedule("cosine", T)
    assert betas.dtype == np.float64

    def abar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
    assert betas[-1] == 0.999  # alpha_bar(1) == 0, so the last beta is clipped
    assert np.all(betas > 0)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="linear"):
        gd.get_named_beta_schedule("sigmoid", 100)


def test_schedule_arrays_float64_closed_form():
    d = make_diffusion(1000)
    acp = hand_alphas_cumprod(d.betas)
    for name in ("alphas_cumprod", "posterior_variance", "posterior_mean_coef1",
                 "sqrt_recipm1_alphas_cumprod", "posterior_log_variance_clipped"):
        assert getattr(d, name).dtype == np.float64, name
    np.testing.assert_allclose(d.alphas_cumprod, acp, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev, np.concatenate([[1.0], acp[:-1]]), rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_next, np.concatenate([acp[1:], [0.0]]), rtol=1e-12)
    np.testing.assert_allclose(d.sqrt_recip_alphas_cumprod, 1 / np.sqrt(acp), rtol=1e-12)
    np.testing.assert_allclose(d.log_one_minus_alphas_cumprod, np.log(1 - acp), rtol=1e-12)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(d.posterior_variance[1]))
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(d.posterior_variance[1:]))


# ---------------------------------------------------------------------------
# forward process and posterior
# ---------------------------------------------------------------------------

def test_q_sample_matches_hand_computation():
    d = make_diffusion(1000)
    acp = hand_alphas_cumprod(d.betas)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 17, 500, 999])
    out = d.q_sample(x0.float(), t, noise=noise.float())
    a = torch.tensor(acp[t.numpy()]).view(-1, 1, 1, 1)
    expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)

    mean, var, log_var = d.q_mean_variance(x0.float(), t)
    torch.testing.assert_close(mean.double(), a.sqrt() * x0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), (1 - a).expand_as(x0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(log_var.double(), torch.log(1 - a).expand_as(x0), rtol=1e-5, atol=1e-6)


def test_q_posterior_matches_closed_form():
    d = make_diffusion(1000, schedule="cosine")
    betas = d.betas
    acp = hand_alphas_cumprod(betas)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    xt = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 250, 998])
    mean, var, log_var = d.q_posterior_mean_variance(x0.float(), xt.float(), t)

    tn = t.numpy()
    b = betas[tn]
    c1 = np.sqrt(acp_prev[tn]) * b / (1 - acp[tn])
    c2 = np.sqrt(1 - b) * (1 - acp_prev[tn]) / (1 - acp[tn])
    post_var = b * (1 - acp_prev[tn]) / (1 - acp[tn])
    v = lambda arr: torch.tensor(arr).view(-1, 1, 1, 1)  # noqa: E731
    torch.testing.assert_close(mean.double(), v(c1) * x0 + v(c2) * xt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), v(post_var).expand_as(x0), rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(log_var.double(), v(np.log(post_var)).expand_as(x0), rtol=1e-5, atol=1e-5)


def test_xstart_eps_conversions_invert_q_sample():
    d = make_diffusion(1000)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 2, 4, 4, generator=gen)
    noise = torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([3, 300, 900])
    xt = d.q_sample(x0, t, noise=noise)
    torch.testing.assert_close(d._predict_xstart_from_eps(xt, t, noise), x0, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(d._predict_eps_from_xstart(xt, t, x0), noise, rtol=1e-3, atol=2e-3)


# ---------------------------------------------------------------------------
# Gaussian utilities
# ---------------------------------------------------------------------------

def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()),
        torch.distributions.Normal(m2, (0.5 * lv2).exp()),
    )
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    # Scalar second distribution (the prior term uses N(0, 1)).
    ref0 = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), ref0.double(), rtol=1e-10, atol=1e-12)


def test_approx_cdf_close_to_exact():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 1e-3


def test_continuous_log_likelihood():
    gen = torch.Generator().manual_seed(4)
    x, mu, ls = (torch.randn(20, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = torch.distributions.Normal(mu, ls.exp()).log_prob(x)
    torch.testing.assert_close(continuous_gaussian_log_likelihood(x, means=mu, log_scales=ls), ref)


def test_discretized_log_likelihood_vs_exact_cdf():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # all 8-bit values in [-1, 1]
    mean = torch.full_like(levels, 0.3)
    log_scale = torch.full_like(levels, math.log(0.5))
    ours = discretized_gaussian_log_likelihood(levels, means=mean, log_scales=log_scale)

    dist = torch.distributions.Normal(mean, log_scale.exp())
    upper = dist.cdf(levels + 1 / 255)
    lower = dist.cdf(levels - 1 / 255)
    prob = upper - lower
    prob[0] = upper[0]  # lowest bin extends to -inf
    prob[-1] = 1 - lower[-1]  # highest bin extends to +inf
    assert torch.allclose(ours.exp(), prob, atol=1e-3)
    # Edge bins specifically, and the distribution over bins sums to ~1.
    assert abs(ours[0].exp() - prob[0]) < 1e-3 and abs(ours[-1].exp() - prob[-1]) < 1e-3
    assert ours.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_discretized_log_likelihood_clamps():
    x = torch.tensor([0.0, 1.0, -1.0])
    means = torch.tensor([50.0, -50.0, 50.0])
    ll = discretized_gaussian_log_likelihood(x, means=means, log_scales=torch.zeros(3))
    assert torch.isfinite(ll).all()
    assert torch.allclose(ll, torch.full((3,), math.log(1e-12)), atol=1e-3)


# ---------------------------------------------------------------------------
# reverse process
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("v_value", [-1.0, 1.0])
def test_learned_range_extremes(v_value):
    d = make_diffusion(100)
    x = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 10, 99])
    model = lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, v_value)], 1)  # noqa: E731
    out = d.p_mean_variance(model, x, t)
    tn = t.numpy()
    betas = d.betas
    acp = hand_alphas_cumprod(betas)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    post = betas * (1 - acp_prev) / (1 - acp)
    post_clipped = np.concatenate([[post[1]], post[1:]])
    expected = np.log(betas[tn]) if v_value == 1.0 else np.log(post_clipped[tn])
    torch.testing.assert_close(
        out["log_variance"], torch.tensor(expected, dtype=torch.float32).view(-1, 1, 1, 1).expand_as(x),
        rtol=1e-5, atol=1e-5,
    )
    torch.testing.assert_close(out["variance"], out["log_variance"].exp())


def test_fixed_variances():
    x = torch.randn(2, 1, 2, 2)
    t = torch.tensor([0, 50])
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    large = make_diffusion(100, var=gd.ModelVarType.FIXED_LARGE).p_mean_variance(model, x, t)
    small = make_diffusion(100, var=gd.ModelVarType.FIXED_SMALL).p_mean_variance(model, x, t)
    d = make_diffusion(100)
    assert large["variance"][0].flatten()[0].item() == pytest.approx(d.posterior_variance[1], rel=1e-5)
    assert large["variance"][1].flatten()[0].item() == pytest.approx(d.betas[50], rel=1e-5)
    assert small["variance"][1].flatten()[0].item() == pytest.approx(d.posterior_variance[50], rel=1e-5)
    assert small["log_variance"][0].flatten()[0].item() == pytest.approx(math.log(d.posterior_variance[1]), rel=1e-5)


def test_p_sample_adds_scaled_noise_except_at_zero():
    d = make_diffusion(100)
    x = torch.randn(2, 2, 3, 3)
    model = SplitModel(channels=2)
    t = torch.tensor([40, 0])
    torch.manual_seed(5)
    out = d.p_sample(model, x, t)
    with torch.no_grad():
        pmv = d.p_mean_variance(model, x, t)
    torch.manual_seed(5)
    noise = torch.randn_like(x)
    expected = pmv["mean"].clone()
    expected[0] += (0.5 * pmv["log_variance"][0]).exp() * noise[0]
    torch.testing.assert_close(out["sample"], expected)
    torch.testing.assert_close(out["sample"][1], pmv["mean"][1])  # no noise at t == 0


def test_cond_fn_shifts_mean_by_variance_times_gradient():
    d = make_diffusion(100)
    x = torch.randn(2, 2, 3, 3)
    t = torch.tensor([40, 7])
    model = SplitModel(channels=2)
    grad = lambda x, t, **kw: torch.full_like(x, 0.7)  # noqa: E731
    torch.manual_seed(6)
    plain = d.p_sample(model, x, t)["sample"]
    torch.manual_seed(6)
    guided = d.p_sample(model, x, t, cond_fn=grad)["sample"]
    var = d.p_mean_variance(model, x, t)["variance"]
    torch.testing.assert_close(guided - plain, 0.7 * var, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# training losses
# ---------------------------------------------------------------------------

def test_training_losses_mse_and_vb():
    torch.manual_seed(7)
    d = make_diffusion(1000)
    model = SplitModel()
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 5, 400, 999])
    terms = d.training_losses(model, x0, t, noise=noise)
    assert set(terms) >= {"loss", "mse", "vb"}
    for v in terms.values():
        assert v.shape == (4,)

    x_t = d.q_sample(x0, t, noise=noise)
    eps_pred = model(x_t, t)[:, :3]
    torch.testing.assert_close(terms["mse"], ((eps_pred - noise) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])

    # For t > 0 the vb term is KL(true posterior || model) in bits, averaged.
    out = model(x_t, t)
    with torch.no_grad():
        pmv = d.p_mean_variance(lambda *a: out, x_t, t, clip_denoised=False)
        true_mean, _, true_logvar = d.q_posterior_mean_variance(x0, x_t, t)
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(true_mean.double(), (0.5 * true_logvar.double()).exp()),
            torch.distributions.Normal(pmv["mean"].double(), (0.5 * pmv["log_variance"].double()).exp()),
        ).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(terms["vb"][1:].double(), kl[1:], rtol=1e-3, atol=1e-5)


def test_vb_gradient_only_reaches_variance_branch():
    torch.manual_seed(8)
    d = make_diffusion(1000)
    model = SplitModel()
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    t = torch.tensor([0, 10, 300, 700])
    terms = d.training_losses(model, x0, t)
    terms["vb"].sum().backward()
    for p in model.eps_conv.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.v_conv.parameters())

    model.zero_grad(set_to_none=True)
    terms = d.training_losses(model, x0, t)
    terms["mse"].sum().backward()
    assert model.eps_conv.weight.grad.abs().sum() > 0
    v_grad = model.v_conv.weight.grad
    assert v_grad is None or torch.count_nonzero(v_grad) == 0

    # Sanity check of the test itself: without the detach, the same VB term
    # would push gradients into the eps branch.
    model.zero_grad(set_to_none=True)
    noise = torch.randn_like(x0)
    x_t = d.q_sample(x0, t, noise=noise)
    vb = d._vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"]
    vb.sum().backward()
    assert model.eps_conv.weight.grad.abs().sum() > 0


def test_rescaled_mse_and_kl_losses():
    model = SplitModel()
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 100, 249])
    plain = create_diffusion("250").training_losses(model, x0, t, noise=noise)
    rescaled = create_diffusion("250", rescale_learned_sigmas=True).training_losses(model, x0, t, noise=noise)
    assert create_diffusion("250", rescale_learned_sigmas=True).loss_type == gd.LossType.RESCALED_MSE
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * 0.25)
    torch.testing.assert_close(rescaled["mse"], plain["mse"])

    kl_diff = SpacedDiffusion(
        use_timesteps=space_timesteps(1000, "250"), betas=gd.get_named_beta_schedule("linear", 1000),
        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.KL,
    )
    kl_terms = kl_diff.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(kl_terms["loss"], plain["vb"])  # MSE path's vb detaches only the mean
    rkl = create_diffusion("250", use_kl=True)  # the reference's use_kl: the rescaled KL
    assert rkl.loss_type == gd.LossType.RESCALED_KL and rkl.loss_type.is_vb()
    torch.testing.assert_close(rkl.training_losses(model, x0, t, noise=noise)["loss"], kl_terms["loss"] * 250)


def test_use_kl_loss_is_num_timesteps_times_the_closed_form_kl():
    """create_diffusion(use_kl=True) (the reference's RESCALED_KL): at t > 0 the loss is T x the mean KL, in
    bits, between the true posterior q(x_{t-1} | x_t, x_0) and the model's Gaussian, computed here in float64
    numpy from the schedule formulas, with the learned variance interpolated in the log domain."""
    torch.manual_seed(0)
    model = SplitModel()
    d = create_diffusion("250", use_kl=True)
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 137])
    model = model.double()
    loss = d.training_losses(model, x0, t, noise=noise)["loss"].detach().numpy()

    full = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    abar = full[sorted(space_timesteps(1000, "250"))]
    abar_prev = np.append(1.0, abar[:-1])
    beta = 1 - abar / abar_prev
    for i, step in enumerate(t.tolist()):
        a, a_prev, b = abar[step], abar_prev[step], beta[step]
        x_0, e = x0[i].numpy(), noise[i].numpy()
        x_t = np.sqrt(a) * x_0 + np.sqrt(1 - a) * e
        out = model(torch.from_numpy(x_t)[None], torch.tensor([step]))[0].detach().numpy()
        eps, v = out[:3], out[3:]
        post_var = b * (1 - a_prev) / (1 - a)
        mean_q = np.sqrt(a_prev) * b / (1 - a) * x_0 + np.sqrt(1 - b) * (1 - a_prev) / (1 - a) * x_t
        x0_pred = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
        mean_p = np.sqrt(a_prev) * b / (1 - a) * x0_pred + np.sqrt(1 - b) * (1 - a_prev) / (1 - a) * x_t
        frac = (v + 1) / 2
        log_var_p = frac * np.log(b) + (1 - frac) * np.log(post_var)
        kl = 0.5 * (log_var_p - np.log(post_var) + (post_var + (mean_q - mean_p) ** 2) / np.exp(log_var_p) - 1)
        # rtol 1e-5: the diffusion's schedule tables are float32 on the device (the formulas here float64)
        np.testing.assert_allclose(loss[i], 250 * kl.mean() / np.log(2.0), rtol=1e-5)


def test_cosine_schedule_has_the_reference_name_too():
    np.testing.assert_array_equal(gd.get_named_beta_schedule("squaredcos_cap_v2", 1000),
                                  gd.get_named_beta_schedule("cosine", 1000))
    assert create_diffusion("10", noise_schedule="squaredcos_cap_v2").num_timesteps == 10


def test_training_losses_passes_model_kwargs():
    d = create_diffusion("10")
    model = SplitModel()
    calls = {}

    def wrapped(x, t, y=None):
        calls["y"] = y
        calls["t"] = t
        return model(x, t)

    d.training_losses(wrapped, torch.zeros(2, 3, 2, 2), torch.tensor([0, 9]), model_kwargs={"y": "label"})
    assert calls["y"] == "label"
    assert calls["t"].tolist() == [d.timestep_map[0], d.timestep_map[9]]


def test_calc_bpd_loop_shapes():
    d = create_diffusion("8")
    model = ZeroDataEps(make_diffusion(1000).alphas_cumprod)
    x0 = torch.zeros(2, 1, 2, 2)
    out = d.calc_bpd_loop(model, x0)
    assert out["vb"].shape == (2, 8) and out["mse"].shape == (2, 8) and out["xstart_mse"].shape == (2, 8)
    assert torch.isfinite(out["total_bpd"]).all()
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert torch.allclose(out["xstart_mse"], torch.zeros(2, 8), atol=1e-8)


# ---------------------------------------------------------------------------
# respacing
# ---------------------------------------------------------------------------

def test_space_timesteps_even():
    steps = space_timesteps(1000, "250")
    assert isinstance(steps, set) and len(steps) == 250
    assert min(steps) == 0 and max(steps) == 999
    assert space_timesteps(1000, [1000]) == set(range(1000))
    assert space_timesteps(1000, "1000") == set(range(1000))


def test_space_timesteps_ddim():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")  # stride 1 -> 1000 steps, stride 2 -> 500
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim2000")
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddimX")


def test_space_timesteps_sections():
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    first, second, third = steps[:10], steps[10:25], steps[25:]
    assert first[0] == 0 and first[-1] == 99 and all(s < 100 for s in first)
    assert second[0] == 100 and second[-1] == 199
    assert third[0] == 200 and third[-1] == 299
    gaps = np.diff(third)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced up to rounding
    assert space_timesteps(300, [10, 15, 20]) == set(steps)


def test_space_timesteps_errors():
    with pytest.raises(ValueError):
        space_timesteps(100, "200")
    with pytest.raises(ValueError):
        space_timesteps(100, "60,60")  # sections of 50 steps each
    with pytest.raises(ValueError):
        space_timesteps(100, "ten")
    with pytest.raises(ValueError):
        space_timesteps(100, "0")


def test_spaced_diffusion_schedule_and_timestep_map():
    base = make_diffusion(1000)
    d = create_diffusion("ddim50")
    assert d.num_timesteps == 50 and d.original_num_steps == 1000
    kept = sorted(range(0, 1000, 20))
    assert d.timestep_map == kept
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    expected_betas = 1 - base.alphas_cumprod[kept] / np.concatenate([[1.0], base.alphas_cumprod[kept][:-1]])
    np.testing.assert_allclose(d.betas, expected_betas, rtol=1e-12)
    # Full "respacing" reproduces the original schedule.
    np.testing.assert_allclose(create_diffusion(None).betas, base.betas, rtol=1e-10)


def test_wrapped_model_receives_original_timesteps():
    d = create_diffusion("25")
    rec = Recorder()
    x = torch.randn(2, 1, 2, 2)
    list(d.p_sample_loop_progressive(rec, x.shape, noise=x))
    seen = [t.tolist() for t in rec.seen]
    assert seen == [[d.timestep_map[i]] * 2 for i in reversed(range(25))]
    assert seen[0] == [999, 999] and seen[-1] == [0, 0]


def test_wrapped_bound_method_and_cond_fn():
    class CfgModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(0.5))
            self.seen = []

        def forward(self, x, t, y):
            return torch.cat([self.w * x, torch.zeros_like(x)], 1)

        def forward_with_cfg(self, x, t, y, cfg_scale):
            self.seen.append((t.tolist(), y, cfg_scale))
            return self.forward(x, t, y)

    model = CfgModel()
    d = create_diffusion("ddim10")
    cond_ts = []

    def cond_fn(x, t, **kw):
        cond_ts.append(t.tolist())
        return torch.zeros_like(x)

    kwargs = dict(y="lbl", cfg_scale=4.0)
    sample = d.p_sample_loop(model.forward_with_cfg, (1, 1, 2, 2), cond_fn=cond_fn, model_kwargs=kwargs)
    assert sample.shape == (1, 1, 2, 2)
    assert model.seen[0] == ([900], "lbl", 4.0) and model.seen[-1] == ([0], "lbl", 4.0)
    assert cond_ts[0] == [900] and len(cond_ts) == 10
    d.ddim_sample_loop(model.forward_with_cfg, (1, 1, 2, 2), cond_fn=cond_fn, model_kwargs=kwargs)


# ---------------------------------------------------------------------------
# sampling loops
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["p_sample_loop", "ddim_sample_loop"])
def test_zero_data_model_samples_zero(sampler):
    d = create_diffusion("100")
    model = ZeroDataEps(make_diffusion(1000).alphas_cumprod)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    out = getattr(d, sampler)(model, noise.shape, noise=noise)
    assert out.shape == noise.shape
    assert out.abs().max() < 1e-4


def test_zero_data_model_full_schedule_ddpm():
    d = create_diffusion("")
    assert d.num_timesteps == 1000
    model = ZeroDataEps(d.alphas_cumprod, v_value=0.3)
    noise = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(10))
    out = d.p_sample_loop(model, noise.shape, noise=noise)
    assert out.abs().max() < 1e-4


def test_sampling_is_reproducible():
    model = SplitModel(channels=2)
    d = create_diffusion("20")
    noise = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(11))

    def run(fn, **kw):
        torch.manual_seed(123)
        return fn(model, noise.shape, noise=noise.clone(), **kw)

    a, b = run(d.p_sample_loop), run(d.p_sample_loop)
    assert torch.equal(a, b)
    for eta in (0.0, 0.5):
        a, b = run(d.ddim_sample_loop, eta=eta), run(d.ddim_sample_loop, eta=eta)
        assert torch.equal(a, b)
    # Without a noise argument the seed alone determines the result.
    torch.manual_seed(5)
    a = d.p_sample_loop(model, (1, 2, 3, 3))
    torch.manual_seed(5)
    b = d.p_sample_loop(model, (1, 2, 3, 3))
    assert torch.equal(a, b)
    # DDIM with eta=0 ignores the global RNG entirely.
    torch.manual_seed(1)
    a = d.ddim_sample_loop(model, noise.shape, noise=noise)
    torch.manual_seed(2)
    b = d.ddim_sample_loop(model, noise.shape, noise=noise)
    assert torch.equal(a, b)


def test_ddim_step_closed_form():
    d = create_diffusion("ddim10")
    model = SplitModel(channels=2)
    x = torch.randn(2, 2, 3, 3)
    t = torch.tensor([5, 9])
    out = d.ddim_sample(model, x, t, clip_denoised=False)
    acp = torch.tensor(d.alphas_cumprod, dtype=torch.float64)
    abp = torch.tensor(d.alphas_cumprod_prev, dtype=torch.float64)
    eps = model(x, torch.tensor([d.timestep_map[5], d.timestep_map[9]]))[:, :2].double()
    a, ap = acp[t].view(-1, 1, 1, 1), abp[t].view(-1, 1, 1, 1)
    x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
    expected = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
    torch.testing.assert_close(out["sample"].double(), expected, rtol=1e-4, atol=1e-4)

    # The reverse (noising) step uses alphas_cumprod_next in the same formula.
    abn = torch.tensor(d.alphas_cumprod_next, dtype=torch.float64)[t].view(-1, 1, 1, 1)
    back = d.ddim_reverse_sample(model, x, t, clip_denoised=False)["sample"]
    torch.testing.assert_close(back.double(), abn.sqrt() * x0 + (1 - abn).sqrt() * eps, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        d.ddim_reverse_sample(model, x, t, eta=0.5)


def test_progressive_and_progress_bar(capsys):
    d = create_diffusion("12")
    model = SplitModel(channels=1)
    items = list(d.p_sample_loop_progressive(model, (1, 1, 2, 2)))
    assert len(items) == d.num_timesteps == 12
    assert all(set(item) >= {"sample", "pred_xstart"} for item in items)
    items = list(d.ddim_sample_loop_progressive(model, (1, 1, 2, 2)))
    assert len(items) == 12
    out = d.p_sample_loop(model, (1, 1, 2, 2), progress=True)
    assert out.shape == (1, 1, 2, 2)
    assert "12/12" in capsys.readouterr().err
    assert d.ddim_sample_loop(model, (1, 1, 2, 2), progress=True).shape == (1, 1, 2, 2)


def test_sampling_no_grad_and_device():
    d = create_diffusion("5")
    model = SplitModel(channels=1)
    out = d.p_sample_loop(model, (1, 1, 2, 2))
    assert not out.requires_grad and out.device.type == "cpu"
    plain_fn = lambda x, t: torch.cat([x, x], 1)  # noqa: E731  (no parameters: defaults to cpu)
    assert d.ddim_sample_loop(plain_fn, (1, 1, 2, 2)).device.type == "cpu"


# ---------------------------------------------------------------------------
# factory and samplers
# ---------------------------------------------------------------------------

def test_create_diffusion_defaults_and_options():
    d = create_diffusion(timestep_respacing="")
    assert isinstance(d, SpacedDiffusion)
    assert d.num_timesteps == 1000 and d.original_num_steps == 1000
    assert d.model_var_type == gd.ModelVarType.LEARNED_RANGE
    assert d.model_mean_type == gd.ModelMeanType.EPSILON
    assert d.loss_type == gd.LossType.MSE
    assert create_diffusion("ddim50").num_timesteps == 50
    assert create_diffusion(None, diffusion_steps=100).num_timesteps == 100

    d = create_diffusion("10", learn_sigma=False, sigma_small=True, predict_xstart=True, noise_schedule="cosine")
    assert d.model_var_type == gd.ModelVarType.FIXED_SMALL
    assert d.model_mean_type == gd.ModelMeanType.START_X
    assert create_diffusion("10", learn_sigma=False).model_var_type == gd.ModelVarType.FIXED_LARGE
    with pytest.raises(ValueError):
        create_diffusion("10", noise_schedule="bogus")


def test_uniform_sampler():
    d = create_diffusion("50")
    sampler = create_named_schedule_sampler("uniform", d)
    assert isinstance(sampler, UniformSampler)
    t, w = sampler.sample(64, torch.device("cpu"))
    assert t.shape == (64,) and t.dtype == torch.long
    assert int(t.min()) >= 0 and int(t.max()) < 50
    assert torch.equal(w, torch.ones(64))
    with pytest.raises(NotImplementedError):
        create_named_schedule_sampler("nope", d)


def test_schedule_tables_live_on_the_device_once():
    """_extract_into_tensor gathers from a float32 copy of the table cached per device (no host-device
    copy per call) and returns exactly the float64 values cast to float32."""
    d = create_diffusion(timestep_respacing="")
    t = torch.tensor([0, 5, 999, 5])
    got = gd._extract_into_tensor(d.sqrt_alphas_cumprod, t, (4, 2, 3))
    want = torch.from_numpy(d.sqrt_alphas_cumprod[t.numpy()]).float()
    assert got.shape == (4, 2, 3) and got.dtype == torch.float32
    assert torch.equal(got[:, 0, 0], want) and torch.equal(got[:, 1, 2], want)
    table = gd._device_table(d.sqrt_alphas_cumprod, t.device)
    assert gd._device_table(d.sqrt_alphas_cumprod.copy(), t.device) is table  # same values: same tensor
    assert gd._device_table(d.betas, t.device) is not table


def test_respaced_wrapper_maps_timesteps_with_a_cached_map():
    d = create_diffusion(timestep_respacing="10")
    seen = []
    wrapped = d._wrap_model(lambda x, t: seen.append(t) or x)
    for _ in range(2):
        wrapped(torch.zeros(3), torch.tensor([0, 4, 9]))
    assert [t.tolist() for t in seen] == [[d.timestep_map[i] for i in (0, 4, 9)]] * 2
    assert len(d._timestep_maps) == 1 and d._wrap_model(lambda x, t: x)._maps is d._timestep_maps
