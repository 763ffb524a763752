"""Readers of toy run directories: config, metrics, probes, embeddings, samples."""

import json
import math
import os
import statistics

from ditlab.checkpoints import load_checkpoint
from ditlab.run import upgrade_config

#################################################################################
#                               Reading run directories                         #
#################################################################################


LABELS = {"layer-norm": "LayerNorm", "none": "no LayerNorm"}  # how the two study variants are named in reports

def load_config(run_dir):
    """A run's config.json (older toy configs upgraded to today's keys)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        return upgrade_config(json.load(f))


def _read_jsonl(run_dir, name):
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {run_dir!r} a finished train_toy.py run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_metrics(run_dir, kind="sample"):
    """The rows of a run's metrics.jsonl of one kind: "sample" (one per sampling evaluation and weights;
    rows written before kinds existed count as samples), "timestep" (one per probe, weights and t), or
    None for every row."""
    rows = _read_jsonl(run_dir, "metrics.jsonl")
    return rows if kind is None else [r for r in rows if r.get("kind", "sample") == kind]


def load_embeddings(run_dir, kind):
    """The rows of a run's embeddings.jsonl of one kind: "outliers" (per probe, weights, t and captured
    layer) or "norm_input" (per probe, weights, t and normalization layer); [] for runs without probes."""
    if not os.path.exists(os.path.join(run_dir, "embeddings.jsonl")):
        return []
    return [r for r in _read_jsonl(run_dir, "embeddings.jsonl") if r["kind"] == kind]


def load_samples(run_dir, step, weights="ema"):
    """The (num_samples, 2, 2, 2) samples saved at `step` for the "raw" or "ema" weights."""
    return load_checkpoint(os.path.join(run_dir, f"samples_{step}.pt"))[weights]


def eval_steps(run_dir):
    return sorted({row["step"] for row in load_metrics(run_dir)})


def final_loss(run_dir, last=4):
    """Mean training loss over the last `last` log intervals of a run (from its latest checkpoint)."""
    history = load_checkpoint(run_dir).get("loss_history") or []
    values = [loss for _, loss in history[-last:]]
    return statistics.fmean(values) if values else float("nan")


def last_probe(run_dir, weights="ema"):
    """{t: row} of the last probe of a run's `weights`, {} when it has none (runs from before probes)."""
    rows = [r for r in load_metrics(run_dir, "timestep") if r["weights"] == weights]
    last = max((r["step"] for r in rows), default=None)
    return {r["t"]: r for r in rows if r["step"] == last}


def outlier_growth(run_dir, weights="ema", metric="max_abs"):
    """{(layer, t): [(step, value), ...]} of the block outputs' outlier statistics over a run's probes."""
    curves = {}
    for r in load_embeddings(run_dir, "outliers"):
        if r["weights"] == weights and r["layer"].startswith("block."):
            curves.setdefault((r["layer"], r["t"]), []).append((r["step"], r[metric]))
    return {key: sorted(points) for key, points in curves.items()}


def norm_input_ratios(run_dir, weights="ema", key="signal_to_outlier"):
    """{layer: {t: ratio}} at the normalization inputs at a run's last probe."""
    rows = [r for r in load_embeddings(run_dir, "norm_input") if r["weights"] == weights]
    last = max((r["step"] for r in rows), default=None)
    out = {}
    for r in rows:
        if r["step"] == last:
            out.setdefault(r["layer"], {})[r["t"]] = r[key]
    return out


def first_seed_runs(runs):
    """One run per variant: the one with the lowest seed."""
    first = {}
    for run_dir in runs:
        cfg = load_config(run_dir)
        key = (cfg["global_seed"], run_dir)
        first[cfg["normalization"]] = min(first.get(cfg["normalization"], key), key)
    return [run for _, run in first.values()]


def final_sample_errors(run_dir, weights="ema"):
    """The sample RMS of a run's last evaluation."""
    rows = [r for r in load_metrics(run_dir) if r["weights"] == weights]
    return max(rows, key=lambda r: r["step"])["rms"]


def probe_trajectory(run_dir, weights="ema", t_min=10):
    """[(step, error)] over a run's probes: the geometric mean of the eps error over the grid's t >= t_min
    (the timesteps where the sweep's cells separate the variants; t = 0-5 are read from the per-t table)."""
    by_step = {}
    for r in load_metrics(run_dir, "timestep"):
        if r["weights"] == weights and r["t"] >= t_min:
            by_step.setdefault(r["step"], []).append(math.log(r["eps_rel_error"]))
    return [(step, math.exp(statistics.fmean(logs))) for step, logs in sorted(by_step.items())]


#################################################################################
#                  Per-timestep probes: tables, plots, the mechanism           #
#################################################################################

# Timesteps of the outlier-growth plot (a few of the grid).
GROWTH_TIMESTEPS = (0, 10, 100, 999)
PROBE_METRICS = {"eps_rel_error": "||eps_pred - eps|| / ||eps||", "x0_rmse": "RMS of implied x0 (target 0)",
                 "var_rel_error": "learned variance error (zero output = 1)"}
