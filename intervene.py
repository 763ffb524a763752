"""What does the outlier channel carry? Replace it in a trained toy DiT and measure again.

For every checkpoint (a train_toy.py run or checkpoint file; EMA weights unless --weights raw), at every
place (each block's output and each normalization layer's input, or --places), the channel the probe calls
the outlier there is replaced by its mean over tokens, probe draws and timesteps ("mean"), by zero ("zero")
and by its mean per timestep ("per-t"), and the per-timestep eps error of the probe and the error of
samples from fixed noise are measured again (ditlab/toy/edits.py says exactly how). Run it on a
LayerNorm model and, as the control, on a no-LayerNorm one (whose loudest channel is edited the same way).

    python intervene.py --ckpt results/toy-runs/layer-norm-s0 results/toy-runs/none-s0   # after make toy
    python intervene.py --ckpt RUN --places final.norm block.1 --edits mean zero --num-samples 512

Writes <out>/interventions.json and <out>/interventions.md (one table per model: sampled error and
probe error relative to the unedited model, 1 = no change).
"""

import argparse
import os
import time

import torch

from diffusion import create_diffusion
from ditlab.analysis import load_for_analysis, model_labels
from ditlab.cli import COUNT, INDEX, NON_NEGATIVE, command
from ditlab.errors import InputError, UsageError
from ditlab.files import provenance, write_json
from ditlab.run import configure_threads
from ditlab.toy.edits import (EDITS, Progress, channel_statistics, check_toy_model, intervene, markdown,
                              places)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", required=True, help="train_toy.py run directories or checkpoint files")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--places", nargs="+", default=None, help="default: every block output and norm input")
    p.add_argument("--edits", nargs="+", choices=EDITS, default=list(EDITS))
    p.add_argument("--probe-samples", type=COUNT, default=256, help="probe noise draws per timestep")
    p.add_argument("--stats-samples", type=COUNT, default=64,
                   help="probe draws per timestep for the channel means (every timestep 0..999)")
    p.add_argument("--num-samples", type=COUNT, default=256, help="samples per measurement (fixed noise)")
    p.add_argument("--sampling-steps", type=COUNT, default=1000, help="DDPM steps of those samples")
    p.add_argument("--seed", type=INDEX, default=0, help="the samples' noise")
    p.add_argument("--threads", type=COUNT, default=None)
    p.add_argument("--progress-every", type=NON_NEGATIVE, default=15.0,
                   help="seconds between progress lines (0: after every measurement)")
    p.add_argument("--out", default="results/interventions")
    return p.parse_args(argv)


def check_places(names, ckpt, model):
    """Raise UsageError for a --places name that is not a place of the model."""
    known = [name for name, _, _ in places(model)]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise UsageError(f"--places {' '.join(unknown)}: not a place of {ckpt}; choose from {' '.join(known)}")


def edit_model(args, model, diffusion, sampler, prefix):
    """The channel statistics and every edit of one model, with a progress line every --progress-every
    seconds (each starting with `prefix`)."""
    model.eval()
    stats = channel_statistics(model, diffusion, num=args.stats_samples)
    return intervene(model, diffusion, sampler, args.places, args.edits, args.probe_samples, args.num_samples,
                     args.seed, stats, progress=Progress(prefix, every=args.progress_every))


@command
def main(argv=None):
    """Edit the outlier channel of every --ckpt, measure the errors again and write the tables to --out."""
    args = parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    os.makedirs(args.out, exist_ok=True)
    configure_threads(args.threads, num_params=0)
    diffusion = create_diffusion(timestep_respacing="")
    sampler = create_diffusion(timestep_respacing=str(args.sampling_steps))
    loaded = [load_for_analysis(ckpt, args.weights) for ckpt in args.ckpt]
    for ckpt, (model, _) in zip(args.ckpt, loaded):
        check_toy_model(model, f"--ckpt {ckpt}")
        check_places(args.places, ckpt, model)
    labels = model_labels(args.ckpt, [config for _, config in loaded])
    results, lines = {}, ["# Interventions on the outlier channel", "", provenance(), ""]
    started = time.monotonic()
    for i, (label, ckpt, (model, config)) in enumerate(zip(labels, args.ckpt, loaded)):
        prefix = f"[model {i + 1}/{len(loaded)} {label}] "
        edits = len(args.places or places(model)) * len(args.edits)
        print(f"{prefix}channel statistics, then {edits} edits ({(time.monotonic() - started) / 60:.1f} min so far)",
              flush=True)
        result = edit_model(args, model, diffusion, sampler, prefix)
        results[label] = dict(ckpt=str(ckpt), normalization=config.get("normalization"),
                              final_normalization=config.get("final_normalization"), **result)
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
