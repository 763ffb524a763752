"""The toy identity study's definitions, shared by train_toy.py (training), toy_study.py (the study),
ablation.py, the benchmarks and notebooks/ToyDiT_visualization.ipynb: the toy's shape and presets, its
data (all-zero images) and error measure, and the readers, tables and plots of finished run directories.
"""

import json
import math
import os
import statistics
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch

from jobs import run_jobs
from outliers import layer_stats
from train_utils import load_checkpoint, newest_run

# Model overrides of the toy: 2x2 pixels with 2 channels, one class, no label dropout.
TOY_IMAGE_SIZE, TOY_CHANNELS = 2, 2
TOY_MODEL = dict(input_size=TOY_IMAGE_SIZE, in_channels=TOY_CHANNELS, num_classes=1, class_dropout_prob=0.0,
                 learn_sigma=True)

PRESETS = {
    # The study's setting (../shared/REFERENCE.md): meant for a GPU.
    "paper": dict(model="DiT-XS/1", steps=50_000, global_batch_size=2048, lr=1e-4, lr_schedule="constant",
                  warmup_steps=0, ema_decay=0.9999, eval_steps=[10_000, 50_000], ckpt_every=10_000,
                  log_every=500, depth=None, hidden_size=None, num_heads=None, probe_every=2_500,
                  compile="default"),  # 1.4x eager on an H100 (docs/benchmarks.md)
    # Small enough that `make toy` trains both variants on 2 CPU cores within 15 minutes.
    "cpu": dict(model="DiT-XS/1", steps=12_000, global_batch_size=256, lr=1e-3, lr_schedule="cosine",
                warmup_steps=200, ema_decay=0.999, eval_steps=[3_000, 6_000, 12_000], ckpt_every=3_000,
                log_every=500, depth=2, hidden_size=64, num_heads=4, probe_every=500, compile=None),
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


#################################################################################
#             Per-timestep precision and embedding probes (no sampling)         #
#################################################################################

# Timesteps at which every probe measures the denoiser directly; roughly log-spaced, so the last few
# steps of the chain (which dominate the sampled error) are resolved as well as the noisy end.
TIMESTEP_GRID = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 999)
# The fixed probe noise: the same draws for every run, variant and seed (paired comparisons).
PROBE_SEED = 20_240
# Block-output statistics kept per (t, layer) (outliers.layer_stats computes them).
OUTLIER_KEYS = ("max_abs", "max_median_ratio", "rms_kurtosis", "massive_count", "argmax_channel", "argmax_share")


def timestep_batch(diffusion, timesteps, num, seed=PROBE_SEED):
    """The probe batch: `num` noise draws eps (the same for every t), x0 = 0, so x_t = sqrt(1 - alpha_bar_t) eps.

    Returns (x_t, t, target): x_t float32 (len(timesteps) * num, C, H, W) in timestep-major order, t (long),
    and the target float64 = x_t / sqrt(1 - alpha_bar_t), the exact noise of the float32 input (eps up to
    float32 rounding), so that no error floor comes from rounding the input."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(num, TOY_CHANNELS, TOY_IMAGE_SIZE, TOY_IMAGE_SIZE, generator=gen, dtype=torch.float64)
    scale = torch.as_tensor(diffusion.sqrt_one_minus_alphas_cumprod[list(timesteps)], dtype=torch.float64)
    scale = scale.view(-1, 1, 1, 1, 1)
    x_t = (scale * eps).float()
    target = x_t.double() / scale
    t = torch.tensor(list(timesteps), dtype=torch.long).repeat_interleave(num)
    return x_t.flatten(0, 1), t, target.flatten(0, 1)


def timestep_errors(output, x_t, t, target, diffusion):
    """Per-timestep errors of a model's output on the probe batch (float64), one dict per timestep:

    eps_rel_error  ||eps_pred - eps|| / ||eps|| over the batch (1 for a model that outputs zero);
    x0_rmse        RMS of the implied x0 = (x_t - sqrt(1 - abar) eps_pred) / sqrt(abar), whose target is 0
                   (pixel units, like the sample error: one 8-bit level is 1/127.5);
    var_log_rmse   RMS of the learned log-variance minus the log of the true posterior variance beta~_t
                   (nats; at t = 0, where beta~ is 0, the clipped value the learned range and the sampler use);
    var_rel_error  the same distance in units of a zero output's (v = 0, halfway between log beta~_t and
                   log beta_t): RMS of (v + 1) / 2 over 1/2, 1 for a model that outputs zero."""
    out = output.double()
    eps_pred, v = out[:, :TOY_CHANNELS], out[:, TOY_CHANNELS:]
    rows = []
    for step in dict.fromkeys(t.tolist()):
        m = t == step
        abar = float(diffusion.alphas_cumprod[step])
        x0 = (x_t[m].double() - math.sqrt(1 - abar) * eps_pred[m]) / math.sqrt(abar)
        frac = (v[m] + 1) / 2  # the learned range: log var = frac * log beta + (1 - frac) * log beta~
        min_log, max_log = float(diffusion.posterior_log_variance_clipped[step]), math.log(diffusion.betas[step])
        log_var = frac * max_log + (1 - frac) * min_log
        # Both sums over tensors of one layout, hence one summation order: exactly 1 for a zero output.
        err = (eps_pred[m] - target[m]).contiguous().square().sum()
        ref = target[m].contiguous().square().sum()
        rows.append(dict(t=int(step), eps_rel_error=(err / ref).sqrt().item(),
                         x0_rmse=x0.square().mean().sqrt().item(),
                         var_log_rmse=(log_var - min_log).square().mean().sqrt().item(),
                         var_rel_error=(frac.square().mean().sqrt() / 0.5).item()))
    return rows


def norm_layers(model):
    """(name, module) of every normalization layer of a DiT, in forward order."""
    layers = []
    for i, block in enumerate(model.blocks):
        layers += [(f"block.{i}.norm1", block.norm1), (f"block.{i}.norm2", block.norm2)]
    return layers + [("final.norm", model.final_layer.norm_final)]


def signal_and_outlier(h):
    """Split norm inputs h (num draws, tokens, D) at one timestep, x0 = 0, into the part that is the same
    for every noise draw, m = mean over draws (position embedding, timestep conditioning, outlier
    channels), and the signal s = h - m that carries the input. LayerNorm sees channel-centred vectors:
    with h = m + s its leftover non-linearity in s is of relative size (|s| / |m|)^2. Returns
    signal_norm   RMS over draws and tokens of |s_c| (L2 over channels, channel-centred);
    const_norm    RMS over tokens of |m_c|;
    outlier       RMS over tokens of m in its loudest channel (outlier_channel);
    signal_to_outlier = signal_norm / outlier and signal_to_const = signal_norm / const_norm."""
    h = h.double()
    m = h.mean(dim=0)
    s = h - m
    centred = lambda x: x - x.mean(dim=-1, keepdim=True)
    signal = centred(s).square().sum(-1).mean().sqrt().item()
    const = centred(m).square().sum(-1).mean().sqrt().item()
    channel_rms = m.square().mean(dim=0).sqrt()
    k = int(channel_rms.argmax())
    outlier = channel_rms[k].item()
    return dict(signal_norm=signal, const_norm=const, outlier=outlier, outlier_channel=k,
                signal_to_outlier=signal / max(outlier, 1e-300), signal_to_const=signal / max(const, 1e-300))


@torch.no_grad()
def probe(model, diffusion, num=256, timesteps=TIMESTEP_GRID, seed=PROBE_SEED):
    """What one evaluation measures without sampling, for one set of weights, in one forward pass of the
    probe batch (timestep_batch): the per-timestep errors (timestep_errors), outlier statistics of the
    token embeddings after the patch embedding and every block (outliers.layer_stats), and the
    signal/outlier split at every normalization layer's input (signal_and_outlier). Returns
    (error rows, embedding rows), each a list of dicts with "t" (and "layer", "kind" for embeddings)."""
    x_t, t, target = timestep_batch(diffusion, timesteps, num, seed)
    per_t = lambda h: h.detach().reshape(len(timesteps), num, *h.shape[1:])
    rows = []

    def capture(name, h):
        if name != "final":  # the output layer has another width; its values are the prediction
            for tt, ht in zip(timesteps, per_t(h)):
                stats = layer_stats(ht)[0]
                rows.append(dict(kind="outliers", t=int(tt), layer=name, **{k: stats[k] for k in OUTLIER_KEYS}))

    def norm_hook(name):
        def hook(module, inputs):
            for tt, ht in zip(timesteps, per_t(inputs[0])):
                rows.append(dict(kind="norm_input", t=int(tt), layer=name, **signal_and_outlier(ht)))
        return hook

    handles = [module.register_forward_pre_hook(norm_hook(name)) for name, module in norm_layers(model)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        y = torch.zeros(len(t), dtype=torch.long, device=device)
        output = model(x_t.to(device), t.to(device), y, capture=capture).cpu()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return timestep_errors(output, x_t, t, target, diffusion), rows


def append_jsonl(path, rows):
    """Append dicts to a JSON-lines file."""
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


LABELS = {"layer-norm": "LayerNorm", "none": "no LayerNorm"}
COLORS = {"layer-norm": "tab:red", "none": "tab:blue"}
ERRORS = ("rms", "mean_abs", "max_abs")


#################################################################################
#                               Reading run directories                         #
#################################################################################


def load_config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


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
        f"2 channels (target 0), {config['sampling_steps']}-step {config.get('sampler', 'ddpm')}; mean over seeds with [min, max].",
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


#################################################################################
#                  Per-timestep probes: tables, plots, the mechanism           #
#################################################################################

# Timesteps of the outlier-growth plot (a few of the grid).
GROWTH_TIMESTEPS = (0, 10, 100, 999)
PROBE_METRICS = {"eps_rel_error": "||eps_pred - eps|| / ||eps||", "x0_rmse": "RMS of implied x0 (target 0)",
                 "var_rel_error": "learned variance error (zero output = 1)"}


def last_probe(run_dir, weights="ema"):
    """{t: row} of the last probe of a run's `weights`, {} when it has none (runs from before probes)."""
    rows = [r for r in load_metrics(run_dir, "timestep") if r["weights"] == weights]
    last = max((r["step"] for r in rows), default=None)
    return {r["t"]: r for r in rows if r["step"] == last}


def timestep_summary(runs, weights="ema", metric="eps_rel_error"):
    """Per timestep of the last probes: the metric per variant (spread over seeds) and the LayerNorm /
    no-LayerNorm ratio (of the means over seeds; ratio_min/max over the seeds both variants have)."""
    values = {}  # normalization -> seed -> t -> value
    for run in runs:
        cfg = load_config(run)
        rows = last_probe(run, weights)
        if rows:
            values.setdefault(cfg["normalization"], {})[cfg["global_seed"]] = {t: r[metric] for t, r in rows.items()}
    timesteps = sorted({t for seeds in values.values() for per_t in seeds.values() for t in per_t})
    table = []
    for t in timesteps:
        row = dict(t=t, variants={norm: _spread([v[t] for v in seeds.values() if t in v]) for norm, seeds in values.items()})
        ln, none = values.get("layer-norm", {}), values.get("none", {})
        if "layer-norm" in row["variants"] and "none" in row["variants"]:
            row["ratio"] = row["variants"]["layer-norm"]["mean"] / row["variants"]["none"]["mean"]
            paired = [ln[s][t] / none[s][t] for s in sorted(set(ln) & set(none)) if t in ln[s] and t in none[s]]
            row["ratio_min"], row["ratio_max"] = (min(paired), max(paired)) if paired else (row["ratio"],) * 2
        table.append(row)
    return dict(weights=weights, metric=metric, rows=table)


def timestep_markdown(runs, weights="ema"):
    """Markdown lines: the per-timestep table (eps, x0 and variance errors per variant, LN / none ratio)."""
    eps, x0, var = (timestep_summary(runs, weights, m)["rows"] for m in ("eps_rel_error", "x0_rmse", "var_rel_error"))
    if not eps:
        return []
    cell = lambda row, norm: (f"{row['variants'][norm]['mean']:.2e} [{row['variants'][norm]['min']:.1e}, "
                              f"{row['variants'][norm]['max']:.1e}]" if norm in row["variants"] else "-")
    lines = ["", f"Per-timestep precision at the last probe ({weights} weights, fixed noise, x0 = 0, no sampling; mean over "
             "seeds [min, max]). eps error = ||eps_pred - eps|| / ||eps|| (a model that outputs zero scores 1); x0 RMSE "
             "= RMS of the implied x0 (pixel units; one 8-bit level is 7.8e-3); variance error: learned vs true "
             "posterior variance, in units of a zero output's. Ratio = LayerNorm / no LayerNorm of the eps error "
             "[range of per-seed ratios].", "",
             "| t | eps error, LayerNorm | eps error, no LayerNorm | ratio | x0 RMSE, LayerNorm | x0 RMSE, no LayerNorm "
             "| var error, LayerNorm | var error, no LayerNorm |", "|---:|---|---|---|---|---|---|---|"]
    for e, x, v in zip(eps, x0, var):
        ratio = f"{e['ratio']:.2f} [{e['ratio_min']:.2f}, {e['ratio_max']:.2f}]" if "ratio" in e else "-"
        lines.append(f"| {e['t']} | {cell(e, 'layer-norm')} | {cell(e, 'none')} | {ratio} | {cell(x, 'layer-norm')} | "
                     f"{cell(x, 'none')} | {cell(v, 'layer-norm')} | {cell(v, 'none')} |")
    return lines


def plot_timestep_errors(runs, path=None):
    """The probe's errors against the timestep (log-log, t + 1 on the x axis), one colour per variant, one
    line per seed, EMA solid and raw dashed, at each run's last probe. Saved to `path`, or returned."""
    fig, axes = plt.subplots(1, len(PROBE_METRICS), figsize=(5 * len(PROBE_METRICS), 4))
    for ax, (metric, label) in zip(axes, PROBE_METRICS.items()):
        for run in runs:
            cfg = load_config(run)
            for weights, style in (("ema", "-"), ("raw", "--")):
                rows = last_probe(run, weights)
                if rows:
                    ts = sorted(rows)
                    ax.plot([t + 1 for t in ts], [rows[t][metric] for t in ts], style, marker=".",
                            color=COLORS.get(cfg["normalization"]), label=f"{LABELS.get(cfg['normalization'], cfg['normalization'])} "
                            f"s{cfg['global_seed']} {weights} (step {rows[ts[0]]['step']})")
        if metric == "x0_rmse":
            ax.axhline(1 / 127.5, color="0.5", lw=0.8, ls=":", label="one 8-bit level")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("timestep t + 1")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=6)
    fig.suptitle("Per-timestep precision of the denoiser (fixed noise, x0 = 0, no sampling)", fontsize=10)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def outlier_growth(run_dir, weights="ema", metric="max_abs"):
    """{(layer, t): [(step, value), ...]} of the block outputs' outlier statistics over a run's probes."""
    curves = {}
    for r in load_embeddings(run_dir, "outliers"):
        if r["weights"] == weights and r["layer"].startswith("block."):
            curves.setdefault((r["layer"], r["t"]), []).append((r["step"], r[metric]))
    return {key: sorted(points) for key, points in curves.items()}


def plot_outlier_growth(runs, path, timesteps=GROWTH_TIMESTEPS, weights="raw"):
    """Per-block max |x|, max/median ratio and channel-RMS kurtosis of the token embeddings against the
    training step (first seed of each variant), one column per timestep; darker = later block. Raw weights
    by default: the EMA lags about 1 / (1 - decay) steps behind, which would date the outlier late."""
    metrics = ("max_abs", "max_median_ratio", "rms_kurtosis")
    fig, axes = plt.subplots(len(metrics), len(timesteps), figsize=(3.6 * len(timesteps), 2.7 * len(metrics)), squeeze=False)
    for run in first_seed_runs(runs):
        norm = load_config(run)["normalization"]
        for row, metric in enumerate(metrics):
            curves = outlier_growth(run, weights, metric)
            layers = sorted({layer for layer, _ in curves}, key=lambda n: int(n.split(".")[1]))
            for col, t in enumerate(timesteps):
                for i, layer in enumerate(layers):
                    if (layer, t) in curves:
                        axes[row][col].plot(*zip(*curves[(layer, t)]), color=COLORS.get(norm),
                                            alpha=0.35 + 0.65 * (i + 1) / len(layers), lw=1,
                                            label=f"{LABELS.get(norm, norm)} {layer}")
    for row, metric in enumerate(metrics):
        for col, t in enumerate(timesteps):
            ax = axes[row][col]
            ax.set_yscale("log")
            ax.set_title(f"{metric}, t = {t}", fontsize=8)
            ax.tick_params(labelsize=6)
            if row == len(metrics) - 1:
                ax.set_xlabel("training step", fontsize=7)
    axes[0][0].legend(fontsize=5)
    fig.suptitle(f"Outliers in the token embeddings over training ({weights} weights, x0 = 0 noised to t)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def log_correlations(x, y):
    """(Pearson correlation of log x and log y, Spearman rank correlation) of positive sequences."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    if len(lx) < 3 or lx.std() == 0 or ly.std() == 0:
        return float("nan"), float("nan")
    ranks = lambda v: np.argsort(np.argsort(v)).astype(np.float64)
    return float(np.corrcoef(lx, ly)[0, 1]), float(np.corrcoef(ranks(lx), ranks(ly))[0, 1])


def norm_input_ratios(run_dir, weights="ema", key="signal_to_outlier"):
    """{layer: {t: ratio}} at the normalization inputs at a run's last probe."""
    rows = [r for r in load_embeddings(run_dir, "norm_input") if r["weights"] == weights]
    last = max((r["step"] for r in rows), default=None)
    out = {}
    for r in rows:
        if r["step"] == last:
            out.setdefault(r["layer"], {})[r["t"]] = r[key]
    return out


def mechanism(runs, weights="ema"):
    """Does the per-timestep error of the LayerNorm model track the signal-to-outlier ratio at its norm
    inputs? For the first LayerNorm seed (and the no-LayerNorm run of the same seed, if any): per norm
    layer and for the largest ratio over layers, correlations (log Pearson, Spearman) over the timestep
    grid of the ratio with the LayerNorm eps error and with the LayerNorm / no-LayerNorm error ratio."""
    by_key = {(load_config(r)["normalization"], load_config(r)["global_seed"]): r for r in runs}
    ln = [r for r in first_seed_runs(runs) if load_config(r)["normalization"] == "layer-norm"]
    if not ln or not last_probe(ln[0], weights):
        return None
    run = ln[0]
    seed = load_config(run)["global_seed"]
    none = by_key.get(("none", seed))
    err = {t: r["eps_rel_error"] for t, r in last_probe(run, weights).items()}
    none_err = {t: r["eps_rel_error"] for t, r in last_probe(none, weights).items()} if none else {}
    result = dict(run=run, seed=seed, weights=weights, error=err, none_error=none_err, layers={})
    for key in ("signal_to_outlier", "signal_to_const"):
        ratios = norm_input_ratios(run, weights, key)
        if not ratios:
            return None
        ratios["max over layers"] = {t: max(v[t] for v in ratios.values()) for t in err}
        for layer, per_t in ratios.items():
            ts = [t for t in sorted(err) if t in per_t]
            entry = result["layers"].setdefault(layer, {})
            entry[key] = {str(t): per_t[t] for t in ts}
            entry[f"{key}_vs_error"] = log_correlations([per_t[t] for t in ts], [err[t] for t in ts])
            if none_err:
                entry[f"{key}_vs_gap"] = log_correlations([per_t[t] for t in ts], [err[t] / none_err[t] for t in ts])
    return result


def mechanism_markdown(result):
    """Markdown lines: the mechanism's correlations per norm layer."""
    if not result:
        return []
    fmt = lambda pair: "-" if pair is None else f"{pair[0]:+.2f} / {pair[1]:+.2f}"
    lines = ["", f"The mechanism (LayerNorm run seed {result['seed']}, {result['weights']} weights, last probe): at each "
             "normalization layer's input, the signal (the part that varies with the noise draw, channel-centred) over "
             "the outlier (the loudest channel of the part that does not). Correlation over the timestep grid "
             "(log Pearson / Spearman) of that ratio with the LayerNorm eps error, and with the LayerNorm / no-LayerNorm "
             "error ratio (the gap). signal/const uses all of the constant part instead of its loudest channel.", "",
             "| norm layer | signal/outlier at t = 0, 10, 100, 999 | vs error | vs gap | signal/const vs error | vs gap |",
             "|---|---|---:|---:|---:|---:|"]
    for layer, e in result["layers"].items():
        shown = ", ".join(f"{e['signal_to_outlier'][str(t)]:.2g}" for t in (0, 10, 100, 999) if str(t) in e["signal_to_outlier"])
        lines.append(f"| {layer} | {shown} | {fmt(e['signal_to_outlier_vs_error'])} | {fmt(e.get('signal_to_outlier_vs_gap'))} | "
                     f"{fmt(e['signal_to_const_vs_error'])} | {fmt(e.get('signal_to_const_vs_gap'))} |")
    return lines


def plot_mechanism(result, path):
    """Left: signal/outlier at every norm input against t. Middle: LayerNorm eps error against the largest
    ratio over layers (one point per t). Right: LayerNorm / no-LayerNorm error ratio against it."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for layer, e in result["layers"].items():
        ts = sorted(int(t) for t in e["signal_to_outlier"])
        axes[0].plot([t + 1 for t in ts], [e["signal_to_outlier"][str(t)] for t in ts], marker=".",
                     lw=2.5 if layer == "max over layers" else 1, color="k" if layer == "max over layers" else None, label=layer)
    axes[0].set(xscale="log", yscale="log", xlabel="timestep t + 1", ylabel="|signal| / outlier at the norm input")
    axes[0].legend(fontsize=6)
    top = result["layers"]["max over layers"]
    ts = [t for t in sorted(result["error"]) if str(t) in top["signal_to_outlier"]]
    ratio = [top["signal_to_outlier"][str(t)] for t in ts]
    panels = [(axes[1], [result["error"][t] for t in ts], "LayerNorm eps error", "signal_to_outlier_vs_error")]
    if result["none_error"]:
        panels.append((axes[2], [result["error"][t] / result["none_error"][t] for t in ts],
                       "eps error LayerNorm / no LayerNorm", "signal_to_outlier_vs_gap"))
    for ax, ys, ylabel, corr in panels:
        ax.scatter(ratio, ys, color="tab:red")
        for t, x, y in zip(ts, ratio, ys):
            ax.annotate(f"t={t}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        r, rho = top[corr]
        ax.set(xscale="log", yscale="log", xlabel="largest |signal| / outlier over norm inputs", ylabel=ylabel,
               title=f"log Pearson {r:+.2f}, Spearman {rho:+.2f}")
    if not result["none_error"]:
        axes[2].set_axis_off()
    fig.suptitle(f"Does the LayerNorm model's per-t error track its signal/outlier ratio? (seed {result['seed']}, "
                 f"{result['weights']} weights)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def growth_markdown(runs, timesteps=GROWTH_TIMESTEPS, weights="raw"):
    """Markdown lines: largest max |x| and RMS kurtosis over the blocks at the first, middle and last probe."""
    lines = ["", f"Outlier growth ({weights} weights, first seed; largest value over the blocks at the first / middle / "
             "last probe; `outlier_growth.png` has every probe):", "",
             "| variant | t | probe steps | max abs | max/median | RMS kurtosis |", "|---|---:|---|---|---|---|"]
    for run in first_seed_runs(runs):
        norm = load_config(run)["normalization"]
        for t in timesteps:
            cols = []
            for metric in ("max_abs", "max_median_ratio", "rms_kurtosis"):
                per_step = {}
                for (layer, tt), points in outlier_growth(run, weights, metric).items():
                    if tt == t:
                        for step, value in points:
                            per_step[step] = max(per_step.get(step, value), value)
                steps = sorted(per_step)
                if not steps:
                    return []
                picked = [steps[0], steps[len(steps) // 2], steps[-1]]
                cols.append(" / ".join(f"{per_step[s]:.3g}" for s in picked))
            lines.append(f"| {LABELS.get(norm, norm)} | {t} | {' / '.join(map(str, picked))} | {' | '.join(cols)} |")
    return lines


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


#################################################################################
#                 The sweep (`make sweep`): where is the LayerNorm gap large?   #
#################################################################################

SWEEP_VARIANTS = ("layer-norm", "none")
# One factor at a time around the CPU preset: name -> (what changes, train_toy.py flags, step factor).
SWEEP_CELLS = {
    "preset": ("the CPU preset (lr 1e-3 cosine, width 64, batch 256)", [], 1),
    "lr1e-4-constant": ("constant lr 1e-4 (the study's)", ["--lr", "1e-4", "--lr-schedule", "constant"], 1),
    "lr1e-3-constant": ("constant lr 1e-3", ["--lr", "1e-3", "--lr-schedule", "constant"], 1),
    "width128": ("width 128", ["--hidden-size", "128"], 1),
    "batch1024": ("batch 1024", ["--global-batch-size", "1024"], 1),
    "steps2x": ("2x the training steps", [], 2),
    "steps4x": ("4x the training steps (near the study's 50k)", [], 4),
}
# `make sweep` runs these (about 82 minutes on 2 idle cores); steps4x adds about 30 minutes, asked for by name.
DEFAULT_SWEEP_CELLS = ("preset", "lr1e-4-constant", "lr1e-3-constant", "width128", "batch1024", "steps2x")
# CPU time of a step relative to the preset's (measured, one thread: 18 / 37 / 66 ms at width 64 / width
# 128 / batch 1024); only orders the jobs, longest first, so that the parallel slots stay busy.
STEP_COST = {"width128": 2.0, "batch1024": 3.6}


def sweep_jobs(cells, seeds, out, steps_scale=1.0, extra=()):
    """One train_toy.py job per (cell, variant, seed): a dict with cell, normalization, seed, steps, the
    results directory (one per cell and length, so runs of another --steps-scale never mix) and argv
    (`--resume auto`, so an interrupted run continues). Sorted longest first."""
    preset = PRESETS["cpu"]
    jobs = []
    for cell in cells:
        if cell not in SWEEP_CELLS:
            raise SystemExit(f"unknown sweep cell {cell!r}; choose from {', '.join(SWEEP_CELLS)}")
        _, flags, factor = SWEEP_CELLS[cell]
        steps = max(4, round(preset["steps"] * factor * steps_scale))
        results_dir = os.path.join(out, "runs", f"{cell}-{steps}")
        schedule = ["--steps", str(steps), "--eval-steps", str(steps), "--warmup-steps",
                    str(round(preset["warmup_steps"] * steps_scale)), "--probe-every", str(max(1, steps // 8)),
                    "--ckpt-every", str(max(1, steps // 4)), "--log-every", str(max(1, min(500, steps // 6)))]
        for norm in SWEEP_VARIANTS:
            for seed in seeds:
                argv = [sys.executable, "train_toy.py", "--preset", "cpu", "--normalization", norm, "--global-seed",
                        str(seed), "--results-dir", results_dir, "--threads", "1", "--resume", "auto", *extra,
                        *flags, *schedule]
                jobs.append(dict(cell=cell, normalization=norm, seed=seed, steps=steps, results_dir=results_dir,
                                 argv=argv, cost=steps * STEP_COST.get(cell, 1.0)))
    return sorted(jobs, key=lambda j: -j["cost"])


def finished_run(job):
    """The run directory of a job that has finished (its final sampling evaluation is written), or None."""
    run = newest_run(job["results_dir"], {"normalization": job["normalization"], "global_seed": job["seed"],
                                          "steps": job["steps"]})
    if run and os.path.exists(os.path.join(run, "metrics.jsonl")) and any(
            r["step"] == job["steps"] for r in load_metrics(run)):
        return run
    return None


def report_jobs(cells, seeds, out, steps_scale=1.0, extra=()):
    """The jobs a sweep report covers: every cell at `seeds`, plus any other seed whose runs of that cell
    (both variants) have finished in `out`, e.g. a third seed run for some cells only. Sorted by cell."""
    jobs = []
    for cell in cells:
        jobs += sweep_jobs([cell], seeds, out, steps_scale, extra)
        folder = jobs[-1]["results_dir"]
        found = set()
        for run in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if os.path.exists(os.path.join(folder, run, "config.json")):
                found.add(load_config(os.path.join(folder, run))["global_seed"])
        for seed in sorted(found - set(seeds)):
            more = sweep_jobs([cell], [seed], out, steps_scale, extra)
            if all(finished_run(job) for job in more):
                jobs += more
    return jobs


def run_sweep(jobs, parallel, log_dir, train=True):
    """Run the jobs that have not finished (jobs.py, a "[cell variant sN]" tag per job; none when not
    `train`); returns {cell: [run directories]} of all jobs."""
    todo = [job for job in jobs if finished_run(job) is None] if train else []
    if train:
        print(f"sweep: {len(jobs)} runs, {len(jobs) - len(todo)} already finished (skipped), {len(todo)} to run, "
              f"{parallel} at a time", flush=True)
    run_jobs([job["argv"] for job in todo], parallel, log_dir,
             tags=[f"{job['cell']} {LABELS.get(job['normalization'], job['normalization'])} s{job['seed']}" for job in todo])
    runs = {}
    for job in sorted(jobs, key=lambda j: list(SWEEP_CELLS).index(j["cell"])):  # cells in table order
        run = finished_run(job)
        if run is None:
            raise SystemExit(f"sweep: {job['cell']} {job['normalization']} seed {job['seed']} has not finished in "
                             f"{job['results_dir']}: run sweep.py with the same flags (without --report) to finish it")
        runs.setdefault(job["cell"], []).append(run)
    return runs


def final_sample_errors(run_dir, weights="ema"):
    """The sample RMS of a run's last evaluation."""
    rows = [r for r in load_metrics(run_dir) if r["weights"] == weights]
    return max(rows, key=lambda r: r["step"])["rms"]


def sweep_cell_summary(runs):
    """One cell: per variant the final sample RMS (EMA and raw) over seeds, the LayerNorm / none ratio of
    the means with the range of per-seed ratios, and the per-t eps error ratios (timestep_summary)."""
    values = {}  # (weights, normalization) -> seed -> rms
    for run in runs:
        cfg = load_config(run)
        for weights in ("ema", "raw"):
            values.setdefault((weights, cfg["normalization"]), {})[cfg["global_seed"]] = final_sample_errors(run, weights)
    cfg = load_config(runs[0])
    cell = dict(steps=cfg["steps"], seeds=sorted({load_config(r)["global_seed"] for r in runs}),
                num_eval_samples=cfg["num_eval_samples"], sampling_steps=cfg["sampling_steps"])
    for weights in ("ema", "raw"):
        ln, none = values.get((weights, "layer-norm"), {}), values.get((weights, "none"), {})
        paired = [ln[s] / none[s] for s in sorted(set(ln) & set(none))]
        cell[weights] = dict(layer_norm=_spread(list(ln.values())), none=_spread(list(none.values())),
                             ratio=statistics.fmean(ln.values()) / statistics.fmean(none.values()),
                             ratio_min=min(paired), ratio_max=max(paired), per_seed_ratios=paired)
    cell["timesteps"] = timestep_summary(runs, "ema")["rows"]
    cell["trajectory"] = {weights: trajectory_summary(runs, weights) for weights in ("ema", "raw")}
    return cell


def probe_trajectory(run_dir, weights="ema", t_min=10):
    """[(step, error)] over a run's probes: the geometric mean of the eps error over the grid's t >= t_min
    (the timesteps where the sweep's cells separate the variants; t = 0-5 are read from the per-t table)."""
    by_step = {}
    for r in load_metrics(run_dir, "timestep"):
        if r["weights"] == weights and r["t"] >= t_min:
            by_step.setdefault(r["step"], []).append(math.log(r["eps_rel_error"]))
    return [(step, math.exp(statistics.fmean(logs))) for step, logs in sorted(by_step.items())]


def trajectory_summary(runs, weights="ema", t_min=10):
    """Does the gap grow with training? Per variant and seed the probe trajectory (probe_trajectory); at
    the probe nearest half-way and at the last one, the LayerNorm / none ratio (of the means over seeds,
    with the per-seed range); and each variant's drop over the second half, error(half) / error(end)
    (a variant that has reached a floor drops by about 1)."""
    curves = {}  # normalization -> seed -> [(step, error)]
    for run in runs:
        cfg = load_config(run)
        curve = probe_trajectory(run, weights, t_min)
        if curve:
            curves.setdefault(cfg["normalization"], {})[cfg["global_seed"]] = curve
    out = dict(weights=weights, t_min=t_min, curves=curves)
    ln, none = curves.get("layer-norm", {}), curves.get("none", {})
    seeds = sorted(set(ln) & set(none))
    if not seeds:
        return out
    steps = [s for s, _ in ln[seeds[0]]]
    half = min(steps, key=lambda s: abs(s - steps[-1] / 2))
    at = lambda curve, step: dict(curve)[step]
    for name, step in (("half", half), ("end", steps[-1])):
        paired = [at(ln[s], step) / at(none[s], step) for s in seeds]
        out[name] = dict(step=step, layer_norm=_spread([at(ln[s], step) for s in seeds]),
                         none=_spread([at(none[s], step) for s in seeds]),
                         ratio=statistics.fmean(at(ln[s], step) for s in seeds)
                         / statistics.fmean(at(none[s], step) for s in seeds),
                         ratio_min=min(paired), ratio_max=max(paired))
    out["drop"] = {norm: _spread([at(c[s], half) / at(c[s], steps[-1]) for s in seeds])
                   for norm, c in (("layer-norm", ln), ("none", none))}
    return out


def sweep_markdown(summary, timesteps=(0, 1, 5, 10, 50, 100, 500, 999)):
    """summary.md of the sweep: the sample-error table and the per-t eps error ratio table."""
    first = next(iter(summary["cells"].values()))
    lines = ["# Sweep: where is the LayerNorm gap large?", "",
             "LayerNorm vs no LayerNorm, one factor at a time around the CPU preset (DiT-XS/1 at depth 2, width 64, "
             "batch 256, AdamW lr 1e-3 with 200 warm-up steps and cosine decay, EMA 0.999). Sample errors: RMS of "
             f"{first['num_eval_samples']} samples ({first['sampling_steps']}-step {first.get('sampler', 'ddpm')}, target 0) at the last step, mean "
             "over seeds [min, max]; ratio = LayerNorm / no LayerNorm of the means [range of per-seed ratios]; > 1: "
             "LayerNorm is worse.", "",
             "| cell | change | steps | seeds | EMA RMS, LayerNorm | EMA RMS, no LayerNorm | EMA ratio | raw ratio |",
             "|---|---|---:|---:|---|---|---|---|"]
    spread = lambda s: f"{s['mean']:.2e} [{s['min']:.1e}, {s['max']:.1e}]"
    ratio = lambda c: f"{c['ratio']:.2f} [{c['ratio_min']:.2f}, {c['ratio_max']:.2f}]"
    for name, cell in summary["cells"].items():
        lines.append(f"| {name} | {SWEEP_CELLS[name][0]} | {cell['steps']} | {len(cell['seeds'])} | "
                     f"{spread(cell['ema']['layer_norm'])} | {spread(cell['ema']['none'])} | {ratio(cell['ema'])} | "
                     f"{ratio(cell['raw'])} |")
    lines += ["", "Per-timestep eps error (probe at the last step, EMA weights, no sampling): LayerNorm / no LayerNorm "
              "[range of per-seed ratios]:", "",
              "| cell | " + " | ".join(f"t={t}" for t in timesteps) + " |", "|---|" + "---:|" * len(timesteps)]
    for name, cell in summary["cells"].items():
        per_t = {r["t"]: r for r in cell["timesteps"]}
        lines.append(f"| {name} | " + " | ".join(
            f"{per_t[t]['ratio']:.2f} [{per_t[t]['ratio_min']:.2f}, {per_t[t]['ratio_max']:.2f}]" if "ratio" in per_t.get(t, {})
            else "-" for t in timesteps) + " |")
    lines += ["", "![LayerNorm / no-LayerNorm ratios per cell](ratios.png)", ""]
    lines += trajectory_markdown(summary, "ema") + trajectory_markdown(summary, "raw", figure=False)
    return "\n".join(lines)


def trajectory_markdown(summary, weights="ema", figure=True):
    """Markdown lines: per cell, the probe error (geometric mean over t >= 10) half-way and at the end, the
    ratios, and each variant's drop over the second half. (The EMA lags the raw weights by about
    1 / (1 - decay) steps, most for the faster-moving no-LayerNorm model, so early EMA ratios understate
    its lead; the raw table is the other reading.)"""
    cells = {name: c["trajectory"][weights] for name, c in summary["cells"].items()
             if "end" in c.get("trajectory", {}).get(weights, {})}
    if not cells:
        return []
    t_min = next(iter(cells.values()))["t_min"]
    ratio = lambda r: f"{r['ratio']:.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]"
    drop = lambda d: f"{d['mean']:.2f} [{d['min']:.2f}, {d['max']:.2f}]"
    lines = [f"Does the gap grow with training? Probe eps error, geometric mean over the grid's t >= {t_min} "
             f"({weights} weights), at the probe nearest half-way and at the last one (mean over seeds); ratio = "
             "LayerNorm / no LayerNorm [range of per-seed ratios]; drop = error half-way / error at the end (about "
             "1: no progress in the second half). Curves: trajectories.png.", "",
             "| cell | half-way step | LayerNorm | no LayerNorm | ratio | end step | LayerNorm | no LayerNorm | ratio "
             "| drop, LayerNorm | drop, no LayerNorm |", "|---|---:|---|---|---|---:|---|---|---|---|---|"]
    for name, tr in cells.items():
        h, e = tr["half"], tr["end"]
        lines.append(f"| {name} | {h['step']} | {h['layer_norm']['mean']:.2e} | {h['none']['mean']:.2e} | {ratio(h)} "
                     f"| {e['step']} | {e['layer_norm']['mean']:.2e} | {e['none']['mean']:.2e} | {ratio(e)} "
                     f"| {drop(tr['drop']['layer-norm'])} | {drop(tr['drop']['none'])} |")
    lines += ["", "![probe error during training per cell](trajectories.png)", ""] if figure else [""]
    return lines


def plot_trajectories(summary, path, weights="ema"):
    """One panel per cell: the probe error (geometric mean over t >= 10) against the training step, a line
    per variant and seed (LayerNorm red, no LayerNorm blue), log error against linear steps; the raw
    weights' curves as thin faint lines (the EMA lags them)."""
    names = list(summary["cells"])
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.3 * rows), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        tr = summary["cells"][name]["trajectory"][weights]
        for norm, color in (("layer-norm", "tab:red"), ("none", "tab:blue")):
            raw = summary["cells"][name]["trajectory"].get("raw", {}).get("curves", {}).get(norm, {})
            for i, (_, curve) in enumerate(sorted(raw.items())):
                ax.plot([s for s, _ in curve], [e for _, e in curve], color=color, lw=0.6, alpha=0.35,
                        label=f"{LABELS.get(norm, norm)}, raw" if i == 0 else None)
            for i, (seed, curve) in enumerate(sorted(tr["curves"].get(norm, {}).items())):
                ax.plot([s for s, _ in curve], [e for _, e in curve], color=color, marker=".", lw=1, alpha=0.8,
                        ls="-" if i == 0 else "--", label=f"{LABELS.get(norm, norm)}, seed {seed}")
        ax.set(yscale="log", title=name, xlabel="training step")
        ax.grid(True, which="both", alpha=0.2)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes[0][0].set_ylabel("eps error, geo. mean over t >= 10")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Probe error during training (fixed noise, no sampling; markers: EMA, faint: raw weights): "
                 "does the LayerNorm gap grow?", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_sweep(summary, path):
    """Left: final sample RMS ratio per cell (a dot per seed, a bar at the ratio of the means). Right:
    per-t eps error ratio against t, a line per cell with the per-seed range shaded."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = list(summary["cells"])
    for i, name in enumerate(names):
        cell = summary["cells"][name]
        left.scatter([i] * len(cell["ema"]["per_seed_ratios"]), cell["ema"]["per_seed_ratios"], color="tab:red", zorder=3)
        left.scatter([i + 0.2] * len(cell["raw"]["per_seed_ratios"]), cell["raw"]["per_seed_ratios"], color="0.5",
                     marker="x", zorder=3, label="raw, per seed" if i == 0 else None)
        left.hlines(cell["ema"]["ratio"], i - 0.25, i + 0.25, color="tab:red", lw=2,
                    label="EMA: ratio of means (dots: per seed)" if i == 0 else None)
        rows = [r for r in cell["timesteps"] if "ratio" in r]
        ts = [r["t"] + 1 for r in rows]
        line, = right.plot(ts, [r["ratio"] for r in rows], marker=".", label=name)
        right.fill_between(ts, [r["ratio_min"] for r in rows], [r["ratio_max"] for r in rows], color=line.get_color(),
                           alpha=0.15)
    left.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    for ax in (left, right):
        ax.set_yscale("log")
        ax.axhline(1, color="0.5", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    left.set_ylabel("final sample RMS, LayerNorm / no LayerNorm")
    right.set(xscale="log", xlabel="timestep t + 1", ylabel="eps error, LayerNorm / no LayerNorm (EMA)")
    fig.suptitle("Where is the LayerNorm gap large? (> 1: LayerNorm worse; spread over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_sweep_report(runs_by_cell, out):
    """summary.md, summary.json and ratios.png of a finished sweep in `out`; returns the markdown."""
    os.makedirs(out, exist_ok=True)
    summary = dict(cells={name: sweep_cell_summary(runs) for name, runs in runs_by_cell.items()},
                   runs={name: list(runs) for name, runs in runs_by_cell.items()})
    plot_sweep(summary, os.path.join(out, "ratios.png"))
    plot_trajectories(summary, os.path.join(out, "trajectories.png"))
    text = sweep_markdown(summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return text
