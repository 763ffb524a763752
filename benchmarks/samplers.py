"""Sample quality against the number of sampling steps for every sampler (ddpm, ddim, dpm-solver++, unipc),
and the wall time per image: on a toy run (every sampled value is an error) and on a digits demo run
(sample statistics against the real digits). Answers "how many steps does DPM-Solver++ need to match
250-step DDPM here?".

    make toy                                             # the toy runs: results/toy-runs/layer-norm-s0, none-s0
    python train.py --demo --max-steps 6000                                         # a digits run (optional)
    python -m benchmarks.samplers --toy-ckpt results/toy-runs/layer-norm-s0 \
        --digits-ckpt results/000-DiT-S-4-layer-norm --data-path data/digits

Toy: RMS error of 100 samples (400 pixels x 2 channels, the toy study's evaluation, clip_denoised as there),
for several noise seeds; DDPM also draws its step noise from the seed. Digits: --per-class images per class
with guidance (--cfg-scale), scored with ditlab/evaluation.py's digits route against the real digits (--data-path):
FD-digits (ADM's Frechet distance in the 128-d features of the cached digits classifier), precision and
recall (ADM's k = 3 manifolds in the same features) and the classifier's accuracy on the intended labels.
Real digits, as many per class from each seed, are scored the same way: the floor a perfect model reaches
at this sample count (they are part of the reference, so their precision and recall are optimistic).
The reference every sampler is compared with is 250-step DDPM: keep "ddpm" and 250 in the chosen samplers
and steps.
Time per image: the sampling call of one batch over its size (one process, this machine's threads).
Writes docs/figures/samplers_toy.png, docs/figures/samplers_digits.png (and samplers_digits_grid.png:
one image per class for a few settings, same starting noise), docs/results/samplers.md and --out/samplers.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from diffusion import create_diffusion
from ditlab.checkpoints import load_model
from ditlab.cli import COUNT, INDEX, NON_NEGATIVE
from ditlab.evaluation import Evaluator
from ditlab.features import DIGITS_CLASSIFIER, real_digits
from ditlab.sampling import SAMPLERS, SOLVERS, denoise, image_generators, sample_images, to_rgb, to_uint8
from ditlab.toy.task import sample_error

TOY_STEPS = (5, 10, 15, 20, 25, 50, 100, 250, 500, 1000)
DIGITS_STEPS = (5, 10, 25, 50, 100, 250)
# What is compared: the samplers as the flags give them, and DPM-Solver++ on the diffusion's own respaced
# timesteps (999 ... 0, like ddpm / ddim) instead of diffusers' linspace spacing (999 ... about 1000 / N).
SAMPLER_VARIANTS = {**{s: (s, "linspace") for s in SAMPLERS}, "dpm-solver++/respaced": ("dpm-solver++", "respaced")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy-ckpt", default=None, help="a train_toy.py run directory or checkpoint")
    p.add_argument("--digits-ckpt", default=None, help="a train.py digits demo run directory (optional)")
    p.add_argument("--data-path", default="data/digits", help="the real digits (ImageFolder), the digits reference")
    p.add_argument("--digits-classifier", default=DIGITS_CLASSIFIER, metavar="PATH",
                   help="the cached digits classifier (ditlab/evaluation.py; trained once, in seconds, when missing)")
    p.add_argument("--samplers", nargs="+", choices=list(SAMPLER_VARIANTS), default=list(SAMPLER_VARIANTS))
    p.add_argument("--toy-steps", type=COUNT, nargs="+", default=list(TOY_STEPS))
    p.add_argument("--digits-steps", type=COUNT, nargs="+", default=list(DIGITS_STEPS))
    p.add_argument("--toy-seeds", type=INDEX, nargs="+", default=[0, 1, 2])
    p.add_argument("--digits-seeds", type=INDEX, nargs="+", default=[0, 1])
    p.add_argument("--num-samples", type=COUNT, default=100, help="toy samples per seed (the toy study: 100)")
    p.add_argument("--per-class", type=COUNT, default=50, help="digits samples per class")
    p.add_argument("--cfg-scale", type=NON_NEGATIVE, default=4.0, help="guidance of the digits samples (the demo grid's)")
    p.add_argument("--threads", type=COUNT, default=1)
    p.add_argument("--grid-only", action="store_true", help="only the digits sample grid (docs/figures/...grid.png)")
    p.add_argument("--out", default="results/samplers", help="folder for samplers.json")
    p.add_argument("--figures", default="docs/figures")
    p.add_argument("--record", default="docs/results/samplers.md", help="markdown report ('' to skip)")
    return p.parse_args(argv)


def usable_steps(variant, steps):
    sampler, spacing = SAMPLER_VARIANTS[variant]
    return [s for s in steps if sampler not in SOLVERS or spacing == "respaced" or s < 1000]  # linspace repeats t


#################################################################################
#                                     Toy                                       #
#################################################################################


def toy_rows(model, args):
    """One row per (sampler, steps, seed): RMS / max error and time per image."""
    rows = []
    shape = (args.num_samples, model.in_channels, model.input_size, model.input_size)
    y = torch.zeros(args.num_samples, dtype=torch.long)
    for variant in args.samplers:
        sampler, spacing = SAMPLER_VARIANTS[variant]
        for steps in usable_steps(variant, args.toy_steps):
            diffusion = create_diffusion(str(steps))
            for seed in args.toy_seeds:
                torch.manual_seed(seed)
                noise = torch.randn(shape)
                t0 = time.perf_counter()
                x = denoise(model, diffusion, noise, y, sampler, clip_denoised=True, spacing=spacing)
                seconds = time.perf_counter() - t0
                err = sample_error(x)
                rows.append(dict(sampler=variant, steps=steps, seed=seed, rms=err["rms"], max_abs=err["max_abs"],
                                 ms_per_image=1000 * seconds / args.num_samples))
            rms = np.mean([r["rms"] for r in rows[-len(args.toy_seeds):]])
            print(f"toy {variant:22s} {steps:5d} steps: rms {rms:.3e}", file=sys.stderr, flush=True)
    return rows


#################################################################################
#                                    Digits                                     #
#################################################################################


DIGITS_METRICS = ("fd_digits", "precision", "recall", "accuracy")


def digits_evaluator(args):
    """ditlab/evaluation.py's digits route with the real digits (--data-path) as reference, built once: the
    reference's features and statistics are computed here, not per sampler."""
    return Evaluator(args.data_path, features="digits", digits_classifier=args.digits_classifier, device="cpu",
                     progress=False)


def score_digits(evaluator, x, y):
    """The DIGITS_METRICS of samples x (N, C, H, W) in about [-1, 1] drawn for labels y, as uint8 RGB images
    like the ones sample_ddp.py writes."""
    metrics = evaluator(to_uint8(to_rgb(x.clamp(-1, 1))), y.numpy())
    return {k: metrics[k] for k in DIGITS_METRICS}


def real_digits_rows(evaluator, args):
    """Real digits scored like the samples: per seed, --per-class digits of every class
    (features.real_digits, the demo's 16 x 16 crops, without replacement): the metrics' floor at this count."""
    rows = []
    for seed in args.digits_seeds:
        images, labels = real_digits(10 * args.per_class, seed)
        metrics = evaluator(images, labels)
        rows.append(dict(seed=seed, **{k: metrics[k] for k in DIGITS_METRICS}))
    print("digits real digits: " + ", ".join(f"{k} {np.mean([r[k] for r in rows]):.3f}" for k in DIGITS_METRICS),
          file=sys.stderr, flush=True)
    return rows


def digits_rows(model, evaluator, args):
    """One row per (sampler, steps, seed): the DIGITS_METRICS and the time per image."""
    y = torch.arange(model.num_classes).repeat_interleave(args.per_class)
    rows = []
    for variant in args.samplers:
        sampler, spacing = SAMPLER_VARIANTS[variant]
        for steps in usable_steps(variant, args.digits_steps):
            diffusion = create_diffusion(str(steps))
            for seed in args.digits_seeds:
                t0 = time.perf_counter()
                x = sample_images(model, diffusion, y, image_generators(seed, range(len(y))), args.cfg_scale,
                                  sampler=sampler, clip_denoised=True, spacing=spacing)
                seconds = time.perf_counter() - t0
                rows.append(dict(sampler=variant, steps=steps, seed=seed, **score_digits(evaluator, x, y),
                                 ms_per_image=1000 * seconds / len(y)))
            last = rows[-len(args.digits_seeds):]
            print(f"digits {variant:22s} {steps:4d} steps: " + ", ".join(
                f"{k} {np.mean([r[k] for r in last]):.3f}" for k in DIGITS_METRICS), file=sys.stderr, flush=True)
    return rows


# The rows of the digits sample grid: (variant, steps).
GRID_ROWS = (("ddpm", 250), ("ddim", 10), ("dpm-solver++", 5), ("dpm-solver++", 10), ("dpm-solver++", 25),
             ("unipc", 10))


def digits_grid(model, args, path):
    """One image per class for each GRID_ROWS setting, from the same starting noise (image i's generator of
    seed 0), as a labelled PNG: what the numbers above look like."""
    import matplotlib  # lazily: only the figures need it, and the Agg backend must be set first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = torch.arange(model.num_classes)
    fig, axes = plt.subplots(len(GRID_ROWS), 1, figsize=(model.num_classes * 0.8, len(GRID_ROWS) * 0.95))
    for ax, (variant, steps) in zip(axes, GRID_ROWS):
        sampler, spacing = SAMPLER_VARIANTS[variant]
        x = sample_images(model, create_diffusion(str(steps)), y, image_generators(0, range(len(y))), args.cfg_scale,
                          sampler=sampler, clip_denoised=True, spacing=spacing)
        row = torch.cat(list((x.clamp(-1, 1).mean(1) + 1) / 2), dim=1)  # the images side by side, grayscale
        ax.imshow(row.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{variant}\n{steps} steps", rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


#################################################################################
#                               Summary and report                              #
#################################################################################


def summarize(rows, metric):
    """{sampler: {steps: (mean, min, max) of metric over seeds, plus the median ms per image}}."""
    out = {}
    for row in rows:
        out.setdefault(row["sampler"], {}).setdefault(row["steps"], []).append(row)
    return {s: {n: dict(mean=statistics.fmean(r[metric] for r in rs), lo=min(r[metric] for r in rs),
                        hi=max(r[metric] for r in rs), ms=statistics.median(r["ms_per_image"] for r in rs))
                for n, rs in sorted(by.items())} for s, by in out.items()}


def steps_to_match(summary, reference, better):
    """Per sampler, the fewest steps whose mean is at least as good as `reference` (None: never)."""
    return {s: next((n for n, v in by.items() if better(v["mean"], reference)), None) for s, by in summary.items()}


def plot(panels, path):
    """panels: [(summary, title, ylabel, log_y, reference, floor)]; one line per sampler, min-max band over
    seeds, the reference (DDPM-250) dashed and, where given (not None), the real digits' floor dotted; the
    legend in the first panel."""
    import matplotlib  # lazily: only the figures need it, and the Agg backend must be set first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 5.5 if len(panels) == 1 else 4.3 * len(panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4), squeeze=False)
    for ax, (summary, title, ylabel, log_y, reference, floor) in zip(axes[0], panels):
        for sampler, by in summary.items():
            steps = list(by)
            ax.plot(steps, [by[n]["mean"] for n in steps], marker="o", ms=3, label=sampler)
            ax.fill_between(steps, [by[n]["lo"] for n in steps], [by[n]["hi"] for n in steps], alpha=0.2)
        ax.axhline(reference, color="gray", ls="--", lw=1, label="DDPM, 250 steps")
        if floor is not None:
            ax.axhline(floor, color="black", ls=":", lw=1, label="real digits, same count")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="sampling steps (model evaluations)", ylabel=ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)  # the same lines in every panel
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary, metric_name, fmt, steps, times=True):
    """Markdown: a row per sampler, a column per step count (mean [min, max] over seeds), then (times) a row
    of ms per image per sampler."""
    lines = [f"| {metric_name} | " + " | ".join(str(n) for n in steps) + " |", "|---|" + "---:|" * len(steps)]
    for sampler, by in summary.items():
        cells = [f"{fmt(by[n]['mean'])} [{fmt(by[n]['lo'])}, {fmt(by[n]['hi'])}]" if n in by else "-" for n in steps]
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    for sampler, by in summary.items() if times else ():
        cells = [f"{by[n]['ms']:.2f}" if n in by else "-" for n in steps]
        lines.append(f"| {sampler}, ms per image | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def toy_section(args, toy):
    return [f"## Toy ({args.toy_ckpt}, EMA): RMS error of {args.num_samples} samples, mean [min, max] over seeds "
            f"{args.toy_seeds}", "", table(toy["summary"], "RMS error", lambda v: f"{v:.2e}", args.toy_steps), "",
            f"DDPM 250 steps: {toy['reference']:.2e}. Fewest steps to match it: "
            + ", ".join(f"{s} {n}" for s, n in toy["match"].items()), ""]


DIGITS_NAMES = {"fd_digits": "FD-digits", "precision": "precision", "recall": "recall", "accuracy": "accuracy"}


def digits_section(args, d):
    """The digits tables (FD-digits with the times, then precision, recall and accuracy) and summary lines."""
    def fmt(k, v):
        return f"{v:.2f}" if k == "fd_digits" else f"{v:.3f}"

    lines = [f"## Digits ({args.digits_ckpt}, EMA, cfg {args.cfg_scale}, {args.per_class} per class, "
             f"reference {args.data_path}), mean [min, max] over seeds {args.digits_seeds}", ""]
    for i, k in enumerate(DIGITS_METRICS):
        lines += [table(d["summary"][k], DIGITS_NAMES[k], lambda v, k=k: fmt(k, v), args.digits_steps, times=i == 0),
                  ""]
    real = ", ".join(f"{DIGITS_NAMES[k]} {fmt(k, v['mean'])} [{fmt(k, v['lo'])}, {fmt(k, v['hi'])}]"
                     for k, v in d["real"].items())
    ref = ", ".join(f"{DIGITS_NAMES[k]} {fmt(k, v)}" for k, v in d["reference"].items())
    return lines + [f"Real digits, {args.per_class} per class per seed: {real}.  ", f"DDPM 250 steps: {ref}. Fewest "
                    f"steps to match its FD-digits: " + ", ".join(f"{s} {n}" for s, n in d["match_fd"].items()), ""]


def record(args, results, path):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    import diffusers  # lazily: a slow import, only for its version here

    lines = [f"# Samplers: quality against steps ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python -m benchmarks.samplers {' '.join(sys.argv[1:])}`  ",
             f"Commit {commit.strip()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
             f"{platform.processor() or platform.machine()}, {args.threads} thread(s).", ""]
    if "toy" in results:
        lines += toy_section(args, results["toy"])
    if "digits" in results:
        lines += digits_section(args, results["digits"])
    with open(path, "w") as f:
        f.write("\n".join(lines))


def check_reference(args):
    """Every result is compared with 250-step DDPM: stop before any sampling when it is not among the
    chosen samplers and steps."""
    parts = [("--toy-steps", args.toy_steps)] * bool(args.toy_ckpt)
    parts += [("--digits-steps", args.digits_steps)] * bool(args.digits_ckpt and not args.grid_only)
    for flag, steps in parts:
        if "ddpm" not in args.samplers or 250 not in steps:
            raise SystemExit(f"the reference, 250-step DDPM, must be included: keep ddpm in --samplers (given "
                             f"{' '.join(args.samplers)}) and 250 in {flag} (given {' '.join(map(str, steps))})")


def digits_results(model, args):
    """Sample and score the digits (real digits too); summaries, the DDPM-250 reference, the figure."""
    evaluator = digits_evaluator(args)
    rows, real_rows = digits_rows(model, evaluator, args), real_digits_rows(evaluator, args)
    summary = {k: summarize(rows, k) for k in DIGITS_METRICS}
    reference = {k: summary[k]["ddpm"][250]["mean"] for k in DIGITS_METRICS}
    real = {k: dict(mean=statistics.fmean(r[k] for r in real_rows), lo=min(r[k] for r in real_rows),
                    hi=max(r[k] for r in real_rows)) for k in DIGITS_METRICS}
    titles = {"fd_digits": "FD-digits (lower is better)", "precision": "precision (ADM, k = 3)",
              "recall": "recall (ADM, k = 3)", "accuracy": "accuracy on the intended labels"}
    plot([(summary[k], f"digits: {titles[k]}", DIGITS_NAMES[k], False, reference[k], real[k]["mean"])
          for k in DIGITS_METRICS], os.path.join(args.figures, "samplers_digits.png"))
    return dict(rows=rows, real_rows=real_rows, summary=summary, reference=reference, real=real,
                match_fd=steps_to_match(summary["fd_digits"], reference["fd_digits"], lambda v, r: v <= r))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    if not (args.toy_ckpt or args.digits_ckpt):
        raise SystemExit("pass --toy-ckpt and/or --digits-ckpt")
    check_reference(args)
    if args.toy_ckpt:
        model, _ = load_model(args.toy_ckpt)
        rows = toy_rows(model, args)
        summary = summarize(rows, "rms")
        reference = summary["ddpm"][250]["mean"]
        results["toy"] = dict(rows=rows, summary=summary, reference=reference,
                              match=steps_to_match(summary, reference, lambda v, r: v <= r))
        plot([(summary, "toy: RMS error of the samples (target 0)", "RMS error", True, reference, None)],
             os.path.join(args.figures, "samplers_toy.png"))
    if args.digits_ckpt:
        model, _ = load_model(args.digits_ckpt)
        digits_grid(model, args, os.path.join(args.figures, "samplers_digits_grid.png"))
        if args.grid_only:
            return results
        results["digits"] = digits_results(model, args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "samplers.json"), "w") as f:
        json.dump(results, f, indent=1)
    if args.record:
        record(args, results, args.record)
        print(open(args.record).read())
    return results


if __name__ == "__main__":
    main()
