"""Run the toy identity study end to end and write its figure and tables (`make toy`).

Trains every variant (LayerNorm and no-LayerNorm by default) for every seed with train_toy.py, several
runs in parallel (one CPU thread each), then writes to --out:

  compare.png    channel 0 vs channel 1 of every sampled pixel, all variants on one axis, a panel per
                 evaluated step (the study's scatter plot); the target is the origin
  summary.md     per variant and step: mean/max/RMS error (mean and spread over seeds) and the ratio
  summary.json   LayerNorm error / no-LayerNorm error; the same numbers as JSON
  outliers/      the embedding-outlier analysis (analyze_embeddings.py) of each variant's final EMA
                 weights: does the LayerNorm model grow an outlier channel to get its signal through?

    python toy_study.py                          # CPU preset, seed 0, both variants
    python toy_study.py --seeds 0 1 2            # the 3-seed check
    python toy_study.py --report results/toy-runs/000-* results/toy-runs/001-*   # re-plot finished runs

The loading and plotting functions are reused by notebooks/ToyDiT_visualization.ipynb.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import matplotlib.pyplot as plt
import torch

from cli import COUNT, INDEX

LABELS = {"layer-norm": "LayerNorm", "none": "no LayerNorm"}
COLORS = {"layer-norm": "tab:red", "none": "tab:blue"}
ERRORS = ("rms", "mean_abs", "max_abs")


#################################################################################
#                               Reading run directories                         #
#################################################################################


def load_config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def load_metrics(run_dir):
    """The rows of a run's metrics.jsonl (one per evaluation and weights)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir!r} a finished train_toy.py run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_samples(run_dir, step, weights="ema"):
    """The (num_samples, 2, 2, 2) samples saved at `step` for the "raw" or "ema" weights."""
    return torch.load(os.path.join(run_dir, f"samples_{step}.pt"), weights_only=True)[weights]


def eval_steps(run_dir):
    return sorted({row["step"] for row in load_metrics(run_dir)})


#################################################################################
#                                  Plots and tables                             #
#################################################################################


def plot_scatter(ax, runs, step, weights="ema"):
    """Channel 0 vs channel 1 of every pixel of every sample, one colour per variant, symmetric limits."""
    limit = 0.0
    clouds = []
    for run_dir in runs:
        s = load_samples(run_dir, step, weights)
        clouds.append((float((s.double() ** 2).mean().sqrt()), load_config(run_dir)["normalization"], s))
    for rms, norm, s in sorted(clouds, key=lambda c: -c[0]):  # widest cloud first, so none is hidden
        c0, c1 = s[:, 0].flatten().numpy(), s[:, 1].flatten().numpy()
        ax.scatter(c0, c1, s=6, alpha=0.6, color=COLORS.get(norm), label=f"{LABELS.get(norm, norm)} (RMS {rms:.1e})")
        limit = max(limit, float(s.abs().max()))
    limit = 1.1 * limit or 1e-3
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.8", lw=0.5, zorder=0)
    ax.axvline(0, color="0.8", lw=0.5, zorder=0)
    ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    ax.set_title(f"step {step:,} ({weights} weights)")
    ax.set_xlabel("channel 0")
    ax.set_ylabel("channel 1")
    ax.legend(fontsize=7, loc="upper right")


def plot_compare(runs, path, weights="ema"):
    """The study's figure: one scatter panel per evaluated step, all variants of one seed together."""
    steps = eval_steps(runs[0])
    fig, axes = plt.subplots(1, len(steps), figsize=(4.4 * len(steps), 4.8), squeeze=False)
    for ax, step in zip(axes[0], steps):
        plot_scatter(ax, runs, step, weights)
    fig.suptitle("Toy DiT samples (target: all zeros). Each point is one pixel of 100 samples.", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_error_curves(runs, path=None, error="rms", ax=None):
    """Error against training step for every run (raw dashed, EMA solid), log scale."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 4))
    for run_dir in runs:
        cfg = load_config(run_dir)
        rows = load_metrics(run_dir)
        for weights, style in (("ema", "-"), ("raw", "--")):
            pts = sorted((r["step"], r[error]) for r in rows if r["weights"] == weights)
            ax.plot(*zip(*pts), style, marker="o", color=COLORS.get(cfg["normalization"]),
                    label=f"{LABELS.get(cfg['normalization'], cfg['normalization'])} seed {cfg['global_seed']} {weights}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{error} of sampled pixels")
    ax.axhline(1 / 127.5, color="0.5", lw=0.8, ls=":", label="one 8-bit level")
    ax.legend(fontsize=6)
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)


def _spread(values):
    return dict(mean=statistics.fmean(values), min=min(values), max=max(values),
                std=statistics.stdev(values) if len(values) > 1 else 0.0, n=len(values))


def summarize(runs):
    """Errors per (variant, weights, step), aggregated over seeds, and LayerNorm / no-LayerNorm ratios."""
    table = {}
    for run_dir in runs:
        norm = load_config(run_dir)["normalization"]
        for row in load_metrics(run_dir):
            key = (norm, row["weights"], row["step"])
            table.setdefault(key, {e: [] for e in ERRORS})
            for e in ERRORS:
                table[key][e].append(row[e])
    rows = []
    for (norm, weights, step), errs in sorted(table.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        rows.append(dict(normalization=norm, weights=weights, step=step, **{e: _spread(v) for e, v in errs.items()}))
    ratios = []
    for (norm, weights, step), errs in table.items():
        if norm == "layer-norm" and ("none", weights, step) in table:
            other = table[("none", weights, step)]
            ratios.append(dict(weights=weights, step=step, **{
                e: statistics.fmean(errs[e]) / statistics.fmean(other[e]) for e in ERRORS}))
    ratios.sort(key=lambda r: (r["step"], r["weights"]))
    losses = {}
    for run_dir in runs:
        losses.setdefault(load_config(run_dir)["normalization"], []).append(final_loss(run_dir))
    final_losses = {norm: _spread(v) for norm, v in losses.items() if all(x == x for x in v)}
    return dict(rows=rows, ratios=ratios, final_loss=final_losses)


def final_loss(run_dir, last=4):
    """Mean training loss over the last `last` log intervals of a run (from its latest checkpoint)."""
    from train_utils import load_checkpoint

    history = load_checkpoint(run_dir).get("loss_history") or []
    values = [loss for _, loss in history[-last:]]
    return statistics.fmean(values) if values else float("nan")


def format_markdown(summary, config):
    lines = [
        "# Toy identity study",
        "",
        f"Model {config['model']} (depth {config.get('depth') or 'default'}, width {config.get('hidden_size') or 'default'}), "
        f"batch {config['global_batch_size']}, lr {config['lr']} ({config['lr_schedule']}), EMA {config['ema_decay']}, "
        f"{config['steps']} steps, preset {config['preset']}. Errors of {config['num_eval_samples']} samples x 4 pixels x "
        f"2 channels (target 0), {config['sampling_steps']}-step DDPM; mean over seeds with [min, max].",
        "",
        "| step | weights | variant | seeds | RMS | mean abs | max abs | max abs (8-bit levels) |",
        "|---:|---|---|---:|---|---|---|---:|",
    ]
    for r in summary["rows"]:
        cell = {e: f"{r[e]['mean']:.2e} [{r[e]['min']:.1e}, {r[e]['max']:.1e}]" for e in ERRORS}
        lines.append(f"| {r['step']} | {r['weights']} | {LABELS.get(r['normalization'], r['normalization'])} | "
                     f"{r['rms']['n']} | {cell['rms']} | {cell['mean_abs']} | {cell['max_abs']} | "
                     f"{r['max_abs']['mean'] * 127.5:.3f} |")
    if summary.get("final_loss"):
        lines += ["", "Training loss (the denoising objective) over the last log intervals, mean over seeds [min, max]:", "",
                  "| variant | seeds | final training loss |", "|---|---:|---|"]
        for norm, v in summary["final_loss"].items():
            lines.append(f"| {LABELS.get(norm, norm)} | {v['n']} | {v['mean']:.2e} [{v['min']:.1e}, {v['max']:.1e}] |")
    if summary["ratios"]:
        lines += ["", "Ratio LayerNorm error / no-LayerNorm error (means over seeds; > 1: LayerNorm is worse):", "",
                  "| step | weights | RMS | mean abs | max abs |", "|---:|---|---:|---:|---:|"]
        for r in summary["ratios"]:
            lines.append(f"| {r['step']} | {r['weights']} | {r['rms']:.2f} | {r['mean_abs']:.2f} | {r['max_abs']:.2f} |")
    return "\n".join(lines) + "\n"


def first_seed_runs(runs):
    """One run per variant: the one with the lowest seed."""
    first = {}
    for run_dir in runs:
        cfg = load_config(run_dir)
        key = (cfg["global_seed"], run_dir)
        first[cfg["normalization"]] = min(first.get(cfg["normalization"], key), key)
    return [run for _, run in first.values()]


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
    """Run the embedding-outlier analysis on the first seed of each variant; returns its stats.json path."""
    import analyze_embeddings

    target = os.path.join(out, "outliers")
    analyze_embeddings.main(["--ckpt", *first_seed_runs(runs), "--zero-data", "--out", target, "--batch-size", "100",
                             "--timesteps", *map(str, timesteps)])
    return os.path.join(target, "stats.json")


def write_report(runs, out, outlier_stats=None):
    """compare.png (first seed of each variant), errors.png, summary.md and summary.json in `out`."""
    os.makedirs(out, exist_ok=True)
    plot_compare(first_seed_runs(runs), os.path.join(out, "compare.png"))
    plot_error_curves(runs, os.path.join(out, "errors.png"))
    summary = summarize(runs)
    summary["runs"] = list(runs)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text = format_markdown(summary, load_config(runs[0]))
    if outlier_stats:
        text += "\n".join(outlier_lines(outlier_stats)) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


#################################################################################
#                                 Running the study                             #
#################################################################################


def _stream(proc, tag):
    for line in proc.stdout:
        sys.stdout.write(f"[{tag}] {line}")
        sys.stdout.flush()


def run_all(jobs, parallel, results_dir):
    """Run train_toy.py for each (normalization, seed, extra args) with `parallel` processes at a time,
    streaming their progress lines. Returns the run directories in job order."""
    pending, running, done = list(enumerate(jobs)), [], {}
    before = set(os.listdir(results_dir)) if os.path.isdir(results_dir) else set()
    while pending or running:
        while pending and len(running) < parallel:
            i, (norm, seed, extra) = pending.pop(0)
            cmd = [sys.executable, "train_toy.py", "--normalization", norm, "--global-seed", str(seed),
                   "--results-dir", results_dir, "--threads", "1", *extra]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    cwd=os.path.dirname(os.path.abspath(__file__)))
            thread = threading.Thread(target=_stream, args=(proc, f"{LABELS[norm] if norm in LABELS else norm} s{seed}"), daemon=True)
            thread.start()
            running.append((i, proc, thread))
            time.sleep(1.0)  # distinct run-directory indices
        for item in list(running):
            i, proc, thread = item
            if proc.poll() is not None:
                thread.join()
                running.remove(item)
                if proc.returncode:
                    raise SystemExit(f"train_toy.py job {jobs[i]} failed with exit code {proc.returncode}")
                done[i] = True
        time.sleep(0.5)
    new = sorted(set(os.listdir(results_dir)) - before)
    runs = [os.path.join(results_dir, d) for d in new]
    return sorted(runs, key=lambda r: (load_config(r)["global_seed"], load_config(r)["normalization"]))


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
        runs = run_all(jobs, args.parallel, args.results_dir)
    stats = None if args.no_outliers else analyze_outliers(runs, args.out)
    text = write_report(runs, args.out, stats)
    print(text)
    print(f"wrote {args.out}/compare.png, errors.png, summary.md, summary.json ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
