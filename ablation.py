"""The normalization ablation (`make ablation`): every variant on the toy study and on the digits demo.

  1. Toy identity study: train_toy.py for every variant and seed (the same CPU preset and seeds as
     `make toy`), sample errors at each evaluated step.
  2. Digits demo: train.py's built-in demo (pixel-space DiT on scikit-learn's digits) for every variant,
     shortened to --digits-steps, then the final training loss and the embedding-outlier statistics of
     analyze_embeddings.py on the trained EMA weights.

Writes to --out (results/ablation/): summary.md (both tables), summary.json, toy_errors.png (toy error
per variant), and the outlier plots of the digits models under outliers/.

    python ablation.py                                   # all variants, seed 0, about 30 min on 2 CPU cores
    python ablation.py --variants layer-norm dyt --seeds 0 1 2
"""

import argparse
import json
import os
import statistics
import sys
import time

import matplotlib.pyplot as plt

from cli import COUNT, INDEX
from jobs import run_jobs
from models import NORM_LAYERS
from toy import final_loss, load_config, load_metrics, summarize, train_runs
from train_utils import newest_run

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

def run_digits(variants, steps, parallel, results_dir, log_dir):
    """The digits demo for every variant (jobs.py, logs only); returns the run directories."""
    cmds = [[sys.executable, "train.py", "--demo", "--normalization", v, "--max-steps", str(steps),
             "--results-dir", results_dir, "--sample-every", "0"] for v in variants]
    print(f"[ablation] digits demo: {len(cmds)} runs of {steps} steps", flush=True)
    run_jobs(cmds, parallel, log_dir)
    return [newest_run(results_dir, {"normalization": v, "max_steps": steps}) for v in variants]


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


def write_summary(out, toy, digits, args):
    lines = ["# Normalization ablation", "",
             f"Variants: {', '.join(args.variants)}; toy seeds {args.seeds} (the `make toy` CPU preset); "
             f"digits demo {args.digits_steps} steps per variant, seed 0.", "",
             "## Toy identity study (error of the samples, target 0; last evaluated step)", "",
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
    lines += ["", "![toy error per variant](toy_errors.png)", "",
              "## Digits demo (pixel-space DiT, EMA weights)", "",
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
        json.dump({"toy": toy, "digits": digits, "variants": args.variants, "seeds": args.seeds,
                   "digits_steps": args.digits_steps}, f, indent=2)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=sorted(NORM_LAYERS))
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0])
    p.add_argument("--parallel", type=COUNT, default=2)
    p.add_argument("--digits-steps", type=COUNT, default=1500, help="training steps of each digits run")
    p.add_argument("--skip-toy", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--out", default="results/ablation")
    args, toy_extra = p.parse_known_args(argv)  # anything else goes to train_toy.py
    plt.switch_backend("Agg")
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    toy, digits = {}, {}
    if not args.skip_toy:
        runs = run_toy(args.variants, args.seeds, args.parallel, os.path.join(args.out, "toy-runs"), toy_extra)
        toy = toy_table(runs)
        plot_toy(runs, os.path.join(args.out, "toy_errors.png"))
    if not args.skip_digits:
        runs = run_digits(args.variants, args.digits_steps, args.parallel, os.path.join(args.out, "digits-runs"),
                          os.path.join(args.out, "logs"))
        run_jobs([[sys.executable, "analyze_embeddings.py", "--ckpt", *runs, "--out", os.path.join(args.out, "outliers"),
                   "--batch-size", "32"]], 1, os.path.join(args.out, "logs", "outliers"), tags=["outliers"])
        table = outlier_table(os.path.join(args.out, "outliers", "stats.json"))
        for run in runs:
            norm = load_config(run)["normalization"]
            digits[norm] = dict(run=run, final_loss=final_loss(run), **table.get(norm, {}))
    print(write_summary(args.out, toy, digits, args))
    print(f"[ablation] wrote {args.out}/summary.md ({(time.time() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
