"""Sample a grid of images from a DiT: the official pretrained DiT-XL/2, or a checkpoint of this repo.
The grid goes to results/sample.png unless --out says otherwise.

    python sample.py                                             # official DiT-XL-2-256x256.pt (downloads)
    python sample.py --image-size 512 --class-labels 207 360 --seed 1
    python sample.py --ckpt results/000-DiT-S-2-none/checkpoints/latest.pt
    python sample.py --ckpt results/000-DiT-S-2-none --weights raw --out results/raw.png
    python sample.py --sampler dpm-solver++ --num-sampling-steps 25     # diffusers' DPM-Solver++ 2M, 25 steps
    python sample.py --ckpt hf:facebook/DiT-XL-2-256                   # the Hub's diffusers copy (or any DiT folder)

For our own checkpoints the architecture, image size, class count, normalization and VAE are read
from the checkpoint's config, so --ckpt alone is enough. For a bare state dict (no config) the flags
describe the model (defaults: DiT-XL/2, 256px, 1000 classes, sd-vae-ft-mse).

Randomness: image i of a run uses its own generator seeded from (--seed, i), for the starting noise
and every DDPM step's noise, so an image does not depend on how many others are drawn with it.
sample_ddp.py uses the same function to draw its 50,000 images.
"""

import argparse
import os
import sys

import torch
from torchvision.utils import save_image

from diffusion import create_diffusion
from ditlab.cli import INDEX, NON_NEGATIVE, command
from ditlab.constants import LATENT_SCALE
from ditlab.data import load_vae
from ditlab.errors import UsageError
from ditlab.files import atomic_write, check_output_file
from ditlab.sampling import (
    add_model_args,
    check_vae,
    decode,
    image_generators,
    load_for_sampling,
    pick_device,
    prepare_guidance,
    sample_images,
    to_rgb,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# The reference sample.py's labels: golden retriever, otter, red panda, geyser, macaw, valley, balloon, arctic fox.
DEFAULT_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
DEFAULT_OUT = os.path.join("results", "sample.png")  # results/ is git-ignored: no stray file in the repository


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--cfg-scale", type=NON_NEGATIVE, default=4.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--class-labels", type=INDEX, nargs="+", default=None,
                   help=f"one image per label; default {DEFAULT_CLASS_LABELS} (or 0..7 modulo the class count)")
    p.add_argument("--seed", type=INDEX, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="PNG grid to write (its folder is created)")
    return p.parse_args(argv)


@command
def main(argv=None):
    """Sample the grid the flags describe and write it to --out; returns the images."""
    args = parse_args(argv)
    check_output_file(args.out, "--out", IMAGE_EXTENSIONS)  # before sampling, not after it
    device = pick_device(args.device)
    model, config = load_for_sampling(args)
    model.to(device)
    if args.class_labels is None:
        labels = DEFAULT_CLASS_LABELS
        if max(labels) >= model.num_classes:
            labels = [i % model.num_classes for i in range(len(labels))]
    else:
        labels = args.class_labels
        bad = [c for c in labels if not 0 <= c < model.num_classes]
        if bad:
            raise UsageError(f"--class-labels {bad} out of range: this model has {model.num_classes} classes (0 to "
                             f"{model.num_classes - 1})")
    cfg_scale = prepare_guidance(model, args.cfg_scale, args.cfg_channels)
    vae = load_vae(config["vae"], device)
    check_vae(vae, model, config)
    diffusion = create_diffusion(str(args.num_sampling_steps), learn_sigma=config.get("learn_sigma", True))
    print(f"sampling {len(labels)} images from {config['model']} ({config.get('normalization', 'layer-norm')}, "
          f"{args.weights} weights) at {config['image_size']}px, {args.sampler} {args.num_sampling_steps} steps, "
          f"cfg scale {cfg_scale}, vae {config['vae']}", file=sys.stderr)
    y = torch.tensor(labels, device=device)
    samples = sample_images(model, diffusion, y, image_generators(args.seed, range(len(labels))), cfg_scale,
                            args.cfg_channels, args.sampler, clip_denoised=vae is None, progress=True)
    images = to_rgb(decode(vae, samples, config.get("latent_scale", LATENT_SCALE)).float().cpu())
    fmt = os.path.splitext(args.out)[1].lstrip(".").lower().replace("jpg", "jpeg")
    atomic_write(args.out, lambda f: save_image(images, f, format=fmt, nrow=4, normalize=True, value_range=(-1, 1)))
    print(f"saved {args.out}", file=sys.stderr)
    return images


if __name__ == "__main__":
    main()
