"""Tests for ditlab/probe.py: the per-timestep errors, the signal/outlier split at the norm inputs, the
correlations and the readers of metrics.jsonl / embeddings.jsonl."""

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from diffusion import create_diffusion
from ditlab.probe import (
    TIMESTEP_GRID, image_data, probe, signal_and_outlier, timestep_batch, timestep_errors, toy_data,
)
from ditlab.studies.toy_report import log_correlations
from ditlab.toy.task import TOY_MODEL
from models import build_model


def tiny_model(normalization="layer-norm", seed=0):
    torch.manual_seed(seed)
    return build_model("DiT-XS/1", depth=2, hidden_size=32, num_heads=2, normalization=normalization, **TOY_MODEL)


def linear_alpha_bar_float64():
    """alpha_bar_t of the DDPM linear schedule, computed here independently of diffusion/ (float64)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas), betas


@pytest.mark.parametrize("normalization", ["layer-norm", "none"])
def test_zero_output_model_scores_exactly_one_at_every_t(normalization):
    """A new (adaLN-Zero) DiT outputs exactly zero: its eps error and variance error are exactly 1."""
    model = tiny_model(normalization)
    diffusion = create_diffusion("")
    x_t, t, _ = timestep_batch(diffusion, TIMESTEP_GRID, 16)
    y = torch.zeros(len(t), dtype=torch.long)
    assert torch.count_nonzero(model(x_t, t, y)) == 0
    errors, _ = probe(model, diffusion, num=16)
    assert [r["t"] for r in errors] == list(TIMESTEP_GRID)
    for r in errors:
        assert r["eps_rel_error"] == 1.0 and r["var_rel_error"] == 1.0, r


def test_probe_batch_and_target_against_float64():
    """x_t = sqrt(1 - alpha_bar_t) eps with x0 = 0, from an independent float64 schedule; the target is
    the exact noise of the float32 input, equal to eps up to float32 rounding; fixed noise."""
    diffusion = create_diffusion("")
    timesteps = (0, 7, 999)
    x_t, t, target = timestep_batch(diffusion, timesteps, 5, seed=3)
    abar, _ = linear_alpha_bar_float64()
    eps = torch.randn(5, 2, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    assert t.tolist() == [0] * 5 + [7] * 5 + [999] * 5
    assert x_t.dtype == torch.float32 and target.dtype == torch.float64
    for i, step in enumerate(timesteps):
        scale = np.sqrt(1.0 - abar[step])
        expected = (scale * eps).astype(np.float32)
        np.testing.assert_array_equal(x_t[5 * i:5 * (i + 1)].numpy(), expected)
        np.testing.assert_allclose(target[5 * i:5 * (i + 1)].numpy(), expected.astype(np.float64) / scale, rtol=1e-14)
        np.testing.assert_allclose(target[5 * i:5 * (i + 1)].numpy(), eps, rtol=1e-6, atol=1e-7)
    again = timestep_batch(diffusion, timesteps, 5, seed=3)
    assert torch.equal(again[0], x_t)


def test_timestep_errors_against_numpy():
    """eps error, implied-x0 RMSE and the learned-variance errors of a random output, recomputed in numpy."""
    diffusion = create_diffusion("")
    abar, betas = linear_alpha_bar_float64()
    timesteps = (0, 1, 50, 999)
    x_t, t, target = timestep_batch(diffusion, timesteps, 6)
    output = torch.randn(len(t), 4, 2, 2, generator=torch.Generator().manual_seed(1))
    rows = timestep_errors(output, x_t, t, target, diffusion)
    out, xt = output.double().numpy(), x_t.double().numpy()
    post = betas * (1.0 - np.append(1.0, abar[:-1])) / (1.0 - abar)  # posterior variance beta~_t
    for i, (row, step) in enumerate(zip(rows, timesteps)):
        sl = slice(6 * i, 6 * (i + 1))
        eps_pred, v = out[sl, :2], out[sl, 2:]
        eps = xt[sl] / np.sqrt(1 - abar[step])
        assert row["t"] == step
        np.testing.assert_allclose(row["eps_rel_error"], np.linalg.norm(eps_pred - eps) / np.linalg.norm(eps), rtol=1e-12)
        x0 = (xt[sl] - np.sqrt(1 - abar[step]) * eps_pred) / np.sqrt(abar[step])
        np.testing.assert_allclose(row["x0_rmse"], np.sqrt(np.mean(x0 ** 2)), rtol=1e-12)
        true_log = np.log(post[max(step, 1)])  # clipped at t = 0, like the sampler's learned range
        log_var = (v + 1) / 2 * np.log(betas[step]) + (1 - v) / 2 * true_log
        np.testing.assert_allclose(row["var_log_rmse"], np.sqrt(np.mean((log_var - true_log) ** 2)), rtol=1e-10)
        np.testing.assert_allclose(row["var_rel_error"], np.sqrt(np.mean(((v + 1) / 2) ** 2)) / 0.5, rtol=1e-12)
    # The perfect prediction (eps itself, v = -1) scores zero everywhere.
    perfect = torch.cat([target.float(), -torch.ones_like(x_t)], dim=1)
    for row in timestep_errors(perfect, x_t, t, target, diffusion):
        assert row["eps_rel_error"] < 1e-6 and row["var_rel_error"] == 0.0 and row["var_log_rmse"] == 0.0


def test_signal_and_outlier_on_a_constructed_embedding():
    """h = constant (an outlier of size M in channel 5 plus small offsets) + a zero-mean signal: the split
    recovers M, the channel, and |s_c| / M as computed directly."""
    gen = torch.Generator().manual_seed(0)
    num, tokens, dim, big = 200, 4, 16, 40.0
    const = 0.1 * torch.randn(1, tokens, dim, generator=gen, dtype=torch.float64)
    const[..., 5] += big
    signal = 0.3 * torch.randn(num, tokens, dim, generator=gen, dtype=torch.float64)
    signal -= signal.mean(dim=0)  # exactly zero mean over draws, so the split is exact
    got = signal_and_outlier((const + signal).float())
    h = (const + signal).float().double().numpy()
    m = h.mean(axis=0)
    s = h - m
    sc = s - s.mean(axis=-1, keepdims=True)
    mc = m - m.mean(axis=-1, keepdims=True)
    signal_norm = np.sqrt(np.mean(np.sum(sc ** 2, axis=-1)))
    assert got["outlier_channel"] == 5
    np.testing.assert_allclose(got["outlier"], np.sqrt(np.mean(m[:, 5] ** 2)), rtol=1e-12)
    np.testing.assert_allclose(got["signal_norm"], signal_norm, rtol=1e-12)
    np.testing.assert_allclose(got["const_norm"], np.sqrt(np.mean(np.sum(mc ** 2, axis=-1))), rtol=1e-12)
    np.testing.assert_allclose(got["signal_to_outlier"], signal_norm / got["outlier"], rtol=1e-12)
    assert got["outlier"] == pytest.approx(big, rel=0.01)


def test_probe_embedding_rows_cover_every_layer_and_t():
    model = tiny_model()
    diffusion = create_diffusion("")
    _, rows = probe(model, diffusion, num=8, timesteps=(0, 10))
    outliers = {(r["layer"], r["t"]) for r in rows if r["kind"] == "outliers"}
    norms = {(r["layer"], r["t"]) for r in rows if r["kind"] == "norm_input"}
    assert outliers == {(n, t) for n in ("embed", "block.0", "block.1") for t in (0, 10)}
    assert norms == {(n, t) for n in ("block.0.norm1", "block.0.norm2", "block.1.norm1", "block.1.norm2", "final.norm")
                     for t in (0, 10)}
    # the norm input of block 0 is the embedding: its outlier channel is the embedding's loudest constant channel
    assert model.training  # the probe restores the mode it found


def test_log_correlations_match_scipy():
    x = np.array([1e-3, 3e-3, 2e-2, 5e-2, 0.4, 0.9])
    y = np.array([2e-4, 1e-4, 5e-3, 4e-2, 0.2, 0.25])
    pearson, spearman = log_correlations(x, y)
    assert pearson == pytest.approx(scipy_stats.pearsonr(np.log(x), np.log(y))[0], rel=1e-12)
    assert spearman == pytest.approx(scipy_stats.spearmanr(x, y)[0], rel=1e-12)


def test_image_probe_equals_toy_probe_on_a_toy_model():
    """One implementation: probing a toy model through image_data (zero images, label 0, the probe seed's
    noise) gives exactly the toy probe's errors and embedding rows."""
    model, diffusion = tiny_model(seed=3), create_diffusion("")
    with torch.no_grad():  # leave adaLN-Zero: a model that outputs something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    toy_errors, toy_rows = probe(model, diffusion, num=12)
    img_errors, img_rows = probe(model, diffusion, data=image_data(torch.zeros(12, 2, 2, 2), torch.zeros(12)))
    assert img_rows == toy_rows
    for a, b in zip(toy_errors, img_errors):
        assert {k: a[k] for k in b} == b  # the toy's rows add its closed-form keys; the shared ones are equal


def test_toy_data_gaussian_keeps_the_zero_task_noise_and_draws_images_of_its_std():
    zero, gauss = toy_data(4000), toy_data(4000, data_std=0.5)
    assert torch.equal(zero.eps, gauss.eps) and torch.count_nonzero(zero.x0) == 0
    diffusion = create_diffusion("")
    x_t, t, target = timestep_batch(diffusion, TIMESTEP_GRID, zero)
    for r in timestep_errors(torch.cat([target, torch.zeros_like(target)], 1), x_t, t, target, diffusion, zero):
        assert r["eps_rel_error"] == 0 and r["eps_opt_error"] < 1e-12  # all-zero data: the optimum is exact
    assert gauss.x0.std().item() == pytest.approx(0.5, rel=0.03) and gauss.data_std == 0.5


def test_gaussian_data_excess_error_against_the_closed_form():
    """For Gaussian data the ideal denoiser eps* = sqrt(1 - abar) / (abar S^2 + 1 - abar) x_t is a linear gain:
    a "model" that outputs it has zero excess and the irreducible error sqrt(abar S^2 / (abar S^2 + 1 - abar))
    (float64 schedule computed here; 20,000 draws, so within 2%); a model that outputs x_t / sqrt(1 - abar)
    (the all-zero task's ideal) has an excess equal to its distance from eps*, computed in numpy."""
    diffusion, S = create_diffusion(""), 0.7
    data = toy_data(20_000, data_std=S)
    abar, _ = linear_alpha_bar_float64()
    x_t, t, target = timestep_batch(diffusion, TIMESTEP_GRID, data)
    a2 = torch.as_tensor(abar[t.numpy()]).view(-1, 1, 1, 1)
    gain = (1 - a2).sqrt() / (a2 * S ** 2 + 1 - a2)
    ideal = torch.cat([gain * x_t.double(), torch.zeros_like(x_t, dtype=torch.float64)], 1)
    for r in timestep_errors(ideal, x_t, t, target, diffusion, data):
        a = abar[r["t"]]
        assert r["eps_excess_error"] < 1e-12 and r["x0_excess_rmse"] < 1e-9 * max(1, 1 / np.sqrt(a))
        assert r["eps_rel_error"] == pytest.approx(np.sqrt(a * S ** 2 / (a * S ** 2 + 1 - a)), rel=0.02, abs=1e-6)
        assert r["eps_opt_error"] == pytest.approx(r["eps_rel_error"], rel=1e-9, abs=1e-12)
    naive = torch.cat([x_t.double() / (1 - a2).sqrt(), torch.zeros_like(x_t, dtype=torch.float64)], 1)
    for r in timestep_errors(naive, x_t, t, target, diffusion, data):
        m = (t == r["t"]).numpy()
        xt, eps = x_t[m].double().numpy(), target[m].numpy()
        a = abar[r["t"]]
        excess = np.linalg.norm(xt / np.sqrt(1 - a) - np.sqrt(1 - a) / (a * S ** 2 + 1 - a) * xt) / np.linalg.norm(eps)
        assert r["eps_excess_error"] == pytest.approx(excess, rel=1e-9)
