"""The per-timestep probe of a denoiser, for toy and image models alike: on fixed clean inputs x0 and fixed
noise eps, at a grid of timesteps, the error of its noise, x0 and variance predictions, and the signal and
outlier statistics at every normalization layer's input. The toy probes all-zero (or Gaussian) 2x2x2
images with label 0 (toy_data); an image model probes real images with their labels (image_data)."""

import math
from dataclasses import dataclass

import torch

from ditlab.outliers import layer_stats

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
# The toy's images: 2x2 pixels, 2 channels (ditlab.toy.task holds the task; the probe only needs the shape).
TOY_SHAPE = (2, 2, 2)
# One 8-bit level in the [-1, 1] pixel units the models see.
LEVEL = 2 / 255


@dataclass(frozen=True)
class ProbeData:
    """What the probe denoises: clean inputs x0 and noise eps (float64, (num, C, H, W); the same eps at every
    timestep), class labels y, and the std of the data where it is Gaussian with zero mean (the toy: its ideal
    denoiser is then known in closed form; None for images)."""

    x0: torch.Tensor
    eps: torch.Tensor
    y: torch.Tensor
    data_std: float | None = None

    def __len__(self):
        return len(self.eps)

    def subset(self, num):
        """The first `num` inputs (the channel statistics need fewer than the probe)."""
        return ProbeData(self.x0[:num], self.eps[:num], self.y[:num], self.data_std)


def toy_data(num, seed=PROBE_SEED, data_std=0.0, shape=TOY_SHAPE):
    """The toy's probe data: `num` noise draws, then (data_std > 0) as many N(0, data_std^2) images from the same
    generator (x0 = 0 otherwise: the all-zero task, whose eps draws are the same either way)."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(num, *shape, generator=gen, dtype=torch.float64)
    x0 = data_std * torch.randn(num, *shape, generator=gen, dtype=torch.float64) if data_std else torch.zeros_like(eps)
    return ProbeData(x0, eps, torch.zeros(num, dtype=torch.long), float(data_std))


def image_data(images, labels, seed=PROBE_SEED):
    """An image model's probe data: the given images (model units, e.g. pixels in [-1, 1] or scaled latents)
    with their labels, and fixed noise of their shape."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(tuple(images.shape), generator=gen, dtype=torch.float64)
    return ProbeData(images.double(), eps, torch.as_tensor(labels, dtype=torch.long), None)


def timestep_batch(diffusion, timesteps, num_or_data, seed=PROBE_SEED):
    """The probe batch at every timestep: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for the probe data
    (a ProbeData, or a number of toy draws with x0 = 0).

    Returns (x_t, t, target): x_t float32 (len(timesteps) * num, C, H, W) in timestep-major order, t (long),
    and the target float64 = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), the exact noise of the float32 input
    (eps up to float32 rounding), so that no error floor comes from rounding the input."""
    data = num_or_data if isinstance(num_or_data, ProbeData) else toy_data(num_or_data, seed)
    steps = list(timesteps)
    scale = torch.as_tensor(diffusion.sqrt_one_minus_alphas_cumprod[steps], dtype=torch.float64).view(-1, 1, 1, 1, 1)
    signal = torch.as_tensor(diffusion.sqrt_alphas_cumprod[steps], dtype=torch.float64).view(-1, 1, 1, 1, 1)
    clean = signal * data.x0
    x_t = (clean + scale * data.eps).float()
    target = (x_t.double() - clean) / scale
    t = torch.tensor(steps, dtype=torch.long).repeat_interleave(len(data))
    return x_t.flatten(0, 1), t, target.flatten(0, 1)


def timestep_errors(output, x_t, t, target, diffusion, data=None):
    """Per-timestep errors of a model's output on the probe batch (float64), one dict per timestep:

    eps_rel_error  ||eps_pred - eps|| / ||eps|| over the batch (1 for a model that outputs zero);
    x0_rmse        RMS of the implied x0 = (x_t - sqrt(1 - abar) eps_pred) / sqrt(abar) minus the true x0
                   (pixel units, like the sample error: one 8-bit level is 2/255); x0_rmse_8bit, in levels;
    var_log_rmse   RMS of the learned log-variance minus the log of the posterior variance of a point mass,
                   beta~_t (nats; at t = 0, where beta~ is 0, the clipped value the learned range and the
                   sampler use); the true posterior variance for all-zero data, a reference for other data;
    var_rel_error  the same distance in units of a zero output's (v = 0, halfway between log beta~_t and
                   log beta_t): RMS of (v + 1) / 2 over 1/2, 1 for a model that outputs zero.
    For Gaussian data (data.data_std set), also the ideal denoiser's error and the model's excess over it:
    eps_opt_error  ||eps* - eps|| / ||eps|| with eps* = sqrt(1 - abar) / (abar S^2 + 1 - abar) x_t, the
                   irreducible error (0 for all-zero data);
    eps_excess_error ||eps_pred - eps*|| / ||eps||: what the model adds (squared, the two add up in
                   expectation); x0_excess_rmse, the same for x0 in pixel units.
    `data` is the ProbeData the batch was made from (default: the toy's all-zero data)."""
    channels = x_t.shape[1]
    out = output.double()
    eps_pred, v = out[:, :channels], out[:, channels:]
    x0_true = None if data is None else data.x0
    rows = []
    for step in dict.fromkeys(t.tolist()):
        m = t == step
        abar = float(diffusion.alphas_cumprod[step])
        x0 = (x_t[m].double() - math.sqrt(1 - abar) * eps_pred[m]) / math.sqrt(abar)
        x0_err = x0 if x0_true is None else x0 - x0_true
        frac = (v[m] + 1) / 2  # the learned range: log var = frac * log beta + (1 - frac) * log beta~
        min_log, max_log = float(diffusion.posterior_log_variance_clipped[step]), math.log(diffusion.betas[step])
        log_var = frac * max_log + (1 - frac) * min_log
        # Both sums over tensors of one layout, hence one summation order: exactly 1 for a zero output.
        err = (eps_pred[m] - target[m]).contiguous().square().sum()
        ref = target[m].contiguous().square().sum()
        x0_rmse = x0_err.square().mean().sqrt().item()
        row = dict(t=int(step), eps_rel_error=(err / ref).sqrt().item(), x0_rmse=x0_rmse,
                   x0_rmse_8bit=x0_rmse / LEVEL, var_log_rmse=(log_var - min_log).square().mean().sqrt().item(),
                   var_rel_error=(frac.square().mean().sqrt() / 0.5).item())
        if data is not None and data.data_std is not None:
            gain = math.sqrt(1 - abar) / (abar * data.data_std ** 2 + 1 - abar)
            ideal = gain * x_t[m].double()
            ideal_x0 = (x_t[m].double() - math.sqrt(1 - abar) * ideal) / math.sqrt(abar)
            row.update(eps_opt_error=((ideal - target[m]).square().sum() / ref).sqrt().item(),
                       eps_excess_error=((eps_pred[m] - ideal).square().sum() / ref).sqrt().item(),
                       x0_excess_rmse=(x0 - ideal_x0).square().mean().sqrt().item())
        rows.append(row)
    return rows


def norm_layers(model):
    """(name, module) of every normalization layer of a DiT, in forward order."""
    layers = []
    for i, block in enumerate(model.blocks):
        layers += [(f"block.{i}.norm1", block.norm1), (f"block.{i}.norm2", block.norm2)]
    return layers + [("final.norm", model.final_layer.norm_final)]


def signal_and_outlier(h):
    """Split norm inputs h (num draws, tokens, D) at one timestep into the part that is the same for every
    draw, m = mean over draws (position embedding, timestep conditioning, outlier channels), and the signal
    s = h - m that carries the input (the noise and, for data that vary, the image). LayerNorm sees channel-centred vectors:
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
def probe(model, diffusion, num=256, timesteps=TIMESTEP_GRID, seed=PROBE_SEED, data=None):
    """What one evaluation measures without sampling, for one set of weights, in one forward pass of the
    probe batch (timestep_batch) of `data` (a ProbeData; default the toy's `num` all-zero draws at `seed`):
    the per-timestep errors (timestep_errors), outlier statistics of the token embeddings after the patch
    embedding and every block (outliers.layer_stats), and the signal/outlier split at every normalization
    layer's input (signal_and_outlier). Returns (error rows, embedding rows), each a list of dicts with "t"
    (and "layer", "kind" for embeddings)."""
    data = data if data is not None else toy_data(num, seed)
    num = len(data)
    x_t, t, target = timestep_batch(diffusion, timesteps, data)
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
        y = data.y.repeat(len(timesteps)).to(device)
        output = model(x_t.to(device), t.to(device), y, capture=capture).cpu()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return timestep_errors(output, x_t, t, target, diffusion, data), rows
