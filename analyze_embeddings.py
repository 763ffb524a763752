"""Measure the token-embedding outliers of one or several DiTs and plot them (issue 6).

    # the official model on real images (latents from the SD VAE, ADM center crop):
    python analyze_embeddings.py --ckpt DiT-XL-2-256x256.pt --data-path /imagenet/val --out results/viz
    # this repo's runs, LayerNorm against no normalization, on random Gaussian latents:
    python analyze_embeddings.py --ckpt results/000-.../checkpoints/latest.pt --ckpt results/001-... --out results/viz

Each checkpoint is loaded with download.load_model (official names are downloaded to pretrained_models/).
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
import json
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

from cli import COUNT, INDEX
from data import LATENT_SCALE, center_crop_arr, load_vae  # the same ADM crop and VAE loading as train.py
import outliers
from diffusion import create_diffusion
from download import load_model

DEFAULT_TIMESTEPS = (50, 250, 500, 750, 999)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VAE_DOWNSAMPLE = 8


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


#################################################################################
#                                   Models                                      #
#################################################################################


def load_checkpoint(ckpt, weights="ema", vae=None):
    """(model, config) for one --ckpt, with vae/latent_scale/image_size always filled in.

    A failure to find, read or build the checkpoint becomes a SystemExit naming the --ckpt."""
    try:
        model, config = load_model(ckpt, weights=weights)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise SystemExit(f"--ckpt {ckpt}: {e}") from e
    config = dict(config)
    if vae is not None:
        config["vae"] = vae
    config.setdefault("vae", "none" if model.in_channels != 4 else "ema")
    config.setdefault("latent_scale", LATENT_SCALE)
    if config.get("image_size") is None:
        factor = 1 if config["vae"] == "none" else VAE_DOWNSAMPLE
        config["image_size"] = model.input_size * factor
    return model, config


def short_name(ckpt):
    """A short name for a checkpoint: the run directory for .../<run>/checkpoints/x.pt, else the file."""
    path = os.path.normpath(str(ckpt))
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints":
        return os.path.basename(os.path.dirname(parent))
    return os.path.basename(path)


def model_labels(ckpts, configs):
    """One label per checkpoint: its normalization, plus the run name where two would be equal."""
    base = [c.get("normalization") or "layer-norm" for c in configs]
    labels = [b if base.count(b) == 1 else f"{b} [{short_name(k)}]" for b, k in zip(base, ckpts)]
    return [lab if labels.count(lab) == 1 else f"{lab} #{i}" for i, lab in enumerate(labels)]


def slug(label):
    """A file-name-safe version of a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


#################################################################################
#                                    Data                                       #
#################################################################################


def list_images(data_path):
    """Sorted (path, class folder) pairs of every image under data_path; class folder is "" for images
    lying directly in data_path. SystemExit when there are none."""
    found = []
    for root, dirs, files in os.walk(data_path):
        dirs.sort()
        rel = os.path.relpath(root, data_path)
        folder = "" if rel == "." else rel.split(os.sep)[0]
        found += [(os.path.join(root, f), folder) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise SystemExit(f"--data-path {data_path}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def load_images(data_path, image_size, batch_size, seed):
    """A seeded random choice of batch_size images (all of them if fewer), center-cropped to image_size
    and scaled to [-1, 1]: ((N, 3, S, S) float tensor, class folder index per image or None when the
    images are not all in class folders, number of class folders)."""
    found = list_images(data_path)
    folders = sorted({f for _, f in found if f})
    pick = np.random.default_rng(seed).permutation(len(found))[:batch_size]
    arrays, classes = [], []
    for i in sorted(pick):
        path, folder = found[i]
        try:
            with Image.open(path) as im:
                arrays.append(center_crop_arr(im.convert("RGB"), image_size))
        except OSError as e:
            raise SystemExit(f"--data-path {data_path}: cannot read image {path}: {e}") from e
        classes.append(folders.index(folder) if folder else None)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, (None if None in classes else torch.tensor(classes)), len(folders)


@torch.no_grad()
def encode(vae, x, latent_scale, seed, chunk=8):
    """latent = vae.encode(x).latent_dist.sample() * latent_scale, in chunks, sampled from `seed`."""
    device = next(vae.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    parts = [vae.encode(x[i: i + chunk].to(device)).latent_dist.sample(generator=g) for i in range(0, len(x), chunk)]
    return torch.cat(parts) * latent_scale


def clean_batch(model, config, args, device, cache):
    """The clean batch x0 for one model and a description of it; images/latents are cached in `cache`
    by their preprocessing so checkpoints that share it see exactly the same x0."""
    shape = (args.batch_size, model.in_channels, model.input_size, model.input_size)
    if args.data_path is None:
        x0 = torch.zeros(shape) if args.zero_data else torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
        return x0, None, ("zeros" if args.zero_data else "gaussian")
    vae, size = config["vae"], int(config["image_size"])
    key = ("images", size)
    if key not in cache:
        cache[key] = load_images(args.data_path, size, args.batch_size, args.seed)
    x, classes, num_folders = cache[key]
    if vae == "none":
        if x.shape[1:] != shape[1:]:
            raise SystemExit(f"a pixel-space model (vae 'none') expecting {shape[1:]} cannot take RGB images of "
                             f"{tuple(x.shape[1:])}; drop --data-path to use Gaussian inputs")
        return x, (classes if num_folders == model.num_classes else None), f"pixels of {args.data_path}"
    latent_key = ("latents", size, vae, float(config["latent_scale"]))
    if latent_key not in cache:
        cache[latent_key] = encode(load_vae(vae, device), x, float(config["latent_scale"]), args.seed).cpu()
    x0 = cache[latent_key]
    if x0.shape[1:] != shape[1:]:
        raise SystemExit(f"latents of shape {tuple(x0.shape[1:])} from vae {vae!r} do not fit the model's input "
                         f"{shape[1:]}; check the checkpoint's image_size and --vae")
    return x0, (classes if num_folders == model.num_classes else None), f"{vae} latents of {args.data_path}"


def class_labels(model, n, given, folder_classes, seed):
    """Labels for n inputs: --class-labels repeated to n, else the image folders' classes, else random
    classes from `seed`. SystemExit for a label outside the model's classes."""
    if given:
        labels = torch.tensor([given[i % len(given)] for i in range(n)])
        if labels.min() < 0 or labels.max() >= model.num_classes:
            raise SystemExit(f"--class-labels must lie in [0, {model.num_classes - 1}]; got {given}")
        return labels
    if folder_classes is not None:
        return folder_classes
    return torch.randint(model.num_classes, (n,), generator=torch.Generator().manual_seed(seed))


#################################################################################
#                                   Report                                      #
#################################################################################


def analyze_checkpoint(ckpt, args, device, cache, diffusion):
    """Load one checkpoint, build its clean batch and run outliers.analyze_model; returns
    (config, input description, outliers.ModelAnalysis)."""
    model, config = load_checkpoint(ckpt, args.weights, args.vae)
    model.to(device)
    x0, folder_classes, described = clean_batch(model, config, args, device, cache)
    y = class_labels(model, len(x0), args.class_labels, folder_classes, args.seed)
    analysis = outliers.analyze_model(model, x0, y, args.timesteps, diffusion, seed=args.seed, top_k=args.top_k)
    return config, described, analysis


def write_report(results, out, settings=None):
    """Write stats.json and every plot for {label: (ckpt, config, input description, ModelAnalysis)}
    into `out`; returns the list of files written."""
    os.makedirs(out, exist_ok=True)
    written = []
    for label, (ckpt, config, described, analysis) in results.items():
        for t in analysis.timesteps:
            path = os.path.join(out, f"grid_{slug(label)}_t{t}.png")
            written.append(outliers.plot_token_grid(analysis.vectors[t], path, f"{label}, t={t}: one random token "
                                                    f"per layer, |value| vs channel", analysis.tokens))
        path = os.path.join(out, f"channel_rms_{slug(label)}.png")
        written.append(outliers.plot_channel_rms_heatmap(outliers.pooled_channel_rms(analysis.channel_rms), path,
                                                         f"{label}: channel RMS per layer (timesteps pooled)"))
    curves = {label: r[3].to_json()["stats"] for label, r in results.items()}
    written.append(outliers.plot_layer_curves(curves, os.path.join(out, "layer_curves.png")))
    written.append(outliers.plot_outliers_vs_timestep(curves, os.path.join(out, "outliers_vs_timestep.png")))
    stats = {"settings": settings or {}, "models": {
        label: {"ckpt": str(ckpt), "input": described, "config": config, **analysis.to_json()}
        for label, (ckpt, config, described, analysis) in results.items()}}
    path = os.path.join(out, "stats.json")
    with open(path, "w") as f:
        json.dump(stats, f, indent=1, default=str)
    written.append(path)
    return written


def print_summary(label, analysis):
    """One line per timestep: the loudest block value and the channel carrying most tokens' maxima."""
    for t in analysis.timesteps:
        blocks = {n: s for n, s in analysis.stats[t].items() if n.startswith("block.")}
        peak = max((s["max_abs"] for s in blocks.values()), default=float("nan"))
        chan = analysis.summary["per_timestep"].get(str(t), {})
        print(f"{label:>24s} t={t:4d}: max |x| over blocks {peak:10.4g}, argmax channel {chan.get('channel')} "
              f"(share {chan.get('share', 0):.2f}, layers agreeing {chan.get('layers_agree', 0):.2f})")


def main(argv=None):
    args = parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):  # before the analysis, not after it
        raise SystemExit(f"--out {args.out} is a file; give a folder (it is created if missing)")
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
