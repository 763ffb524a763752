"""Toy study figures."""

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator, NullFormatter, StrMethodFormatter

from ditlab.studies.variants import ORDER

from ditlab.toy.readers import (
    GROWTH_TIMESTEPS,
    LABELS,
    PROBE_METRICS,
    eval_steps,
    first_seed_runs,
    last_probe,
    load_config,
    load_metrics,
    load_samples,
    outlier_growth,
)

COLORS = {"layer-norm": "tab:red", "none": "tab:blue"}


#################################################################################
#                                  Plots and tables                             #
#################################################################################


def registry_rank(variant):
    """Where a variant comes in the registry's ORDER (unknown ones after every known one)."""
    return ORDER.index(variant) if variant in ORDER else len(ORDER)


def plot_scatter(ax, runs, step, weights="ema"):
    """Channel 0 vs channel 1 of every pixel of every sample, one colour per variant, symmetric limits; the
    widest cloud is drawn first (so none is hidden) but the legend follows the variant registry's ORDER.
    Returns the number of samples per run."""
    limit = 0.0
    clouds, handles = [], {}
    for run_dir in runs:
        s = load_samples(run_dir, step, weights)
        clouds.append((float((s.double() ** 2).mean().sqrt()), load_config(run_dir)["normalization"], s))
    for rms, norm, s in sorted(clouds, key=lambda c: -c[0]):  # widest cloud first, so none is hidden
        c0, c1 = s[:, 0].flatten().numpy(), s[:, 1].flatten().numpy()
        handles[norm] = ax.scatter(c0, c1, s=6, alpha=0.6, color=COLORS.get(norm),
                                   label=f"{LABELS.get(norm, norm)} (RMS {rms:.1e})")
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
    order = sorted(handles, key=registry_rank)
    ax.legend([handles[n] for n in order], [handles[n].get_label() for n in order], fontsize=7, loc="upper right")
    return max(len(s) for _, _, s in clouds)


def plot_compare(runs, path, weights="ema"):
    """The study's figure: one scatter panel per evaluated step, all variants of one seed together."""
    steps = eval_steps(runs[0])
    fig, axes = plt.subplots(1, len(steps), figsize=(4.4 * len(steps), 4.8), squeeze=False)
    num = max(plot_scatter(ax, runs, step, weights) for ax, step in zip(axes[0], steps))
    fig.suptitle(f"Toy DiT samples (target: all zeros). Each point is one pixel of {num} samples.", fontsize=10)
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


def readable_log_ticks(ax):
    """Tick labels of a log-log panel that cannot overlap: no minor-tick labels, and an axis spanning less
    than a decade gets at most four plain major ticks (matplotlib would label every minor tick there)."""
    for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        axis.set_minor_formatter(NullFormatter())
        if lo > 0 and hi / lo < 10:
            axis.set_major_locator(MaxNLocator(nbins=4))
            axis.set_major_formatter(StrMethodFormatter("{x:.3g}"))


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
    readable_log_ticks(axes[0])
    top = result["layers"]["max over layers"]
    ts = [t for t in sorted(result["error"]) if str(t) in top["signal_to_outlier"]]
    ratio = [top["signal_to_outlier"][str(t)] for t in ts]
    panels = [(axes[1], [result["error"][t] for t in ts], "LayerNorm eps error", "signal_to_outlier_vs_error")]
    if result["none_error"]:
        panels.append((axes[2], [result["error"][t] / result["none_error"][t] for t in ts],
                       "eps error LayerNorm / no LayerNorm", "signal_to_outlier_vs_gap"))
    for ax, ys, ylabel, corr in panels:
        ax.scatter(ratio, ys, color="tab:red")
        for i, (t, x, y) in enumerate(zip(ts, ratio, ys)):  # above and below by turns: neighbours crowd
            ax.annotate(f"t={t}", (x, y), fontsize=6, xytext=(3, 3 if i % 2 else -9), textcoords="offset points")
        r, rho = top[corr]
        ax.set(xscale="log", yscale="log", xlabel="largest |signal| / outlier over norm inputs", ylabel=ylabel,
               title=f"log Pearson {r:+.2f}, Spearman {rho:+.2f}")
        readable_log_ticks(ax)
    if not result["none_error"]:
        axes[2].set_axis_off()
    fig.suptitle(f"Does the LayerNorm model's per-t error track its signal/outlier ratio? (seed {result['seed']}, "
                 f"{result['weights']} weights)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


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


def _paired(records, cell, base, steps, value):
    """Per-seed ratios value(cell) / value(base) over the seeds both have at `steps`."""
    seeds = sorted(s for (c, s, n) in records if c == cell and n == steps and (base, s, n) in records)
    return [value(records[(cell, s, steps)]) / value(records[(base, s, steps)]) for s in seeds]


def _localise_panel(ax, records, steps, title):
    """Per-t eps error ratio to no normalization (same seed) of the localise and restore cells at `steps`:
    the mean over seeds, shaded min-max. Returns whether any cell had a paired seed."""
    drawn = False
    for cell, color in (("layer-norm", "tab:red"), ("ln-blocks", "tab:orange"), ("ln-final", "tab:purple"),
                        ("restore", "tab:green")):
        first = next((r for (c, s, n), r in records.items() if c == cell and n == steps), None)
        if first is None:
            continue
        ts = sorted(int(t) for t in first["eps"])
        per_t = [_paired(records, cell, "none", steps, lambda r, t=t: r["eps"][str(t)]) for t in ts]
        if not per_t[0]:
            continue
        drawn = True
        x = [t + 1 for t in ts]
        ax.plot(x, [sum(v) / len(v) for v in per_t], marker=".", color=color, label=f"{cell} ({len(per_t[0])} seeds)")
        ax.fill_between(x, [min(v) for v in per_t], [max(v) for v in per_t], color=color, alpha=0.15)
    ax.set(xscale="log", yscale="log", xlabel="timestep t + 1", ylabel="eps error / no normalization's (same seed)",
           title=title)
    return drawn


def plot_localise_lengths(records, lengths, path):
    """The localise panel at every training length in `lengths`, side by side with a shared y axis, so that
    the way the two norms' shares change with training can be read off (a panel per length). Returns False
    (and writes nothing) when no length has a paired run."""
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.3), sharey=True, squeeze=False)
    drawn = [_localise_panel(ax, records, n, f"{n} steps") for ax, n in zip(axes[0], lengths)]
    if not any(drawn):
        plt.close(fig)
        return False
    for ax in axes[0]:
        ax.axhline(1, color="0.5", lw=0.8, ls=":")
        ax.grid(True, which="both", alpha=0.2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("Localise: per-t eps error over no normalization's (toy CPU preset; > 1: worse)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_mechanism_study(records, steps, path, stress_pairs, intervene_cells, place="final.norm"):
    """The mechanism study (ditlab/studies/mechanism.py) in three panels, from its records {(cell, seed, steps):
    record}. Left: per-t eps error ratio to no normalization for the localise and restore cells (mean over
    seeds, shaded min-max). Middle: sampled error ratio of each LayerNorm cell to its no-LayerNorm twin, a
    dot per seed and a bar at the mean. Right: the interventions at `place`: sampled error of the edited
    over the unedited model per edit, a dot per seed. Returns False (and writes nothing) without records."""
    if not records:
        return False
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    _localise_panel(left, records, steps, "Localise and restore")
    labels = []
    for i, (ln, none) in enumerate(stress_pairs):
        ratios = _paired(records, ln, none, steps, lambda r: r["sample_rms"])
        labels.append(ln.replace("layer-norm", "LN") if ln != "layer-norm" else "LN (plain)")
        if ratios:
            middle.scatter([i] * len(ratios), ratios, color="tab:red", zorder=3)
            middle.hlines(sum(ratios) / len(ratios), i - 0.25, i + 0.25, color="tab:red", lw=2)
    middle.set_xticks(range(len(stress_pairs)), labels, fontsize=8)
    middle.set(yscale="log", ylabel="sampled error, LayerNorm / no LayerNorm",
               title="Stress: the gap under weight decay and dropout")
    edits = ("mean", "per-t", "zero")
    for j, (cell, color) in enumerate(zip(intervene_cells, ("tab:red", "tab:blue", "tab:green"))):
        got = [r["interventions"]["places"][place] for (c, s, n), r in records.items()
               if c == cell and n == steps and place in r.get("interventions", {}).get("places", {})]
        for i, edit in enumerate(edits):
            ys = [g[edit]["sample_ratio"] for g in got]
            if ys:
                right.scatter([i + (j - 1) * 0.22] * len(ys), ys, color=color, zorder=3,
                              label=f"{cell} ({len(ys)} seeds)" if i == 0 else None)
    right.set_xticks(range(len(edits)), [f"{e}-ablate" for e in edits])
    right.set(yscale="log", ylabel="sampled error, edited / unedited",
              title=f"Ablate the loudest channel at {place}'s input")
    for ax in (left, middle, right):
        ax.axhline(1, color="0.5", lw=0.8, ls=":")
        ax.grid(True, which="both", alpha=0.2)
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"The mechanism study at {steps} steps (toy CPU preset; > 1: worse)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
