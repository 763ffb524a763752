"""The per-timestep probe: errors of the denoiser at fixed noise over a timestep grid, and outlier
statistics at every norm input."""

import math

import torch

from ditlab.outliers import layer_stats
from ditlab.toy.task import TOY_CHANNELS, TOY_IMAGE_SIZE

#################################################################################
#             Per-timestep precision and embedding probes (no sampling)         #
#################################################################################

# Timesteps at which every probe measures the denoiser directly; roughly log-spaced, so the last few
# steps of the chain (which dominate the sampled error) are resolved as well as the noisy end.
TIMESTEP_GRID = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 999)
# The fixed probe noise: the same draws for every run, variant and seed (paired comparisons).
PROBE_SEED = 20_240
# Block-output statistics kept per (t, layer) (outliers.layer_stats computes them).
OUTLIER_KEYS = ("max_abs", "max_median_ratio", "rms_kurtosis", "massive_count", "argmax_channel", "argmax_share")


def timestep_batch(diffusion, timesteps, num, seed=PROBE_SEED):
    """The probe batch: `num` noise draws eps (the same for every t), x0 = 0, so x_t = sqrt(1 - alpha_bar_t) eps.

    Returns (x_t, t, target): x_t float32 (len(timesteps) * num, C, H, W) in timestep-major order, t (long),
    and the target float64 = x_t / sqrt(1 - alpha_bar_t), the exact noise of the float32 input (eps up to
    float32 rounding), so that no error floor comes from rounding the input."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(num, TOY_CHANNELS, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE, generator=gen, dtype=torch.float64)
    scale = torch.as_tensor(diffusion.sqrt_one_minus_alphas_cumprod[list(timesteps)], dtype=torch.float64)
    scale = scale.view(-1, 1, 1, 1, 1)
    x_t = (scale * eps).float()
    target = x_t.double() / scale
    t = torch.tensor(list(timesteps), dtype=torch.long).repeat_interleave(num)
    return x_t.flatten(0, 1), t, target.flatten(0, 1)


def timestep_errors(output, x_t, t, target, diffusion):
    """Per-timestep errors of a model's output on the probe batch (float64), one dict per timestep:

    eps_rel_error  ||eps_pred - eps|| / ||eps|| over the batch (1 for a model that outputs zero);
    x0_rmse        RMS of the implied x0 = (x_t - sqrt(1 - abar) eps_pred) / sqrt(abar), whose target is 0
                   (pixel units, like the sample error: one 8-bit level is 1/127.5);
    var_log_rmse   RMS of the learned log-variance minus the log of the true posterior variance beta~_t
                   (nats; at t = 0, where beta~ is 0, the clipped value the learned range and the sampler use);
    var_rel_error  the same distance in units of a zero output's (v = 0, halfway between log beta~_t and
                   log beta_t): RMS of (v + 1) / 2 over 1/2, 1 for a model that outputs zero."""
    out = output.double()
    eps_pred, v = out[:, :TOY_CHANNELS], out[:, TOY_CHANNELS:]
    rows = []
    for step in dict.fromkeys(t.tolist()):
        m = t == step
        abar = float(diffusion.alphas_cumprod[step])
        x0 = (x_t[m].double() - math.sqrt(1 - abar) * eps_pred[m]) / math.sqrt(abar)
        frac = (v[m] + 1) / 2  # the learned range: log var = frac * log beta + (1 - frac) * log beta~
        min_log, max_log = float(diffusion.posterior_log_variance_clipped[step]), math.log(diffusion.betas[step])
        log_var = frac * max_log + (1 - frac) * min_log
        # Both sums over tensors of one layout, hence one summation order: exactly 1 for a zero output.
        err = (eps_pred[m] - target[m]).contiguous().square().sum()
        ref = target[m].contiguous().square().sum()
        rows.append(dict(t=int(step), eps_rel_error=(err / ref).sqrt().item(),
                         x0_rmse=x0.square().mean().sqrt().item(),
                         var_log_rmse=(log_var - min_log).square().mean().sqrt().item(),
                         var_rel_error=(frac.square().mean().sqrt() / 0.5).item()))
    return rows


def norm_layers(model):
    """(name, module) of every normalization layer of a DiT, in forward order."""
    layers = []
    for i, block in enumerate(model.blocks):
        layers += [(f"block.{i}.norm1", block.norm1), (f"block.{i}.norm2", block.norm2)]
    return layers + [("final.norm", model.final_layer.norm_final)]


def signal_and_outlier(h):
    """Split norm inputs h (num draws, tokens, D) at one timestep, x0 = 0, into the part that is the same
    for every noise draw, m = mean over draws (position embedding, timestep conditioning, outlier
    channels), and the signal s = h - m that carries the input. LayerNorm sees channel-centred vectors:
    with h = m + s its leftover non-linearity in s is of relative size (|s| / |m|)^2. Returns
    signal_norm   RMS over draws and tokens of |s_c| (L2 over channels, channel-centred);
    const_norm    RMS over tokens of |m_c|;
    outlier       RMS over tokens of m in its loudest channel (outlier_channel);
    signal_to_outlier = signal_norm / outlier and signal_to_const = signal_norm / const_norm."""
    h = h.double()
    m = h.mean(dim=0)
    s = h - m
    centred = lambda x: x - x.mean(dim=-1, keepdim=True)
    signal = centred(s).square().sum(-1).mean().sqrt().item()
    const = centred(m).square().sum(-1).mean().sqrt().item()
    channel_rms = m.square().mean(dim=0).sqrt()
    k = int(channel_rms.argmax())
    outlier = channel_rms[k].item()
    return dict(signal_norm=signal, const_norm=const, outlier=outlier, outlier_channel=k,
                signal_to_outlier=signal / max(outlier, 1e-300), signal_to_const=signal / max(const, 1e-300))


@torch.no_grad()
def probe(model, diffusion, num=256, timesteps=TIMESTEP_GRID, seed=PROBE_SEED):
    """What one evaluation measures without sampling, for one set of weights, in one forward pass of the
    probe batch (timestep_batch): the per-timestep errors (timestep_errors), outlier statistics of the
    token embeddings after the patch embedding and every block (outliers.layer_stats), and the
    signal/outlier split at every normalization layer's input (signal_and_outlier). Returns
    (error rows, embedding rows), each a list of dicts with "t" (and "layer", "kind" for embeddings)."""
    x_t, t, target = timestep_batch(diffusion, timesteps, num, seed)
    per_t = lambda h: h.detach().reshape(len(timesteps), num, *h.shape[1:])
    rows = []

    def capture(name, h):
        if name != "final":  # the output layer has another width; its values are the prediction
            for tt, ht in zip(timesteps, per_t(h)):
                stats = layer_stats(ht)[0]
                rows.append(dict(kind="outliers", t=int(tt), layer=name, **{k: stats[k] for k in OUTLIER_KEYS}))

    def norm_hook(name):
        def hook(module, inputs):
            for tt, ht in zip(timesteps, per_t(inputs[0])):
                rows.append(dict(kind="norm_input", t=int(tt), layer=name, **signal_and_outlier(ht)))
        return hook

    handles = [module.register_forward_pre_hook(norm_hook(name)) for name, module in norm_layers(model)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        y = torch.zeros(len(t), dtype=torch.long, device=device)
        output = model(x_t.to(device), t.to(device), y, capture=capture).cpu()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return timestep_errors(output, x_t, t, target, diffusion), rows
