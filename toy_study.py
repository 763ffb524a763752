"""Run the toy identity study end to end and write its figure and tables (`make toy`).

Trains every variant (LayerNorm and no-LayerNorm by default) for every seed with train_toy.py, several
runs in parallel (one CPU thread each), then writes to --out:

  compare.png    channel 0 vs channel 1 of every sampled pixel, all variants on one axis, a panel per
                 evaluated step (the study's scatter plot); the target is the origin
  summary.md     per variant and step: mean/max/RMS error (mean and spread over seeds) and the ratio
  summary.json   LayerNorm error / no-LayerNorm error; the same numbers as JSON
  timestep_errors.png  the probe's per-timestep errors (eps, implied x0, learned variance; no sampling),
                 log-log, per variant; summary.md tabulates them with the LayerNorm / no-LayerNorm ratio per t
  outlier_growth.png   per-block max |x|, max/median ratio and channel-RMS kurtosis against the training step
  mechanism.png  does the LayerNorm model's per-t error track the signal/outlier ratio at its norm inputs?
                 (EMA weights; mechanism_raw.png the raw weights)
  outliers/      the embedding-outlier analysis (analyze_embeddings.py) of each variant's final EMA
                 weights: does the LayerNorm model grow an outlier channel to get its signal through?

    python toy_study.py                          # CPU preset, seed 0, both variants
    python toy_study.py --seeds 0 1 2            # the 3-seed check
    python toy_study.py --report results/toy-runs/000-* results/toy-runs/001-*   # re-plot finished runs

The loading and plotting functions live in toy.py (also used by notebooks/ToyDiT_visualization.ipynb);
the runs go through jobs.py, one thread each, their logs in <results-dir>/logs/.
"""

import argparse
import json
import os
import sys
import time

import matplotlib.pyplot as plt

import toy
from cli import COUNT, INDEX
from jobs import run_jobs
from toy import LABELS, first_seed_runs, format_markdown, load_config, plot_compare, plot_error_curves, summarize, \
    train_runs

def outlier_lines(stats_path):
    """Markdown lines: per variant and timestep, the largest |x| over the blocks' token embeddings and
    how consistently one channel carries each token's largest value (from analyze_embeddings' stats)."""
    with open(stats_path) as f:
        stats = json.load(f)
    lines = ["", "Token embeddings of the final EMA weights (analyze_embeddings.py, x0 = 0 noised to each timestep):", "",
             "| variant | timestep | max abs over blocks | max/median (last block) | dominant channel | its share of tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    for model in stats["models"].values():
        norm = model["config"]["normalization"]
        for t, per_layer in model["stats"].items():
            blocks = [v for k, v in per_layer.items() if k.startswith("block.")]
            chan = model["summary"]["per_timestep"].get(str(t), {})
            lines.append(f"| {LABELS.get(norm, norm)} | {t} | {max(b['max_abs'] for b in blocks):.3g} | "
                         f"{blocks[-1]['max_median_ratio']:.3g} | {chan.get('channel')} | {chan.get('share', 0):.2f} |")
    return lines


def analyze_outliers(runs, out, timesteps=(0, 10, 100, 500, 999)):
    """Run the embedding-outlier analysis (analyze_embeddings.py, as a job like ablation.py runs it) on the
    first seed of each variant; returns its stats.json path."""
    target = os.path.join(out, "outliers")
    run_jobs([[sys.executable, "analyze_embeddings.py", "--ckpt", *first_seed_runs(runs), "--zero-data", "--out",
               target, "--batch-size", "100", "--timesteps", *map(str, timesteps)]], 1, os.path.join(out, "logs"),
             tags=["outliers"])
    return os.path.join(target, "stats.json")


def probe_report(runs, out, summary):
    """The probe's figures (timestep_errors.png, outlier_growth.png, mechanism.png) and markdown lines;
    adds the per-timestep tables and the mechanism's correlations to `summary`. Nothing for old runs."""
    if not any(toy.last_probe(run) for run in runs):
        return []
    toy.plot_timestep_errors(runs, os.path.join(out, "timestep_errors.png"))
    toy.plot_outlier_growth(runs, os.path.join(out, "outlier_growth.png"))
    summary["timesteps"] = {w: toy.timestep_summary(runs, w) for w in ("ema", "raw")}
    lines = toy.timestep_markdown(runs) + ["", "![per-timestep errors](timestep_errors.png)"]
    lines += toy.growth_markdown(runs) + ["", "![outlier growth](outlier_growth.png)"]
    for weights in ("ema", "raw"):  # the EMA lags far behind in short runs: the raw weights are shown too
        result = toy.mechanism(runs, weights)
        if result:
            name = "mechanism.png" if weights == "ema" else "mechanism_raw.png"
            toy.plot_mechanism(result, os.path.join(out, name))
            summary.setdefault("mechanism", {})[weights] = result
            lines += toy.mechanism_markdown(result) + ["", f"![mechanism, {weights} weights]({name})"]
    return lines


def write_report(runs, out, outlier_stats=None):
    """compare.png (first seed of each variant), errors.png, the probe's figures (probe_report),
    summary.md and summary.json in `out`."""
    os.makedirs(out, exist_ok=True)
    plot_compare(first_seed_runs(runs), os.path.join(out, "compare.png"))
    plot_error_curves(runs, os.path.join(out, "errors.png"))
    summary = summarize(runs)
    summary["runs"] = list(runs)
    lines = probe_report(runs, out, summary)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text = format_markdown(summary, load_config(runs[0]))
    if lines:
        text += "\n".join(lines) + "\n"
    if outlier_stats:
        text += "\n".join(outlier_lines(outlier_stats)) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=["layer-norm", "none"])
    p.add_argument("--parallel", type=COUNT, default=2, help="training processes at a time (one thread each)")
    p.add_argument("--results-dir", default="results/toy-runs", help="where the run directories go")
    p.add_argument("--out", default="results/toy", help="where compare.png and the summaries go")
    p.add_argument("--report", nargs="+", metavar="RUN_DIR", help="only write the report for finished runs")
    p.add_argument("--no-outliers", action="store_true", help="skip the embedding-outlier analysis of the final models")
    args, extra = p.parse_known_args(argv)  # anything else is passed to train_toy.py (e.g. --steps 2000)
    plt.switch_backend("Agg")  # files only, no windows
    start = time.time()
    if args.report:
        runs = args.report
    else:
        jobs = [(norm, seed, extra) for seed in args.seeds for norm in args.variants]
        print(f"toy study: {len(jobs)} runs ({', '.join(args.variants)} x seeds {args.seeds}), "
              f"{args.parallel} at a time; run directories in {args.results_dir}", flush=True)
        runs = train_runs(jobs, args.parallel, args.results_dir, os.path.join(args.results_dir, "logs"))
    stats = None if args.no_outliers else analyze_outliers(runs, args.out)
    text = write_report(runs, args.out, stats)
    print(text)
    print(f"wrote {args.out}/compare.png, errors.png, timestep_errors.png, outlier_growth.png, mechanism*.png, summary.md, "
          f"summary.json ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
