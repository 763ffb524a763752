"""Measure the token-embedding outliers of one or several DiTs and plot them.

    # the official model on real images (latents from the SD VAE, ADM center crop):
    python analyze_embeddings.py --ckpt DiT-XL-2-256x256.pt --data-path /imagenet/val --out results/viz
    # this repo's runs, LayerNorm against no normalization, on random Gaussian latents:
    python analyze_embeddings.py --ckpt results/000-.../checkpoints/latest.pt --ckpt results/001-... --out results/viz

Each checkpoint is loaded with ditlab.checkpoints.load_model (official names are downloaded to pretrained_models/).
The clean batch x0 is, per checkpoint:
  * --data-path given: images (ADM center crop to the run's image_size, scaled to [-1, 1]), encoded with
    the run's VAE ("ema"/"mse" = stabilityai/sd-vae-ft-<name>, or a local diffusers folder; --vae
    overrides) times latent_scale (0.18215), or used as pixels when the run's vae is "none";
  * otherwise random N(0, 1) latents of the model's input shape (or zeros with --zero-data, the toy
    study's data).
x0 is noised with q_sample to every --timesteps value (one noise draw per model from --seed), and
outliers.analyze_model records per-layer statistics while the forward runs. Written to --out:
  stats.json                  settings, and per model: config, layers, per-timestep per-layer stats,
                              the cross-layer channel summary, the grid's token positions
  grid_<label>_t<t>.png       the study's grid: one random token per layer, |value| vs channel
  channel_rms_<label>.png     layers x channels heatmap of channel RMS (all timesteps pooled)
  layer_curves.png            max-median ratio and kurtosis per layer, models overlaid, per timestep
  outliers_vs_timestep.png    largest |x| and mean max-median ratio over blocks against the timestep
Labels come from each checkpoint's normalization (made unique with the run name when needed).
"""

import argparse
import os
import sys

import torch

from diffusion import create_diffusion
from ditlab.analysis import DEFAULT_TIMESTEPS, analyze_checkpoint, model_labels, print_summary, write_report
from ditlab.cli import COUNT, INDEX, command
from ditlab.errors import InputError


def parse_args(argv=None):
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="extend", nargs="+", required=True,
                   help="official name (DiT-XL-2-256x256.pt), checkpoint file or run directory; repeat to compare")
    p.add_argument("--data-path", default=None, help="folder of images (class subfolders optional); "
                   "default: random Gaussian latents")
    p.add_argument("--zero-data", action="store_true", help="without --data-path: x0 = 0 instead of N(0, 1)")
    p.add_argument("--out", default="results/viz", help="output folder for the plots and stats.json")
    p.add_argument("--timesteps", type=INDEX, nargs="+", default=list(DEFAULT_TIMESTEPS))
    p.add_argument("--batch-size", type=COUNT, default=8)
    p.add_argument("--seed", type=INDEX, default=0)
    p.add_argument("--class-labels", type=INDEX, nargs="+", default=None,
                   help="labels for the batch (repeated to the batch size); default: the image folders' "
                        "classes when they match the model's class count, else random")
    p.add_argument("--vae", default=None, help="override every checkpoint's VAE: ema, mse, none or a local path")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"), help="which weights of a training checkpoint")
    p.add_argument("--top-k", type=COUNT, default=5, help="outlier channels listed per layer")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = p.parse_args(argv)
    bad = [t for t in args.timesteps if not 0 <= t < 1000]
    if bad:
        p.error(f"--timesteps must lie in [0, 999] (1000 diffusion steps); got {bad}")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.data_path is not None and not os.path.isdir(args.data_path):
        p.error(f"--data-path {args.data_path!r} is not a folder")
    return args


@command
def main(argv=None):
    """Analyse every --ckpt, print a summary per model and write the report to --out; returns the results."""
    args = parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # before the analysis, not after it
        raise InputError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    diffusion = create_diffusion(timestep_respacing="")
    cache, loaded = {}, []
    for ckpt in args.ckpt:
        loaded.append((ckpt, *analyze_checkpoint(ckpt, args, device, cache, diffusion)))
    labels = model_labels(args.ckpt, [config for _, config, _, _ in loaded])
    results = dict(zip(labels, loaded))
    for label, (_, _, _, analysis) in results.items():
        print_summary(label, analysis)
    settings = {k: getattr(args, k) for k in ("timesteps", "batch_size", "seed", "data_path", "zero_data",
                                              "class_labels", "vae", "weights")}
    written = write_report(results, args.out, settings)
    print(f"wrote {len(written)} files to {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
