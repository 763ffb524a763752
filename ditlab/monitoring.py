"""What a training run does between steps: EMA sample grids and FID of the EMA model."""

import contextlib
import json
import math
import os
import time

import numpy as np
import torch

from diffusion import create_diffusion
from ditlab.distributed import barrier, gather_objects
from ditlab.errors import InputError
from ditlab.evaluation import ArrayImages, EvaluationError, Evaluator, extract_features, score, summary_line
from ditlab.features import feature_network
from ditlab.files import append_jsonl
from ditlab.probe import image_data, probe
from ditlab.sampling import denoise, draw_images

#################################################################################
#                                 Sample grids                                  #
#################################################################################


@torch.no_grad()
def sample_grid(model, diffusion, labels, noise, *, cfg_scale=1.0, null_class=None, clip_denoised=False, autocast=None,
                sampler="ddpm"):
    """Samples of `model` from fixed `noise` for `labels` (sampling.denoise: classifier-free guidance
    with the null class, the model's last label row, when cfg_scale > 1). DDPM uses (and must run inside
    a fork of) the global RNG."""
    if cfg_scale > 1 and null_class not in (None, model.num_classes):
        raise ValueError(f"the null class of this model is {model.num_classes}, not {null_class}")
    with autocast or contextlib.nullcontext():
        out = denoise(model, diffusion, noise, labels, sampler, cfg_scale, clip_denoised=clip_denoised)
    return out.float()


def make_sample_hook(trainer, config, vae, tensorboard):
    """Trainer hook: on rank 0, the EMA model samples a grid from fixed noise and labels (the same
    every time, so grids over a run are comparable) into <run>/samples/<step>.png. It runs inside
    torch.random.fork_rng, so the training RNG stream, and hence exact resume, is untouched."""
    ema, device = trainer.ema, trainer.dist.device
    diffusion = create_diffusion(str(config.sample_steps))
    n, num_classes = config.sample_images, config.num_classes
    cfg_scale = config.cfg_scale if config.class_dropout_prob > 0 else 1.0
    nrow = num_classes if num_classes <= 16 else math.ceil(math.sqrt(n))
    os.makedirs(os.path.join(trainer.run_dir, "samples"), exist_ok=True)

    def hook(step):
        if trainer.dist.is_main:
            from torchvision.utils import save_image

            t0 = time.time()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(config.global_seed)
                noise = torch.randn(n, ema.in_channels, ema.input_size, ema.input_size, device=device)
                labels = torch.arange(n, device=device) % num_classes
                x = sample_grid(ema, diffusion, labels, noise, cfg_scale=cfg_scale, null_class=num_classes,
                                clip_denoised=vae is None, autocast=trainer.autocast(), sampler=config.sample_sampler)
                if vae is not None:
                    with torch.no_grad():
                        x = vae.decode(x / config.latent_scale).sample.float()
            x = ((x.clamp(-1, 1) + 1) / 2).cpu()
            if x.shape[-1] < 64:  # tiny images: enlarge (nearest) so the grid is readable
                x = torch.nn.functional.interpolate(x, scale_factor=math.ceil(64 / x.shape[-1]), mode="nearest")
            path = os.path.join(trainer.run_dir, "samples", f"{step:07d}.png")
            save_image(x, path, nrow=nrow, padding=2, pad_value=1.0)
            hook.last_path = path
            if tensorboard is not None:
                from torchvision.utils import make_grid

                tensorboard.add_image("samples/ema", make_grid(x, nrow=nrow), step)
            trainer.logger.info(f"saved EMA sample grid {path} ({config.sample_sampler} {config.sample_steps} steps, "
                                f"cfg {cfg_scale}, {time.time() - t0:.1f}s)")
        barrier()

    hook.last_path = None
    return hook


def draw_fid_samples(trainer, diffusion, config, vae):
    """This process's share of the FID images: the fixed batches [k*B, (k+1)*B) of the --fid-num-samples
    indices, dealt out to the ranks; image i from its own generator (sampling.image_generators), so the
    set of images is the same for any number of processes. Returns (indices, uint8 images, labels)."""
    ema, d, autocast = trainer.ema, trainer.dist, trainer.autocast
    n, b = config.fid_num_samples, config.fid_batch_size
    mine = [range(s, min(s + b, n)) for s in range(0, n, b)][d.rank::d.world_size]
    cfg_scale = config.fid_cfg_scale if config.class_dropout_prob > 0 else 1.0
    indices, images, labels = [], [], []
    for batch in mine:
        x, y = draw_images(ema, diffusion, batch, config.global_seed, vae, config.latent_scale, cfg_scale,
                           sampler=config.fid_sampler, autocast=autocast())
        images.append(x)
        indices += list(batch)
        labels += y
    return indices, (np.concatenate(images) if images else None), labels


def make_fid_hook(trainer, config, vae, tensorboard):
    """Trainer hook: the EMA model's FID (and the other metrics of ditlab/evaluation.py) on every rank's share of
    --fid-num-samples images; rank 0 scores them against --fid-ref (its features computed once, here)
    and writes log.txt, TensorBoard and <run>/metrics.jsonl. Runs inside torch.random.fork_rng."""
    d = trainer.dist
    try:
        evaluator = (Evaluator(config.fid_ref, features=config.fid_features,
                               inception_weights=config.inception_weights,
                               digits_classifier=config.digits_classifier, device=d.device, progress=False)
                     if d.is_main else None)
    except EvaluationError as e:
        raise InputError(f"--fid-ref: {e}") from None
    barrier()  # rank 0 may have written the digits classifier or downloaded the Inception weights
    net = evaluator.net if d.is_main else feature_network(config.fid_features, config.inception_weights,
                                                          config.digits_classifier).to(d.device)
    diffusion = create_diffusion(str(config.fid_sampling_steps))
    path = os.path.join(trainer.run_dir, "metrics.jsonl")

    def hook(step):
        t0 = time.time()
        with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
            indices, images, labels = draw_fid_samples(trainer, diffusion, config, vae)
            feats = extract_features(ArrayImages(images), net, device=d.device, progress=False) if indices else None
        shares = gather_objects((indices, feats, labels))
        if d.is_main:
            order = np.argsort(np.concatenate([s[0] for s in shares if s[0]]))
            parts = [s for s in shares if s[0]]
            merged = {k: None if parts[0][1][k] is None else np.concatenate([p[1][k] for p in parts])[order]
                      for k in parts[0][1] if k != "image_size"}
            y = np.concatenate([p[2] for p in parts])[order]
            metrics = score(merged, evaluator.ref_feats, evaluator.ref_stats, y, config.fid_features, d.device)
            row = {"kind": "fid", "step": step, "weights": "ema", **metrics, "sampler": config.fid_sampler,
                   "sampling_steps": config.fid_sampling_steps, "cfg_scale": config.fid_cfg_scale,
                   "seconds": round(time.time() - t0, 2)}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if tensorboard is not None:
                for key, value in metrics.items():
                    if isinstance(value, float):
                        tensorboard.add_scalar(f"eval/{key}", value, step)
            trainer.logger.info(f"eval at step {step} (EMA, {config.fid_sampling_steps} {config.fid_sampler} steps, "
                                f"cfg {config.fid_cfg_scale}, {time.time() - t0:.1f}s): {summary_line(metrics)}")
        barrier()

    return hook


#################################################################################
#                      The per-timestep probe during training                   #
#################################################################################

def probe_images(dataset, num, seed, encode=None, device="cpu"):
    """The probe's fixed inputs for a train.py run: `num` items of the training set chosen with `seed`
    (unflipped), as the model sees them (encoded by `encode` for a run that trains on images through a
    VAE, whose posterior sample is drawn inside a forked RNG so the training stream is untouched)."""
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    items = [dataset[(i, False)] for i in picks]
    x = torch.stack([item[0] for item in items])
    y = torch.tensor([int(item[1]) for item in items])
    if encode is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x = encode(x.to(device)).cpu()
    return image_data(x.float(), y)


def make_probe_hook(trainer, data):
    """Trainer hook: the per-timestep probe (ditlab.probe) of the EMA weights on the run's fixed probe images:
    rows {"kind": "timestep"} appended to <run>/metrics.jsonl, the norm inputs' and blocks' statistics to
    <run>/embeddings.jsonl, and one line in the log. Rank 0 only; it draws nothing from the training RNG."""
    def hook(step):
        t0 = time.time()
        errors, embeddings = probe(trainer.ema, trainer.diffusion, data=data)
        tag = dict(step=step, weights="ema")
        append_jsonl(os.path.join(trainer.run_dir, "metrics.jsonl"),
                     [dict(kind="timestep", **tag, num_samples=len(data), **row) for row in errors])
        append_jsonl(os.path.join(trainer.run_dir, "embeddings.jsonl"), [{**tag, **row} for row in embeddings])
        shown = " ".join(f"t={r['t']}: {r['eps_rel_error']:.3g}" for r in errors if r["t"] in (0, 10, 100, 999))
        trainer.logger.info(f"probe step {step}: EMA eps_rel_error {shown} ({time.time() - t0:.2f}s)")
    return hook
