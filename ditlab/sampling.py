"""Sampling: load a model for sampling, draw images from it with any sampler, classifier-free guidance.

Layer: above checkpoints (loading) and diffusers_interop (the ODE solvers); below monitoring, the toy
study, the studies and the commands. Flags that cannot work raise UsageError before any work."""

import contextlib
import sys

import numpy as np
import torch
from tqdm import tqdm

from ditlab.checkpoints import PRETRAINED_MODELS, WEIGHTS, load_model
from ditlab.cli import COUNT
from ditlab.constants import LATENT_SCALE
from ditlab.data import VAE_HELP
from ditlab.diffusers_interop import solver_scheduler
from ditlab.errors import UsageError
from models import NORM_LAYERS, DiT_models

SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "unipc")
SOLVERS = ("dpm-solver++", "unipc")  # diffusers' multistep ODE solvers
PROGRESS_DELAY = 10  # seconds: a loop that ends sooner prints no progress bar
SAMPLER_HELP = ("ddpm: ancestral (the reference, 250 steps); ddim: deterministic (eta 0); dpm-solver++ / unipc: "
                "diffusers' multistep ODE solvers (DPM-Solver++ 2M, UniPC-2), good from about 10-25 steps")


def add_model_args(p):
    """Flags shared with sample_ddp.py that say which weights to load and how to decode them."""
    p.add_argument("--ckpt", default=None,
                   help="checkpoint file or run directory of this repo (or a reference/bare DiT checkpoint), a "
                        "diffusers DiT folder, or hf:REPO (e.g. hf:facebook/DiT-XL-2-256, fetched from the Hub); "
                        "default: the official DiT-XL-2-<size> file, downloaded into pretrained_models/")
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA or raw weights of a training checkpoint")
    p.add_argument("--model", choices=list(DiT_models), default=None,
                   help="default: from the checkpoint, else DiT-XL/2")
    p.add_argument("--image-size", type=COUNT, default=None, help="pixels; default: from the checkpoint, else 256")
    p.add_argument("--num-classes", type=COUNT, default=None, help="default: from the checkpoint, else 1000")
    p.add_argument("--depth", type=COUNT, default=None, help="a bare state dict's depth (default: from its weights)")
    p.add_argument("--hidden-size", type=COUNT, default=None,
                   help="a bare state dict's width (default: from its weights)")
    p.add_argument("--num-heads", type=COUNT, default=None,
                   help="a bare state dict's attention heads (default: the --model's; the weights do not say)")
    p.add_argument("--normalization", choices=sorted(NORM_LAYERS), default=None,
                   help="read from the checkpoint; the flag may only repeat it (a different value is an error)")
    p.add_argument("--vae", default=None, metavar="VAE",
                   help=f"{VAE_HELP}; default: from the checkpoint, else mse")
    p.add_argument("--cfg-channels", type=COUNT, default=None,
                   help="guide only the first N noise channels (3 = the reference code); default: all")
    p.add_argument("--num-sampling-steps", type=COUNT, default=250)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help=SAMPLER_HELP)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")


def progress_bar(iterable=None, desc=None, total=None, unit="it", disable=False, mininterval=2):
    """A tqdm bar on stderr (count, rate, ETA) for long loops: sampling, feature extraction, .npz writing.
    It appears only once the loop has run PROGRESS_DELAY seconds, so short runs stay quiet. Without an
    iterable it is a manual bar: bar.update(n)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=sys.stderr,
                delay=PROGRESS_DELAY, mininterval=mininterval)


#################################################################################
#                              Model and VAE                                    #
#################################################################################


def load_for_sampling(args):
    """(model, config) for the flags: --ckpt (its config wins; conflicting --model / --image-size /
    --num-classes are an error) or the official DiT-XL-2-<image size> file. The model is on the CPU in
    eval mode. What cannot be loaded raises load_model's errors (CheckpointError, UsageError, InputError)."""
    check_solver_steps(args.sampler, args.num_sampling_steps, "--num-sampling-steps")
    if args.ckpt is None:
        size = args.image_size or 256
        name = f"DiT-XL-2-{size}x{size}.pt"
        if name not in PRETRAINED_MODELS or args.model not in (None, "DiT-XL/2"):
            raise UsageError(f"official weights exist only for DiT-XL/2 at 256 and 512 pixels "
                             f"({', '.join(PRETRAINED_MODELS)}); pass --ckpt for anything else")
    else:
        name = args.ckpt
    model, config = load_model(name, args.weights,
                               must_match=("model", "image_size", "num_classes", "depth", "hidden_size", "num_heads"),
                               bare_model="DiT-XL/2", model=args.model, image_size=args.image_size,
                               num_classes=args.num_classes, vae=args.vae,
                               depth=args.depth, hidden_size=args.hidden_size, num_heads=args.num_heads)
    check_normalization_flag(args.normalization, model.normalization)
    config.setdefault("vae", "mse")  # the reference sample.py's VAE
    return model, config


def check_normalization_flag(flag, stored):
    """UsageError when --normalization differs from the checkpoint's own: the weights say which
    normalization they were trained with, so the flag can only repeat it."""
    if flag is not None and flag != stored:
        raise UsageError(f"--normalization {flag}: this checkpoint was trained with {stored}; sample.py and "
                         f"sample_ddp.py read the normalization from the checkpoint, so drop the flag "
                         f"(or pass --normalization {stored})")


def check_vae(vae, model, config):
    """Refuse a VAE whose latents do not match the model's input channels (UsageError)."""
    if vae is not None and vae.config.latent_channels != model.in_channels:
        raise UsageError(f"the VAE {config['vae']!r} has {vae.config.latent_channels} latent channels but the "
                         f"model expects {model.in_channels} input channels; pick the VAE it was trained with")


@torch.no_grad()
def decode(vae, latents, latent_scale):
    """Latents -> pixels in about [-1, 1]: vae.decode(latents / latent_scale); no VAE: unchanged."""
    if vae is None:
        return latents
    return vae.decode(latents / latent_scale).sample


def to_uint8(images):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 numpy, as the reference sample_ddp.py."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def to_rgb(images):
    """(N, 3, H, W) for PNGs: 1 channel is repeated; other counts keep the first 3 (zero-padded)."""
    c = images.shape[1]
    if c == 3:
        return images
    if c == 1:
        return images.repeat(1, 3, 1, 1)
    if c > 3:
        return images[:, :3]
    pad = torch.full_like(images[:, :1], -1.0).repeat(1, 3 - c, 1, 1)  # missing channels black
    return torch.cat([images, pad], dim=1)


#################################################################################
#                                  Sampling                                     #
#################################################################################


def image_generators(seed, indices):
    """One numpy generator per image, seeded from (seed, index) through SeedSequence (independent streams;
    torch's CPU generator would keep only 32 bits of a combined seed)."""
    return [np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, int(i)]))) for i in indices]


def image_labels(generators, num_classes):
    """Each image's class label: the first draw of its generator (so labels, like images, depend only
    on the image's index and the seed)."""
    return [int(g.integers(num_classes)) for g in generators]


def standard_normal(generators, shape, device):
    """One (C, H, W) standard-normal draw from each image's generator, stacked: (N, C, H, W)."""
    x = np.stack([g.standard_normal(shape, dtype=np.float32) for g in generators])
    return torch.from_numpy(x).to(device)


def has_null_class(model):
    """Whether the label table has the extra "null" row that classifier-free guidance needs."""
    return model.y_embedder.embedding_table.num_embeddings > model.num_classes


def check_solver_steps(sampler, steps, flag):
    """Before any work: no sampler takes more steps than the diffusion's 1000, and diffusers' solvers at
    most 999 of them (UsageError naming `flag`)."""
    if steps > 1000:
        raise UsageError(f"{flag} {steps}: the diffusion has 1000 steps, so a sampler takes at most 1000 "
                         "(250 is the DiT default)")
    if sampler in SOLVERS and steps >= 1000:
        raise UsageError(f"--sampler {sampler} takes at most 999 steps, got {flag} {steps} (diffusers' spacing "
                         f"repeats timesteps at 1000); it needs far fewer, 10-100")


def check_sampler(name):
    """UsageError naming the choices for an unknown sampler."""
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def make_solver(sampler, diffusion, clip_denoised=False, device=None, spacing="linspace"):
    """The diffusers scheduler of "dpm-solver++" or "unipc" (diffusers_interop.solver_scheduler) configured
    from the diffusion's full (un-respaced) betas, with timesteps set for `diffusion.num_timesteps` steps:
    spacing "linspace" is diffusers' default (999 down to about 1000 / N, then to sigma 0; what DiTPipeline
    does); "respaced" takes the diffusion's own kept timesteps (999 down to 0, as ddpm / ddim; DPM-Solver++
    only: diffusers' UniPC takes no custom timesteps). UsageError for a diffusion or step count it cannot
    drive."""
    if diffusion.model_mean_type.name != "EPSILON":
        raise UsageError(f"--sampler {sampler} drives a noise-predicting model; this diffusion predicts "
                         f"{diffusion.model_mean_type.name}")
    betas = getattr(diffusion, "original_betas", diffusion.betas)
    scheduler = solver_scheduler(sampler, betas, clip_denoised)
    if spacing == "respaced" and sampler == "dpm-solver++":
        kept = getattr(diffusion, "timestep_map", range(diffusion.num_timesteps))
        scheduler.set_timesteps(timesteps=sorted(kept, reverse=True), device=device)
    elif spacing == "linspace":
        scheduler.set_timesteps(diffusion.num_timesteps, device=device)
    else:
        raise UsageError(f"spacing {spacing!r} is not available for {sampler}: use 'linspace'"
                         + (" or 'respaced'" if sampler == "dpm-solver++" else ""))
    if len(set(scheduler.timesteps.tolist())) < len(scheduler.timesteps):  # then a zero step size gives NaN
        raise UsageError(f"{diffusion.num_timesteps} steps of {sampler} repeat timesteps (diffusers' linspace spacing "
                         f"over {len(betas)} training steps); use at most {len(betas) - 1} steps")
    return scheduler


def _steps(steps, progress):
    """`steps`, wrapped in a progress bar on stderr when `progress` (shown once the loop runs long)."""
    if not progress:
        return steps
    return progress_bar(steps, "sampling", unit="step", mininterval=0.1)


def _solve(fn, diffusion, x, y, sampler, *, guided=False, clip_denoised=False, progress=False, spacing="linspace"):
    """An ODE solve from x (N, C, H, W) with a diffusers scheduler; fn(x_in, t, y) is the (guided) model."""
    n, c = x.shape[:2]
    scheduler = make_solver(sampler, diffusion, clip_denoised, device=x.device, spacing=spacing)
    for t in _steps(scheduler.timesteps, progress):
        x_in = torch.cat([x, x]) if guided else x
        eps = fn(x_in, torch.full((len(x_in),), int(t), device=x.device, dtype=torch.long), y=y)[:n, :c]
        x = scheduler.step(eps.to(x.dtype), t, x).prev_sample
    return x


@torch.no_grad()
def denoise(model, diffusion, x, labels, sampler="ddpm", cfg_scale=1.0, cfg_channels=None, clip_denoised=False,
            step_noise=None, progress=False, spacing="linspace"):
    """Sample from the starting noise x (N, C, H, W) for `labels` with `sampler` (SAMPLERS) over the
    diffusion's (respaced) steps; returns the (N, C, H, W) model-space samples.

    With cfg_scale > 1 the batch is doubled with the null label and model.forward_with_cfg guides the
    first `cfg_channels` noise channels (None: all); both halves share the same input, the first half is
    returned. step_noise() supplies each DDPM step's (N, C, H, W) noise; None draws it from the global
    RNG exactly as diffusion.p_sample_loop does (torch.randn_like of the whole, doubled, batch).
    spacing: the ODE solvers' timesteps (make_solver).
    """
    check_sampler(sampler)
    n = len(x)
    guided = cfg_scale > 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])

        def fn(x_in, t, y):
            return model.forward_with_cfg(x_in, t, y, cfg_scale, guidance_channels=cfg_channels)
    else:
        fn = model
    if sampler in SOLVERS:
        return _solve(fn, diffusion, x, labels, sampler, guided=guided, clip_denoised=clip_denoised, progress=progress,
                      spacing=spacing)
    # DDPM and DDIM: the reference's loops. Guided, the batch is doubled as in the reference's sample.py
    # (forward_with_cfg reads only the first half, so the second half's own noise never matters).
    x_in = torch.cat([x, x]) if guided else x
    loop = dict(noise=x_in, clip_denoised=clip_denoised, model_kwargs=dict(y=labels), device=x.device,
                progress=progress)
    if sampler == "ddim":  # eta = 0: deterministic
        return diffusion.ddim_sample_loop(fn, tuple(x_in.shape), eta=0.0, **loop)[:n]
    noise = None
    if step_noise is not None:
        def noise(like):
            drawn = step_noise()
            return torch.cat([drawn, drawn]) if guided else drawn
    return diffusion.p_sample_loop(fn, tuple(x_in.shape), step_noise=noise, **loop)[:n]


def sample_images(model, diffusion, labels, generators, cfg_scale=1.0, cfg_channels=None, sampler="ddpm",
                  clip_denoised=False, progress=False, spacing="linspace"):
    """Draw one sample per label (a LongTensor on the model's device): returns (N, C, H, W) model-space
    samples (latents, or pixels for a pixel-space model).

    generators[i] supplies image i's starting noise and then its noise at every DDPM step, so image i
    is the same whatever else is in the batch (DDIM and the ODE solvers draw nothing after the start).
    Guidance as in `denoise`.
    """
    shape = (model.in_channels, model.input_size, model.input_size)
    x = standard_normal(generators, shape, labels.device)
    return denoise(model, diffusion, x, labels, sampler, cfg_scale, cfg_channels, clip_denoised,
                   step_noise=lambda: standard_normal(generators, shape, labels.device), progress=progress,
                   spacing=spacing)


def draw_images(model, diffusion, indices, seed, vae=None, latent_scale=LATENT_SCALE, cfg_scale=1.0, cfg_channels=None,
                sampler="ddpm", autocast=None):
    """Images `indices` of a run seeded `seed` (sample_ddp.py's set, train.py's FID set): each one's label and
    noise from its own generator, sampled (inside `autocast`, when given), decoded, as uint8 (N, H, W, 3)
    with their labels (a list). Pixel-space models (vae None) are clipped to [-1, 1] as they sample."""
    generators = image_generators(seed, indices)
    labels = image_labels(generators, model.num_classes)
    y = torch.tensor(labels, device=next(model.parameters()).device)
    with autocast or contextlib.nullcontext():
        x = sample_images(model, diffusion, y, generators, cfg_scale, cfg_channels, sampler, clip_denoised=vae is None)
    return to_uint8(to_rgb(decode(vae, x.float(), latent_scale).float())), labels


def prepare_guidance(model, cfg_scale, cfg_channels):
    """Validate the guidance flags against the model; returns the cfg scale to use (1.0 when the model
    has no null class: it cannot be guided, so it samples unguided, with a message). UsageError for
    --cfg-channels outside the model's channels."""
    if cfg_scale > 1.0 and not has_null_class(model):
        print(f"note: this model has no null class (trained without label dropout): sampling unguided "
              f"instead of --cfg-scale {cfg_scale}", file=sys.stderr)
        return 1.0
    if cfg_channels is not None and not 1 <= cfg_channels <= model.in_channels:
        raise UsageError(f"--cfg-channels must lie in [1, {model.in_channels}] for this model, got {cfg_channels}")
    return cfg_scale


def pick_device(name):
    """The torch device for --device (default: cuda when available); UsageError for cuda without one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
