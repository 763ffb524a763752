"""Export a DiT of this repo as a diffusers pipeline folder that `DiTPipeline.from_pretrained(DIR)` loads.

    python export_diffusers.py --ckpt results/000-DiT-XL-2-layer-norm --out exports/dit-xl
    python export_diffusers.py --ckpt DiT-XL-2-256x256.pt --out exports/official    # the official weights
    python export_diffusers.py --ckpt results/003-run/checkpoints/0400000.pt --out exports/raw --weights raw

The folder holds transformer/ (DiTTransformer2DModel, safetensors), scheduler/ (DPM-Solver++ 2M on the
training betas), vae/ (a copy of the run's VAE, its scaling_factor set to the run's latent scale; a Hub VAE
that is not cached here is named instead, pass it to from_pretrained(..., vae=...)), model_index.json
(id2label where the class names are known: the run's image folder or latent index) and dit_config.json
(this repo's config, so that --ckpt DIR loads it back bit for bit).

    from diffusers import DiTPipeline
    from ditlab.diffusers_interop import make_exact
    pipe = DiTPipeline.from_pretrained("exports/dit-xl")
    make_exact(pipe.transformer)          # optional: the original DiT's arithmetic (see below)
    images = pipe(class_labels=[207, 360], num_inference_steps=25).images

diffusers' DiT differs slightly from the original (its timestep frequencies are divided by half - 1, not
half); the export writes the original LayerNorm eps (norm_eps 1e-6), and make_exact() also patches the
frequencies on a loaded model. At the end this script measures the exported model against ours on the
same random inputs, as diffusers loads it and after make_exact. Only LayerNorm models can be exported;
DiTPipeline guides with the null class 1000, so guidance_scale > 1 needs a 1000-class model.
"""

import argparse
import sys

from ditlab.checkpoints import WEIGHTS, load_model
from ditlab.cli import COUNT, command
from ditlab.diffusers_interop import build_transformer, check_export_folder, export_pipeline, measure_difference
from models import DiT_models


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run directory, checkpoint file, official file name or hf:REPO")
    p.add_argument("--out", default=None, help="folder to write (created)")
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="EMA or raw weights of a training checkpoint")
    p.add_argument("--image-size", type=COUNT, default=None, help="only for a bare state dict: its image size")
    p.add_argument("--model", choices=list(DiT_models), default=None, help="only for a bare state dict: its model")
    p.add_argument("--no-check", action="store_true", help="skip the exported-vs-ours measurement")
    p.add_argument("--check-only", action="store_true",
                   help="write nothing: only measure the diffusers copy against ours (pixel-space models too)")
    p.add_argument("--check-samples", type=COUNT, default=4, help="random inputs of the measurement")
    args = p.parse_args(argv)
    if args.out is None and not args.check_only:
        p.error("--out DIR is required (or --check-only)")
    return args


@command
def main(argv=None):
    """Export --ckpt to --out (unless --check-only) and measure the diffusers copy against ours; returns --out."""
    args = parse_args(argv)
    if not args.check_only:
        check_export_folder(args.out)
    model, config = load_model(args.ckpt, args.weights, must_match=("model", "image_size"), bare_model="DiT-XL/2",
                               model=args.model, image_size=args.image_size)
    if args.check_only:
        written = dict(transformer=build_transformer(model))
    else:
        written = export_pipeline(model, config, args.out, args.weights, source=args.ckpt)
        print(f"wrote {args.out}: {config['model']} ({args.weights} weights), vae {written['vae']}, "
              f"id2label {'written' if written['id2label'] else 'unknown'}", file=sys.stderr)
    if not args.no_check:
        for mode, diff in measure_difference(model, written["transformer"], n=args.check_samples).items():
            print(f"exported vs ours ({mode}): max |diff| {diff['max_abs']:.3e} (max |ours| {diff['max_ours']:.3g}), "
                  f"relative RMS {diff['rel_rms']:.3e}", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()
