"""What does the outlier channel carry? Replace it in a trained DiT, toy or image model, and measure again.

For every checkpoint (a train_toy.py or train.py run, or a checkpoint file; EMA weights unless --weights raw),
at every place (each block's output and each normalization layer's input, or --places), the channel the probe
calls the outlier there is replaced by its mean over tokens, probe inputs and timesteps ("mean"), by zero
("zero") and by its mean per timestep ("per-t"), and the per-timestep eps and x0 errors of the probe are
measured again (ditlab/edits.py says exactly how); so is a channel of ordinary size at each place, the
control (--no-control: skip it). Run it on a LayerNorm model and on a no-LayerNorm one, whose loudest
channel is edited the same way.

A toy model is probed on its own task and samples from fixed noise are drawn under every edit. An image
model is probed on --data-path images with their labels (pixels, or latents through the run's VAE), and
samples are drawn under the edits at --sample-places only, scored against --eval-ref (FD-digits and
accuracy with --eval-features digits; FID with Inception weights). --probe-only writes the unedited
probe alone: per-timestep errors and the signal/outlier statistics at every norm input.

    python intervene.py --ckpt results/toy-runs/layer-norm-s0 results/toy-runs/none-s0   # after make toy
    python intervene.py --ckpt RUN --places final.norm block.1 --edits mean zero --num-samples 512
    python intervene.py --ckpt results/digits-demo-run --data-path data/digits --eval-ref data/digits \
        --eval-features digits --sampling-steps 100        # an image model (the digits demo)

Writes <out>/interventions.json and <out>/interventions.md (one table per model: the samples' metric and
the probe's errors relative to the unedited model, 1 = no change), and for an image model
<out>/grids_<model>.npz: its first 20 samples unedited and under each sampled edit (the same noise and labels).
"""

import argparse
import os
import time

import numpy as np
import torch

from diffusion import create_diffusion
from ditlab.analysis import is_toy, load_for_analysis, model_labels, probe_data, slug
from ditlab.cli import COUNT, INDEX, NON_NEGATIVE, command
from ditlab.data import load_vae
from ditlab.edits import EDITS, Progress, channel_statistics, intervene, markdown, places, toy_sampler
from ditlab.errors import InputError, UsageError
from ditlab.evaluation import Evaluator
from ditlab.features import DIGITS_CLASSIFIER
from ditlab.files import provenance, write_json
from ditlab.probe import probe
from ditlab.run import configure_threads
from ditlab.sampling import draw_images


GRID, GRID_IMAGES = "grid", 20  # the first samples of every sampled measurement, kept for a figure


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", required=True, help="run directories or checkpoint files (toy or image)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--places", nargs="+", default=None, help="default: every block output and norm input")
    p.add_argument("--edits", nargs="+", choices=EDITS, default=list(EDITS))
    p.add_argument("--no-control", action="store_true", help="skip the channel of ordinary size at each place")
    p.add_argument("--probe-only", action="store_true", help="only the unedited probe (no edits, no samples)")
    p.add_argument("--probe-samples", type=COUNT, default=256, help="probe inputs (noise draws or images) per timestep")
    p.add_argument("--stats-samples", type=COUNT, default=64,
                   help="probe inputs per timestep for the channel means (every timestep 0..999)")
    p.add_argument("--num-samples", type=COUNT, default=256, help="samples per measurement (fixed noise)")
    p.add_argument("--sampling-steps", type=COUNT, default=1000, help="DDPM steps of those samples")
    p.add_argument("--seed", type=INDEX, default=0, help="the samples' noise and the choice of probe images")
    g = p.add_argument_group("image models")
    g.add_argument("--data-path", default=None, help="the images the probe denoises (class subfolders: labels)")
    g.add_argument("--vae", default=None, help="override the run's VAE (latent models)")
    g.add_argument("--sample-places", nargs="*", default=["final.norm"],
                   help="places where samples are drawn under the edits (default: the final norm's input)")
    g.add_argument("--sample-top", type=INDEX, default=1, metavar="K",
                   help="also sample under the edits of the K other places whose edits move the probe most")
    g.add_argument("--eval-ref", default=None, help="reference images or ADM batch to score the samples against "
                   "(without it an image model's edits are probed but not sampled)")
    g.add_argument("--eval-features", choices=["inception", "digits"], default="inception")
    g.add_argument("--inception-weights", default=None)
    g.add_argument("--digits-classifier", default=DIGITS_CLASSIFIER)
    p.add_argument("--threads", type=COUNT, default=None)
    p.add_argument("--progress-every", type=NON_NEGATIVE, default=15.0,
                   help="seconds between progress lines (0: after every measurement)")
    p.add_argument("--out", default="results/interventions")
    return p.parse_args(argv)


def check_places(names, ckpt, model, flag="--places"):
    """Raise UsageError for a place name that is not a place of the model."""
    known = [name for name, _, _ in places(model)]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise UsageError(f"{flag} {' '.join(unknown)}: not a place of {ckpt}; choose from {' '.join(known)}")


def image_sampler(args, model, config, evaluator):
    """An image model's sampling function for the edits: --num-samples images from fixed noise and labels
    (sample_ddp.py's set at --seed), decoded and scored by `evaluator`; returns its metrics."""
    sampler = create_diffusion(timestep_respacing=str(args.sampling_steps))
    vae = None if config["vae"] == "none" else load_vae(config["vae"], next(model.parameters()).device)

    def sample(m):
        images, labels = draw_images(m, sampler, list(range(args.num_samples)), args.seed, vae=vae,
                                     latent_scale=float(config["latent_scale"]))
        metrics = evaluator(images, labels=labels)
        return {**{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                GRID: images[:GRID_IMAGES]}  # the same noise and labels under every edit: a grid compares them
    return sample


def save_grids(result, path):
    """Move the sample grids out of `result` (arrays, not JSON) into one .npz: "unedited" and "<place>/<edit>"
    -> uint8 (N, H, W, 3); returns the path, or None when nothing was sampled."""
    grids = {}
    base = result.get("baseline", {}).get("sample", {})
    if GRID in base:
        grids["unedited"] = base.pop(GRID)
    for place, entry in result.get("places", {}).items():
        for edit in EDITS:
            sample = entry.get(edit, {}).get("sample", {})
            if GRID in sample:
                grids[f"{place}/{edit}"] = sample.pop(GRID)
    if not grids:
        return None
    np.savez_compressed(path, **grids)
    return path


def edit_model(args, model, config, diffusion, prefix, evaluator=None):
    """The probe, the channel statistics and every edit of one model, with a progress line every
    --progress-every seconds (each starting with `prefix`)."""
    model.eval()
    data = probe_data(model, config, args.data_path, args.probe_samples, args.seed, torch.device("cpu"))
    errors, embeddings = probe(model, diffusion, data=data)
    found = dict(probe=dict(errors=errors, norm_inputs=[r for r in embeddings if r["kind"] == "norm_input"],
                            outliers=[r for r in embeddings if r["kind"] == "outliers"]))
    if args.probe_only:
        return found
    stats = channel_statistics(model, diffusion, data=data.subset(args.stats_samples))
    if is_toy(model):
        sample_fn = toy_sampler(create_diffusion(str(args.sampling_steps)), args.num_samples, args.seed)
        sample_places, key = None, "rms"
    else:
        sample_fn = image_sampler(args, model, config, evaluator) if evaluator else None
        sample_places, key = args.sample_places, ("fd_digits" if args.eval_features == "digits" else "fid")
    result = intervene(model, diffusion, None, args.places, args.edits, data=data, stats=stats, sample_fn=sample_fn,
                       sample_places=sample_places, sample_key=key, control=not args.no_control,
                       sample_top=0 if sample_places is None else args.sample_top,
                       progress=Progress(prefix, every=args.progress_every))
    return {**found, **result}


@command
def main(argv=None):
    """Edit the outlier channel of every --ckpt, measure the errors again and write the tables to --out."""
    args = parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    configure_threads(args.threads, num_params=0)
    diffusion = create_diffusion(timestep_respacing="")
    loaded = [load_for_analysis(ckpt, args.weights, args.vae) for ckpt in args.ckpt]
    for ckpt, (model, _) in zip(args.ckpt, loaded):  # every input checked before any work starts
        check_places(args.places, ckpt, model)
        if not is_toy(model):
            check_places(args.sample_places, ckpt, model, "--sample-places")
            if not args.data_path:
                raise UsageError(f"--ckpt {ckpt} is an image model, probed on real images: pass --data-path DIR "
                                 "(e.g. data/digits for the digits demo)")
    images = not all(is_toy(model) for model, _ in loaded)
    evaluator = None
    if images and args.eval_ref and not args.probe_only:
        evaluator = Evaluator(args.eval_ref, features=args.eval_features, inception_weights=args.inception_weights,
                              digits_classifier=args.digits_classifier, device="cpu", progress=False)
    os.makedirs(args.out, exist_ok=True)
    labels = model_labels(args.ckpt, [config for _, config in loaded])
    results, lines = {}, ["# Interventions on the outlier channel", "", provenance(), ""]
    started = time.monotonic()
    for i, (label, ckpt, (model, config)) in enumerate(zip(labels, args.ckpt, loaded)):
        prefix = f"[model {i + 1}/{len(loaded)} {label}] "
        edits = 0 if args.probe_only else len(args.places or places(model)) * len(args.edits)
        print(f"{prefix}probe, channel statistics, then {edits} edits "
              f"({(time.monotonic() - started) / 60:.1f} min so far)", flush=True)
        result = edit_model(args, model, config, diffusion, prefix, evaluator)
        grids = save_grids(result, os.path.join(args.out, f"grids_{slug(label)}.npz"))
        if grids:
            result["grids"] = os.path.basename(grids)
        results[label] = dict(ckpt=str(ckpt), normalization=config.get("normalization"),
                              final_normalization=config.get("final_normalization"), **result)
        if not args.probe_only:
            lines += markdown(label, result)
            print("\n".join(markdown(label, result)), flush=True)
    write_json(os.path.join(args.out, "interventions.json"), dict(settings=vars(args), models=results))
    with open(os.path.join(args.out, "interventions.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}/interventions.json and interventions.md")
    return results


if __name__ == "__main__":
    with torch.no_grad():
        main()
