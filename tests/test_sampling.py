"""Tests for ditlab/sampling.py's samplers (ddpm, ddim, dpm-solver++, unipc) against closed-form answers, their
flags in sample.py, train_toy.py and train.py, and their errors."""

import json
import os

import pytest
import torch

import sample
import train
import train_toy
from diffusion import create_diffusion
from ditlab import sampling
from ditlab.errors import UsageError
from ditlab.toy.readers import load_metrics

MU, S = 0.3, 0.5  # the data: every value ~ N(MU, S^2), independently
SHAPE = (2, 2, 2)  # the toy's images


class GaussianDenoiser(torch.nn.Module):
    """The exact noise prediction for Gaussian data in the toy's shape, with the DiT call signature:
    x_t ~ N(a MU, a^2 S^2 + s^2) with a = sqrt(abar_t), s = sqrt(1 - abar_t), and E[eps | x_t] =
    s (x_t - a MU) / (a^2 S^2 + s^2), computed in float64. The learned-variance channels are `v`."""

    in_channels, input_size, num_classes = SHAPE[0], SHAPE[1], 1

    def __init__(self, v=-1.0):
        super().__init__()
        self.register_buffer("abar", torch.from_numpy(create_diffusion("").alphas_cumprod))
        self.v = v

    def forward(self, x, t, y):
        a, s = self.abar[t].sqrt().view(-1, 1, 1, 1), (1 - self.abar[t]).sqrt().view(-1, 1, 1, 1)
        eps = (s * (x.double() - a * MU) / (a**2 * S**2 + s**2)).float()
        return torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


def flow_endpoint(z):
    """Where the probability-flow ODE takes x_T = z for this data: it keeps the standardized value of
    x_t, so x_0 = MU + S (z - a_T MU) / sqrt(a_T^2 S^2 + s_T^2)."""
    abar = create_diffusion("").alphas_cumprod[-1]
    return MU + S * (z.double() - abar**0.5 * MU) / (abar * S**2 + 1 - abar) ** 0.5


def sample_error(sampler, steps, z, model=None):
    """Deterministic samplers: max |x_0 - exact ODE endpoint| per sample; DDPM (stochastic): error of the
    sampled mean and standard deviation against the data's MU and S."""
    torch.manual_seed(1)
    y = torch.zeros(len(z), dtype=torch.long)
    x = sampling.denoise(model or GaussianDenoiser(), create_diffusion(str(steps)), z, y, sampler).double()
    if sampler == "ddpm":
        return float(abs(x.mean() - MU) + abs(x.std() - S))
    return float((x - flow_endpoint(z)).abs().max())


@pytest.fixture(scope="module")
def z():
    return torch.randn(512, *SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_error_falls_as_steps_grow(sampler, z):
    errors = [sample_error(sampler, steps, z) for steps in (5, 10, 25, 50, 100)]
    assert all(a > b for a, b in zip(errors[:4], errors[1:4])), errors
    assert errors[-1] < errors[0] / 5, errors
    if sampler in sampling.SOLVERS:  # second-order solvers: close to the exact ODE solution by 50 steps
        assert errors[3] < 1e-2, errors


@pytest.mark.parametrize("sampler", sampling.SOLVERS)
def test_solvers_ignore_the_variance_channels_and_use_our_betas(sampler, z):
    assert sample_error(sampler, 10, z[:64], GaussianDenoiser(v=-1.0)) == sample_error(sampler, 10, z[:64],
                                                                                       GaussianDenoiser(v=1.0))
    diffusion = create_diffusion("20")
    scheduler = sampling.make_solver(sampler, diffusion)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), torch.from_numpy(create_diffusion("").alphas_cumprod),
                               rtol=1e-5, atol=0)
    assert len(scheduler.timesteps) == 20 and int(scheduler.timesteps[0]) == 999


def test_clip_denoised_clips_the_solvers_x0():
    """clip_denoised -> diffusers' thresholding with sample_max_value 1: x0 predictions clipped to [-1, 1]."""
    z = 3 * torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(3))
    y = torch.zeros(64, dtype=torch.long)
    model = GaussianDenoiser()
    free = sampling.denoise(model, create_diffusion("10"), z, y, "dpm-solver++")
    clipped = sampling.denoise(model, create_diffusion("10"), z, y, "dpm-solver++", clip_denoised=True)
    assert free.abs().max() > 1.2 and clipped.abs().max() <= 1 + 1e-5


def test_unknown_sampler_and_too_many_solver_steps_are_clear_errors(tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown sampler 'euler'; choose one of ddpm, ddim, dpm-solver"):
        sampling.denoise(GaussianDenoiser(), create_diffusion("5"), torch.zeros(1, *SHAPE), torch.zeros(1).long(),
                         "euler")
    with pytest.raises(SystemExit):
        sample.parse_args(["--sampler", "euler"])
    assert "invalid choice: 'euler'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_toy.parse_args(["--sampler", "heun"])
    assert "invalid choice: 'heun'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="at most 999 steps"):
        sample.main(["--sampler", "unipc", "--num-sampling-steps", "1000", "--out", str(tmp_path / "x.png")])
    with pytest.raises(UsageError, match="at most 999 steps, got --sampling-steps 1000"):
        train_toy.parse_args(["--sampler", "dpm-solver++"])  # the toy's default is 1000 steps: refused at once
    with pytest.raises(UsageError, match="at most 999 steps, got --sample-steps 1000"):
        train.parse_args(["--sample-sampler", "unipc", "--sample-steps", "1000"])
    with pytest.raises(UsageError, match="use at most 999 steps"):
        sampling.make_solver("dpm-solver++", create_diffusion("1000"))


@pytest.mark.parametrize("sampler", sampling.SOLVERS)
def test_train_toy_evaluates_with_the_sampler(tmp_path, sampler):
    run = train_toy.main(["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "16",
                          "--num-eval-samples", "8", "--sampling-steps", "10", "--threads", "1", "--preset", "cpu",
                          "--steps", "4", "--sampler", sampler, "--results-dir", str(tmp_path)])
    rows = load_metrics(run)  # the sample rows (the probe's timestep rows carry no sampler)
    assert rows and {r["sampler"] for r in rows} == {sampler} and all(r["sampling_steps"] == 10 for r in rows)
    assert json.load(open(os.path.join(run, "config.json")))["sampler"] == sampler


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_ddpm_from_the_global_rng_is_the_diffusions_own_loop_bit_for_bit(cfg_scale):
    """train.py's grids and train_toy.py's evaluation used diffusion.p_sample_loop (with the noise doubled
    for guidance); sampling.denoise without step_noise reproduces it exactly."""
    from test_sample import TINY, random_model

    model = random_model({**TINY, "normalization": "layer-norm"})
    labels, diffusion = torch.tensor([1, 5, 9]), create_diffusion("6")
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(4)
    if cfg_scale > 1:
        y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
        before = diffusion.p_sample_loop(model.forward_with_cfg, (6, 3, 8, 8), noise=torch.cat([noise, noise]),
                                         model_kwargs=dict(y=y, cfg_scale=cfg_scale))[:3]
    else:
        before = diffusion.p_sample_loop(model, noise.shape, noise=noise, model_kwargs=dict(y=labels))
    torch.manual_seed(4)
    now = sampling.denoise(model, diffusion, noise, labels, "ddpm", cfg_scale, clip_denoised=True)
    assert torch.equal(now, before)


def test_progress_bar_appears_only_once_a_loop_runs_long(monkeypatch, capsys):
    assert list(sampling.progress_bar(range(3), "quick", unit="img")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sampling, "PROGRESS_DELAY", 0)
    with sampling.progress_bar(desc="long", total=4, unit="img") as bar:
        bar.update(4)
    err = capsys.readouterr().err
    assert "long: 100%" in err and "4/4" in err and "img/s" in err
