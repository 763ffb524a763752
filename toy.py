"""The toy identity study's definitions, shared by train_toy.py (training), toy_study.py (the study),
ablation.py, the benchmarks and notebooks/ToyDiT_visualization.ipynb: the toy's shape and presets, its
data (all-zero images) and error measure, and the readers, tables and plots of finished run directories.
"""

import json
import os
import statistics
import sys

import matplotlib.pyplot as plt
import torch

from jobs import run_jobs
from train_utils import load_checkpoint, newest_run

# Model overrides of the toy: 2x2 pixels with 2 channels, one class, no label dropout.
TOY_IMAGE_SIZE, TOY_CHANNELS = 2, 2
TOY_MODEL = dict(input_size=TOY_IMAGE_SIZE, in_channels=TOY_CHANNELS, num_classes=1, class_dropout_prob=0.0,
                 learn_sigma=True)

PRESETS = {
    # The study's setting (../shared/REFERENCE.md): meant for a GPU.
    "paper": dict(model="DiT-XS/1", steps=50_000, global_batch_size=2048, lr=1e-4, lr_schedule="constant",
                  warmup_steps=0, ema_decay=0.9999, eval_steps=[10_000, 50_000], ckpt_every=10_000,
                  log_every=500, depth=None, hidden_size=None, num_heads=None),
    # Small enough that `make toy` trains both variants on 2 CPU cores within 15 minutes.
    "cpu": dict(model="DiT-XS/1", steps=12_000, global_batch_size=256, lr=1e-3, lr_schedule="cosine",
                warmup_steps=200, ema_decay=0.999, eval_steps=[3_000, 6_000, 12_000], ckpt_every=3_000,
                log_every=500, depth=2, hidden_size=64, num_heads=4),
}


def zero_batches(local_batch, device):
    """The toy data set: an endless stream of all-zero images with label 0."""
    x = torch.zeros(local_batch, TOY_CHANNELS, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE, device=device)
    y = torch.zeros(local_batch, dtype=torch.long, device=device)
    while True:
        yield x, y


def sample_error(samples):
    """Errors of samples whose target is exactly zero: every value is an error."""
    v = samples.double().flatten()
    max_abs = v.abs().max().item()
    return dict(mean_abs=v.abs().mean().item(), max_abs=max_abs, rms=v.square().mean().sqrt().item(),
                max_abs_8bit=max_abs * 127.5, num_values=v.numel())


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
    return load_checkpoint(os.path.join(run_dir, f"samples_{step}.pt"))[weights]


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


def train_runs(jobs, parallel, results_dir, log_dir):
    """Train train_toy.py for each (normalization, seed, extra flags) through the job runner, progress
    lines echoed with a "[variant sN]" tag; returns the run directories, sorted by (seed, normalization)."""
    commands = [[sys.executable, "train_toy.py", "--normalization", norm, "--global-seed", str(seed),
                 "--results-dir", results_dir, "--threads", "1", *extra] for norm, seed, extra in jobs]
    run_jobs(commands, parallel, log_dir, tags=[f"{LABELS.get(norm, norm)} s{seed}" for norm, seed, _ in jobs])
    runs = [newest_run(results_dir, {"normalization": norm, "global_seed": seed}) for norm, seed, _ in jobs]
    return sorted(runs, key=lambda r: (load_config(r)["global_seed"], load_config(r)["normalization"]))
