"""The toy task: a DiT trained on all-zero 2x2x2 images, its presets, batches, and sample evaluation."""


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


def sample_error(samples):
    """Errors of samples whose target is exactly zero: every value is an error."""
    v = samples.double().flatten()
    max_abs = v.abs().max().item()
    return dict(mean_abs=v.abs().mean().item(), max_abs=max_abs, rms=v.square().mean().sqrt().item(),
                max_abs_8bit=max_abs * 127.5, num_values=v.numel())
