"""The embedding analysis of trained DiTs (analyze_embeddings.py and the TokenEmbeddingsViz notebook): load
each checkpoint, build a clean batch (images through the VAE, or Gaussian latents), capture every layer's
token embeddings at chosen timesteps, and write stats.json and the figures.

Layer: above checkpoints, data and outliers; below the studies and the commands. Failures raise the
errors of ditlab.errors, their message naming the flag to change."""

import json
import os
import re
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ditlab import outliers
from ditlab.checkpoints import load_model
from ditlab.constants import LATENT_SCALE
from ditlab.data import center_crop_arr, load_vae
from ditlab.errors import DitlabError, InputError, UsageError
from ditlab.probe import TOY_SHAPE, image_data, toy_data

DEFAULT_TIMESTEPS = (50, 250, 500, 750, 999)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VAE_DOWNSAMPLE = 8


#################################################################################
#                                   Models                                      #
#################################################################################


def load_for_analysis(ckpt, weights="ema", vae=None):
    """(model, config) for one --ckpt, with vae/latent_scale/image_size always filled in.

    A failure to find, read or build the checkpoint raises load_model's error (same class), its message
    starting with the --ckpt."""
    try:
        model, config = load_model(ckpt, weights=weights)
    except DitlabError as e:
        raise type(e)(f"--ckpt {ckpt}: {e}") from e
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
    base = [b if c.get("final_normalization") in (None, b) else f"{b}, final {c['final_normalization']}"
            for b, c in zip(base, configs)]
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
    lying directly in data_path. InputError when there are none."""
    found = []
    for root, dirs, files in os.walk(data_path):
        dirs.sort()
        rel = os.path.relpath(root, data_path)
        folder = "" if rel == "." else rel.split(os.sep)[0]
        found += [(os.path.join(root, f), folder) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not found:
        raise InputError(f"--data-path {data_path}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
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
            raise InputError(f"--data-path {data_path}: cannot read image {path}: {e}") from e
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
    by their preprocessing so checkpoints that share it see exactly the same x0. UsageError when the
    images or their latents do not fit the model's input."""
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
            raise UsageError(f"a pixel-space model (vae 'none') expecting {shape[1:]} cannot take RGB images of "
                             f"{tuple(x.shape[1:])}; drop --data-path to use Gaussian inputs")
        return x, (classes if num_folders == model.num_classes else None), f"pixels of {args.data_path}"
    latent_key = ("latents", size, vae, float(config["latent_scale"]))
    if latent_key not in cache:
        cache[latent_key] = encode(load_vae(vae, device), x, float(config["latent_scale"]), args.seed).cpu()
    x0 = cache[latent_key]
    if x0.shape[1:] != shape[1:]:
        raise UsageError(f"latents of shape {tuple(x0.shape[1:])} from vae {vae!r} do not fit the model's input "
                         f"{shape[1:]}; check the checkpoint's image_size and --vae")
    return x0, (classes if num_folders == model.num_classes else None), f"{vae} latents of {args.data_path}"


def class_labels(model, n, given, folder_classes, seed):
    """Labels for n inputs: --class-labels repeated to n, else the image folders' classes, else random
    classes from `seed`. UsageError for a label outside the model's classes."""
    if given:
        labels = torch.tensor([given[i % len(given)] for i in range(n)])
        if labels.min() < 0 or labels.max() >= model.num_classes:
            raise UsageError(f"--class-labels must lie in [0, {model.num_classes - 1}]; got {given}")
        return labels
    if folder_classes is not None:
        return folder_classes
    return torch.randint(model.num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def is_toy(model):
    """Whether `model` takes the toy task's 2x2x2 inputs (train_toy.py's) rather than images or latents."""
    return (model.in_channels, model.input_size, model.input_size) == TOY_SHAPE


def probe_data(model, config, data_path, num, seed, device, cache=None):
    """The probe's data for one model (probe.ProbeData): for a toy model its `num` draws (Gaussian images of
    the run's data_std, or all zero); for an image model `num` images of `data_path` chosen with `seed` (as
    analyze_embeddings.py takes them: pixels, or latents through the run's VAE), with their class folders as
    labels where they match the model's classes (else labels drawn from `seed`). UsageError for an image
    model without images."""
    if is_toy(model):
        return toy_data(num, data_std=float(config.get("data_std") or 0.0))
    if not data_path:
        raise UsageError("an image model is probed on real images: pass --data-path DIR (e.g. data/digits for the "
                         "digits demo, the folder train.py --demo writes)")
    args = SimpleNamespace(data_path=data_path, batch_size=num, seed=seed, zero_data=False, class_labels=None)
    x0, folder_classes, _ = clean_batch(model, config, args, device, {} if cache is None else cache)
    return image_data(x0, class_labels(model, len(x0), None, folder_classes, seed))


#################################################################################
#                                   Report                                      #
#################################################################################


def analyze_checkpoint(ckpt, args, device, cache, diffusion):
    """Load one checkpoint, build its clean batch and run outliers.analyze_model; returns
    (config, input description, outliers.ModelAnalysis)."""
    model, config = load_for_analysis(ckpt, args.weights, args.vae)
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
