"""The normalization ablation (`make ablation`): every variant on the toy study and on the digits demo.

  1. Toy identity study: train_toy.py for every variant and seed (the same CPU preset and seeds as
     `make toy`), sample errors at each evaluated step.
  2. Digits demo: train.py's built-in demo (pixel-space DiT on scikit-learn's digits) for every variant
     and seed, shortened to --digits-steps; then the quality of its samples (sample_ddp.py --eval-ref
     data/digits --eval-features digits: FD-digits, precision, recall and the digits classifier's accuracy
     on the intended labels, ditlab/evaluation.py), the final training loss and, for the first seed, the
     embedding-outlier statistics of analyze_embeddings.py on the trained EMA weights. A finished run or
     scored sample set is reused by a rerun.

Writes to --out (results/ablation/): summary.md (both tables), summary.json, toy_errors.png (toy error
per variant), and the outlier plots of the digits models under outliers/.

    python ablation.py                                   # all variants, seed 0, about 35 min on 2 CPU cores
    python ablation.py --variants layer-norm dyt --seeds 0 1 2
    python ablation.py --skip-toy --seeds 0 1 2          # the digits quality table alone
"""

import argparse
import glob
import json
import os
import statistics
import sys
import time

import matplotlib.pyplot as plt

from ditlab.checkpoints import load_checkpoint
from ditlab.cli import COUNT, INDEX, NON_NEGATIVE
from ditlab.evaluation import Evaluator
from ditlab.features import DIGITS_CLASSIFIER, real_digits
from ditlab.files import provenance
from ditlab.jobs import run_jobs
from ditlab.run import newest_run
from ditlab.toy.readers import final_loss, load_config, load_metrics
from ditlab.toy.report import summarize
from ditlab.toy.sweep import train_runs
from models import NORM_LAYERS

VARIANTS = ["layer-norm", "none", "rms-norm", "dyt"]
COLORS = {"layer-norm": "tab:red", "none": "tab:blue", "rms-norm": "tab:green", "dyt": "tab:purple"}


# ---------------------------------------------------------------------------------------------------
# 1. Toy study
# ---------------------------------------------------------------------------------------------------

def run_toy(variants, seeds, parallel, results_dir, extra):
    jobs = [(v, s, extra) for s in seeds for v in variants]
    print(f"[ablation] toy study: {len(jobs)} runs", flush=True)
    return train_runs(jobs, parallel, results_dir, os.path.join(results_dir, "logs"))


def toy_table(runs):
    """Per variant, the errors at the last evaluated step (EMA and raw), mean and range over seeds."""
    last = {}
    for run in runs:
        cfg = load_config(run)
        rows = load_metrics(run)
        step = max(r["step"] for r in rows)
        for r in rows:
            if r["step"] == step:
                last.setdefault((cfg["normalization"], r["weights"]), []).append(r)
    table = {}
    losses = summarize(runs)["final_loss"]
    for (norm, weights), rows in last.items():
        table.setdefault(norm, {"step": rows[0]["step"], "seeds": len(rows), "final_loss": losses.get(norm, {}).get("mean")})
        for e in ("rms", "max_abs"):
            values = [r[e] for r in rows]
            table[norm][f"{weights}_{e}"] = dict(mean=statistics.fmean(values), min=min(values), max=max(values))
    return table


def plot_toy(runs, path):
    """RMS error of the EMA weights against training step, one colour per variant, one line per seed."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    seen = set()
    for run in runs:
        norm = load_config(run)["normalization"]
        pts = sorted((r["step"], r["rms"]) for r in load_metrics(run) if r["weights"] == "ema")
        ax.plot(*zip(*pts), marker="o", color=COLORS.get(norm), label=None if norm in seen else norm)
        seen.add(norm)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("RMS of sampled pixels (EMA weights)")
    ax.set_title("Toy identity study: error per normalization variant")
    ax.axhline(1 / 127.5, color="0.5", lw=0.8, ls=":", label="one 8-bit level")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# 2. Digits demo + outliers
# ---------------------------------------------------------------------------------------------------

def finished_digits_run(results_dir, variant, seed, steps):
    """The newest digits run of this variant and seed that reached `steps`, or None."""
    run = newest_run(results_dir, {"normalization": variant, "max_steps": steps, "global_seed": seed})
    return run if run and load_checkpoint(run, mmap=True)["step"] >= steps else None


def run_digits(args, results_dir, log_dir):
    """The digits demo for every --variants and --seeds at --digits-steps, --parallel at a time (ditlab/jobs.py, logs only), skipping finished runs; returns
    [(variant, seed, run directory)]."""
    variants, seeds, steps = args.variants, args.seeds, args.digits_steps
    todo = [(v, s) for s in seeds for v in variants if not finished_digits_run(results_dir, v, s, steps)]
    cmds = [[sys.executable, "train.py", "--demo", "--normalization", v, "--global-seed", str(s), "--max-steps",
             str(steps), "--results-dir", results_dir, "--sample-every", "0"] for v, s in todo]
    print(f"[ablation] digits demo: {len(cmds)} runs of {steps} steps "
          f"({len(variants) * len(seeds) - len(cmds)} already done)", flush=True)
    run_jobs(cmds, args.parallel, log_dir)
    return [(v, s, finished_digits_run(results_dir, v, s, steps)) for s in seeds for v in variants]


def score_digits(runs, args, sample_root, log_dir):
    """Sample every digits run (sample_ddp.py, one sample folder per run) and score the samples against the
    digits (FD-digits, precision, recall, accuracy); returns {run: metrics}. Scored runs are not redone."""
    cmds, folders = [], {}
    for _, _, run in runs:
        folders[run] = os.path.join(sample_root, os.path.basename(run))
        if not glob.glob(os.path.join(folders[run], "*.metrics.json")):
            cmds.append([sys.executable, "sample_ddp.py", "--ckpt", run, "--device", "cpu", "--sample-dir", folders[run],
                         "--num-fid-samples", str(args.quality_samples), "--per-proc-batch-size", "250",
                         "--num-sampling-steps", str(args.quality_steps), "--cfg-scale", str(args.quality_cfg),
                         "--eval-ref", args.digits_ref, "--eval-features", "digits", "--digits-classifier",
                         args.digits_classifier])
    print(f"[ablation] digits quality: sampling {len(cmds)} runs ({args.quality_samples} images, "
          f"{args.quality_steps} DDPM steps, cfg {args.quality_cfg})", flush=True)
    run_jobs(cmds, args.parallel, log_dir)
    out = {}
    for run, folder in folders.items():
        (path,) = glob.glob(os.path.join(folder, "*.metrics.json"))
        with open(path) as f:
            out[run] = json.load(f)
    return out


def real_digits_floor(args, seed=0):
    """The metrics of real digits against the same reference: --quality-samples of the 1,797 digits
    (features.real_digits: classes balanced, without replacement), the floor a perfect model would reach."""
    images, labels = real_digits(args.quality_samples, seed)
    evaluator = Evaluator(args.digits_ref, features="digits", digits_classifier=args.digits_classifier, device="cpu",
                          progress=False)
    return evaluator(images, labels)


QUALITY = ("fd_digits", "precision", "recall", "accuracy")
QUALITY_LABELS = {"fd_digits": "FD-digits (lower is better)", "precision": "precision", "recall": "recall",
                  "accuracy": "accuracy on the intended labels"}


def plot_quality(quality, floor, variants, path):
    """One panel per quality metric: every seed's value per variant (dots), the mean (bar), the real-digits
    floor (dashed)."""
    fig, axes = plt.subplots(1, len(QUALITY), figsize=(3.2 * len(QUALITY), 3.4))
    shown = [v for v in variants if v in quality]
    for ax, key in zip(axes, QUALITY):
        for i, v in enumerate(shown):
            values = quality[v][key]["values"]
            ax.bar(i, quality[v][key]["mean"], color=COLORS.get(v), alpha=0.35)
            ax.plot([i] * len(values), values, "o", color=COLORS.get(v), ms=4)
        if floor and floor.get(key) is not None:
            ax.axhline(floor[key], color="0.3", ls="--", lw=1, label="real digits")
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=30, fontsize=8)
        ax.set_title(QUALITY_LABELS[key], fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Digits demo: sample quality per normalization (dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def quality_table(runs, scores):
    """Per variant: each quality metric and the final training loss, mean and range over seeds."""
    table = {}
    for variant, seed, run in runs:
        row = table.setdefault(variant, {"seeds": [], **{k: [] for k in (*QUALITY, "final_loss")}})
        row["seeds"].append(seed)
        for k in QUALITY:
            row[k].append(scores[run][k])
        row["final_loss"].append(final_loss(run))
    for row in table.values():
        for k in (*QUALITY, "final_loss"):
            row[k] = dict(mean=statistics.fmean(row[k]), min=min(row[k]), max=max(row[k]), values=row[k])
    return table


def outlier_table(stats_path):
    """Per model label: the largest |x|, max-median ratio and RMS kurtosis over the blocks, and the
    count of massive activations, at each analysed timestep (taking the worst timestep)."""
    stats = json.load(open(stats_path))
    table = {}
    for label, model in stats["models"].items():
        blocks = [s for per_t in model["stats"].values() for name, s in per_t.items() if name.startswith("block.")]
        table[model["config"]["normalization"]] = dict(
            label=label,
            max_abs=max(s["max_abs"] for s in blocks),
            max_median_ratio=max(s["max_median_ratio"] for s in blocks),
            rms_kurtosis=max(s["rms_kurtosis"] for s in blocks),
            massive_count=max(s["massive_count"] for s in blocks),
            dominant_channel=(model.get("summary") or {}).get("overall"),
        )
    return table


# ---------------------------------------------------------------------------------------------------

def fmt(x):
    return f"{x:.2e}" if isinstance(x, float) else str(x)


def spread(d, digits=3):
    return f"{d['mean']:.{digits}g} [{d['min']:.{digits}g}, {d['max']:.{digits}g}]"


def quality_lines(quality, floor, args):
    """The digits quality table (markdown lines)."""
    lines = ["## Digits demo: sample quality (EMA weights; mean [min, max] over seeds)", "",
             f"{args.quality_samples} samples per run ({args.quality_steps} DDPM steps, guidance {args.quality_cfg}), "
             f"scored against the 1,797 digits in the features of the digits classifier (ditlab/evaluation.py): FD-digits "
             f"(Frechet distance, lower is better), precision and recall (k = 3), and the classifier's accuracy on the "
             f"labels the samples were drawn for. Seeds {args.seeds}.", "",
             "| variant | seeds | FD-digits | precision | recall | accuracy | final train loss |",
             "|---|---:|---|---|---|---|---|"]
    for v in args.variants:
        if v in quality:
            q = quality[v]
            lines.append(f"| {v} | {len(q['seeds'])} | {spread(q['fd_digits'])} | {spread(q['precision'])} | "
                         f"{spread(q['recall'])} | {spread(q['accuracy'])} | {spread(q['final_loss'])} |")
    if floor:
        lines.append(f"| real digits | - | {floor['fd_digits']:.3g} | {floor['precision']:.3g} | {floor['recall']:.3g} | "
                     f"{floor['accuracy']:.3g} | - |")
        lines += ["", f"The last row scores {args.quality_samples} real digits drawn from the reference itself: the "
                      f"floor a perfect model would reach with this many samples."]
    return lines + ["", "![digits quality per variant](digits_quality.png)", ""]


def write_summary(out, toy, digits, args, quality=None, floor=None):
    lines = ["# Normalization ablation", "", provenance(), "",
             f"Variants: {', '.join(args.variants)}; toy seeds {args.seeds} (the `make toy` CPU preset); "
             f"digits demo {args.digits_steps} steps per variant and seed (seeds {args.seeds}).", ""]
    if toy:
        lines += toy_lines(toy, args)
    lines += [*(quality_lines(quality, floor, args) if quality else []),
              "## Digits demo: outliers (pixel-space DiT, EMA weights, first seed)", "",
              "Outlier statistics over all blocks and analysed timesteps (the largest value of each): max |x| of the "
              "token embeddings, max/median ratio per token (mean over tokens), kurtosis of channel RMS, and the count "
              "of massive activations (|x| > 100 and > 1000 x median).", "",
              "| variant | final train loss | max abs | max/median | RMS kurtosis | massive |",
              "|---|---:|---:|---:|---:|---:|"]
    for v in args.variants:
        if v in digits:
            d = digits[v]
            lines.append(f"| {v} | {d['final_loss']:.4f} | {d['max_abs']:.3g} | {d['max_median_ratio']:.3g} | "
                         f"{d['rms_kurtosis']:.3g} | {d['massive_count']} |")
    lines += ["", "Plots: `outliers/layer_curves.png`, `outliers/channel_rms_*.png`, `outliers/grid_*.png`.", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"toy": toy, "digits": digits, "quality": quality, "real_digits": floor, "variants": args.variants,
                   "seeds": args.seeds, "digits_steps": args.digits_steps}, f, indent=2)
    return text


def toy_lines(toy, args):
    """The toy table (markdown lines)."""
    lines = ["## Toy identity study (error of the samples, target 0; last evaluated step)", "",
             "| variant | step | seeds | EMA RMS (mean [min, max]) | EMA max abs | raw RMS | RMS / layer-norm | final train loss |",
             "|---|---:|---:|---|---|---|---:|---|"]
    base = toy.get("layer-norm", {}).get("ema_rms", {}).get("mean")
    for v in args.variants:
        if v not in toy:
            continue
        r = toy[v]
        ratio = f"{r['ema_rms']['mean'] / base:.2f}" if base else "- (no layer-norm run)"
        rms = r["ema_rms"]
        lines.append(f"| {v} | {r['step']} | {r['seeds']} | {rms['mean']:.2e} [{rms['min']:.2e}, {rms['max']:.2e}] | "
                     f"{r['ema_max_abs']['mean']:.2e} | {r['raw_rms']['mean']:.2e} | {ratio} | {fmt(r['final_loss'])} |")
    return lines + ["", "![toy error per variant](toy_errors.png)", ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=sorted(NORM_LAYERS))
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0])
    p.add_argument("--parallel", type=COUNT, default=2)
    p.add_argument("--digits-steps", type=COUNT, default=1500, help="training steps of each digits run")
    p.add_argument("--quality-samples", type=COUNT, default=1000, help="samples per digits run for the quality table")
    p.add_argument("--quality-steps", type=COUNT, default=100, help="DDPM steps of those samples")
    p.add_argument("--quality-cfg", type=NON_NEGATIVE, default=1.0, help="their guidance scale (1: unguided)")
    p.add_argument("--digits-ref", default=os.path.join("data", "digits"), help="the reference digits (train.py --demo "
                                                                                 "writes them)")
    p.add_argument("--digits-classifier", default=DIGITS_CLASSIFIER, help="cached digits classifier (ditlab/evaluation.py)")
    p.add_argument("--skip-toy", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--out", default="results/ablation")
    args, toy_extra = p.parse_known_args(argv)  # anything else goes to train_toy.py
    plt.switch_backend("Agg")
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    toy, digits, quality, floor = {}, {}, None, None
    if not args.skip_toy:
        runs = run_toy(args.variants, args.seeds, args.parallel, os.path.join(args.out, "toy-runs"), toy_extra)
        toy = toy_table(runs)
        plot_toy(runs, os.path.join(args.out, "toy_errors.png"))
    if not args.skip_digits:
        runs = run_digits(args, os.path.join(args.out, "digits-runs"), os.path.join(args.out, "logs"))
        scores = score_digits(runs, args, os.path.join(args.out, "samples"), os.path.join(args.out, "logs", "quality"))
        quality, floor = quality_table(runs, scores), real_digits_floor(args)
        plot_quality(quality, floor, args.variants, os.path.join(args.out, "digits_quality.png"))
        first = [run for _, seed, run in runs if seed == args.seeds[0]]
        run_jobs([[sys.executable, "analyze_embeddings.py", "--ckpt", *first, "--out", os.path.join(args.out, "outliers"),
                   "--batch-size", "32"]], 1, os.path.join(args.out, "logs", "outliers"), tags=["outliers"])
        table = outlier_table(os.path.join(args.out, "outliers", "stats.json"))
        for run in first:
            norm = load_config(run)["normalization"]
            digits[norm] = dict(run=run, final_loss=final_loss(run), **table.get(norm, {}))
    print(write_summary(args.out, toy, digits, args, quality, floor))
    print(f"[ablation] wrote {args.out}/summary.md ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
