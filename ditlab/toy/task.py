"""The toy task: a DiT trained on 2x2x2 images that are all zero (the published toy) or, with a data spread
S > 0, fresh N(0, S^2) Gaussian images; its presets, batches, and sample evaluation.

Why Gaussian data, drawn fresh at every step: the ideal denoiser stays a timestep-dependent linear gain,
E[eps | x_t] = sqrt(1 - abar) / (abar S^2 + 1 - abar) x_t, so the irreducible part of any model's error is
known exactly (ditlab.probe reports the excess over it). A fixed finite set would make the ideal denoiser
one that memorises the set, with no closed form, and S = 0 would not be its limit."""


import torch

# Model overrides of the toy: 2x2 pixels with 2 channels, one class, no label dropout.
TOY_IMAGE_SIZE, TOY_CHANNELS = 2, 2
TOY_MODEL = dict(input_size=TOY_IMAGE_SIZE, in_channels=TOY_CHANNELS, num_classes=1, class_dropout_prob=0.0,
                 learn_sigma=True)

PRESETS = {
    # The published toy study's setting: meant for a GPU.
    "paper": dict(model="DiT-XS/1", max_steps=50_000, global_batch_size=2048, lr=1e-4, lr_schedule="constant",
                  warmup_steps=0, ema_decay=0.9999, eval_steps=[10_000, 50_000], ckpt_every=10_000,
                  log_every=500, depth=None, hidden_size=None, num_heads=None, probe_every=2_500,
                  compile="default"),  # 1.4x eager on an H100 (docs/benchmarks.md)
    # Small enough that `make toy` trains both variants on 2 CPU cores within 15 minutes.
    "cpu": dict(model="DiT-XS/1", max_steps=12_000, global_batch_size=256, lr=1e-3, lr_schedule="cosine",
                warmup_steps=200, ema_decay=0.999, eval_steps=[3_000, 6_000, 12_000], ckpt_every=3_000,
                log_every=500, depth=2, hidden_size=64, num_heads=4, probe_every=500, compile=None),
}


def zero_batches(local_batch, device):
    """The toy data set: an endless stream of all-zero images with label 0."""
    x = torch.zeros(local_batch, TOY_CHANNELS, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE, device=device)
    y = torch.zeros(local_batch, dtype=torch.long, device=device)
    while True:
        yield x, y


def gaussian_batches(local_batch, device, data_std, seed, rank=0, start_step=0):
    """Fresh N(0, data_std^2) images with label 0 at every step. Each batch comes from its own generator,
    seeded by (seed, rank, step): a resumed run draws from `start_step` on exactly what it would have drawn,
    and the data leave the training RNG alone."""
    y = torch.zeros(local_batch, dtype=torch.long, device=device)
    step = start_step
    while True:
        gen = torch.Generator().manual_seed((seed * 1_009 + rank) * 100_000_007 + step)
        x = data_std * torch.randn(local_batch, TOY_CHANNELS, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE, generator=gen)
        yield x.to(device), y
        step += 1


def toy_batches(local_batch, device, data_std=0.0, seed=0, rank=0, start_step=0):
    """The toy's data: all-zero images (data_std 0, the published task, bitwise as before) or Gaussian ones."""
    if data_std == 0:
        return zero_batches(local_batch, device)
    return gaussian_batches(local_batch, device, data_std, seed, rank, start_step)


def sample_error(samples, data_std=0.0):
    """Sample statistics. For the all-zero task every value is an error: mean |x|, max |x| (also in 8-bit
    levels), RMS. With Gaussian data (data_std > 0) the same numbers describe the samples themselves, and
    `std` and `var_ratio` (the samples' variance over the data's; 1 for a perfect model) say how far their
    distribution is from the data's."""
    v = samples.double().flatten()
    max_abs = v.abs().max().item()
    out = dict(mean_abs=v.abs().mean().item(), max_abs=max_abs, rms=v.square().mean().sqrt().item(),
               max_abs_8bit=max_abs * 127.5, num_values=v.numel())
    if data_std:
        out.update(std=v.std().item(), var_ratio=v.var().item() / data_std ** 2)
    return out
