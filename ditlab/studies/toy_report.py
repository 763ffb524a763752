"""Toy study reports: summaries, markdown tables and the mechanism analysis."""

import statistics

import numpy as np

from ditlab.toy.readers import (
    GROWTH_TIMESTEPS,
    LABELS,
    final_loss,
    first_seed_runs,
    last_probe,
    load_config,
    load_metrics,
    norm_input_ratios,
    outlier_growth,
)

ERRORS = ("rms", "mean_abs", "max_abs")
DEFINITIONS = "Definitions: docs/toy.md#how-the-tables-are-measured."
WARM_LAGS = 5  # a run shorter than this many EMA lags (1 / (1 - decay) steps) is too short to read
PRIOR_RMS = 0.5  # an EMA sample RMS above this is still near the prior's 1.0: the EMA has not left its start


def seeds_phrase(n):
    """"1 seed", "3 seeds"."""
    return f"{n} seed" if n == 1 else f"{n} seeds"


def times(ratio):
    """A ratio as a factor for a sentence: 1.90x, 0.52x, 23.4x."""
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.3g}x"


def ratio_sentence(steps, seeds, ratio, weights="EMA"):
    """The toy family's one-sentence result: how LayerNorm's sampled error compares with no LayerNorm's."""
    verdict = "about equal" if abs(ratio - 1) < 0.05 else "LayerNorm worse" if ratio > 1 else "LayerNorm better"
    return (f"At {steps:,} steps, {seeds_phrase(seeds)}: LayerNorm's sampled error is {times(ratio)} the "
            f"no-LayerNorm model's ({weights} weights; {verdict}).")


def ema_lag(ema_decay):
    """How many steps the EMA weights trail the raw ones: about 1 / (1 - decay)."""
    return 1 / (1 - ema_decay) if ema_decay < 1 else float("inf")


def too_short_line(steps, ema_decay, ema_rms=None, quick=None):
    """One line when runs are too short to mean anything (None otherwise): a `quick` run (e.g. "a quick
    sweep, --steps-scale 0.02"), fewer steps than WARM_LAGS EMA lags, or EMA samples still near the prior."""
    lag = ema_lag(ema_decay)
    reasons = [quick] if quick else []
    if steps < WARM_LAGS * lag:
        reasons.append(f"{steps:,} steps is under {WARM_LAGS}x the EMA's lag of 1/(1 - {ema_decay}) = {lag:,.0f} steps")
    if ema_rms is not None and ema_rms > PRIOR_RMS:
        reasons.append(f"the EMA samples' RMS {ema_rms:.2f} is near the prior's 1.0 (the EMA has not warmed up)")
    if not reasons:
        return None
    return (f"**Too short to mean anything:** {'; '.join(reasons)}. Train at least {WARM_LAGS * lag:,.0f} steps "
            "before reading the ratios.")


def ema_lag_line(ema_decay):
    """One line on why the EMA rows' early ratios differ from the raw rows'."""
    return (f"EMA rows: the averaged weights lag the raw ones by about 1/(1 - {ema_decay}) = {ema_lag(ema_decay):,.0f} "
            "steps, so at steps of a few lags or fewer they are still close to where training started and their "
            "ratios say little; read the raw rows there.")


def headline(summary, config):
    """The toy summary's first lines: its result in one sentence, the too-short warning if any."""
    ema = [r for r in summary["ratios"] if r["weights"] == "ema"]
    rows = [r for r in summary["rows"] if r["weights"] == "ema"]
    last = max((r["step"] for r in rows), default=None)
    if last is None:
        return []
    at_last = [r for r in rows if r["step"] == last]
    seeds = min(r["rms"]["n"] for r in at_last)
    if ema and ema[-1]["step"] == last:
        lines = [ratio_sentence(last, seeds, ema[-1]["rms"])]
    else:
        lines = [f"At {last:,} steps, {seeds_phrase(seeds)}: the sampled RMS error is " + ", ".join(
            f"{r['rms']['mean']:.2e} for {LABELS.get(r['normalization'], r['normalization'])}" for r in at_last)
            + " (EMA weights; no pair to compare)."]
    warning = too_short_line(last, config["ema_decay"], max(r["rms"]["mean"] for r in at_last))
    return lines + (["", warning] if warning else [])


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


def format_markdown(summary, config):
    """summary.md of the toy study: the title, the result in a sentence (and whether the runs are too short to
    mean anything), the run's settings, the sample-error table, the losses and the LayerNorm / none ratios."""
    lines = [
        "# Toy identity study",
        "",
        *headline(summary, config),
        "",
        f"Run: model {config['model']} (depth {config.get('depth') or 'default'}, "
        f"width {config.get('hidden_size') or 'default'}), "
        f"batch {config['global_batch_size']}, lr {config['lr']} ({config['lr_schedule']}), EMA {config['ema_decay']}, "
        f"{config['max_steps']} steps, preset {config['preset']}; {config['num_eval_samples']} samples x 4 pixels x "
        f"2 channels, {config['sampling_steps']}-step {config.get('sampler', 'ddpm')}.",
        "",
        f"Sample errors (target 0), mean over seeds [min, max]. {DEFINITIONS}",
        ema_lag_line(config["ema_decay"]),
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
        lines += ["", "Training loss over the last log intervals, mean over seeds [min, max]:", "",
                  "| variant | seeds | final training loss |", "|---|---:|---|"]
        for norm, v in summary["final_loss"].items():
            lines.append(f"| {LABELS.get(norm, norm)} | {v['n']} | {v['mean']:.2e} [{v['min']:.1e}, {v['max']:.1e}] |")
    if summary["ratios"]:
        lines += ["", "Ratio LayerNorm error / no-LayerNorm error (means over seeds; > 1: LayerNorm is worse):", "",
                  "| step | weights | RMS | mean abs | max abs |", "|---:|---|---:|---:|---:|"]
        for r in summary["ratios"]:
            lines.append(f"| {r['step']} | {r['weights']} | {r['rms']:.2f} | {r['mean_abs']:.2f} | {r['max_abs']:.2f} |")
    return "\n".join(lines) + "\n"


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
    lines = ["", f"Per-timestep precision at the last probe ({weights} weights), mean over seeds [min, max]; ratio: "
             f"LayerNorm / no LayerNorm eps error [range of per-seed ratios]. {DEFINITIONS}", "",
             "| t | eps error, LayerNorm | eps error, no LayerNorm | ratio | x0 RMSE, LayerNorm | x0 RMSE, no LayerNorm "
             "| var error, LayerNorm | var error, no LayerNorm |", "|---:|---|---|---|---|---|---|---|"]
    for e, x, v in zip(eps, x0, var):
        ratio = f"{e['ratio']:.2f} [{e['ratio_min']:.2f}, {e['ratio_max']:.2f}]" if "ratio" in e else "-"
        lines.append(f"| {e['t']} | {cell(e, 'layer-norm')} | {cell(e, 'none')} | {ratio} | {cell(x, 'layer-norm')} | "
                     f"{cell(x, 'none')} | {cell(v, 'layer-norm')} | {cell(v, 'none')} |")
    return lines


def log_correlations(x, y):
    """(Pearson correlation of log x and log y, Spearman rank correlation) of positive sequences."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    if len(lx) < 3 or lx.std() == 0 or ly.std() == 0:
        return float("nan"), float("nan")
    ranks = lambda v: np.argsort(np.argsort(v)).astype(np.float64)
    return float(np.corrcoef(lx, ly)[0, 1]), float(np.corrcoef(ranks(lx), ranks(ly))[0, 1])


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
    lines = ["", f"The mechanism (LayerNorm run seed {result['seed']}, {result['weights']} weights, last probe): "
             f"correlations over the timestep grid, log Pearson / Spearman. {DEFINITIONS}", "",
             "| norm layer | signal/outlier at t = 0, 10, 100, 999 | vs error | vs gap | signal/const vs error | vs gap |",
             "|---|---|---:|---:|---:|---:|"]
    for layer, e in result["layers"].items():
        shown = ", ".join(f"{e['signal_to_outlier'][str(t)]:.2g}" for t in (0, 10, 100, 999) if str(t) in e["signal_to_outlier"])
        lines.append(f"| {layer} | {shown} | {fmt(e['signal_to_outlier_vs_error'])} | {fmt(e.get('signal_to_outlier_vs_gap'))} | "
                     f"{fmt(e['signal_to_const_vs_error'])} | {fmt(e.get('signal_to_const_vs_gap'))} |")
    return lines


def growth_markdown(runs, timesteps=GROWTH_TIMESTEPS, weights="raw"):
    """Markdown lines: largest max |x| and RMS kurtosis over the blocks at the first, middle and last probe."""
    lines = ["", f"Outlier growth ({weights} weights, first seed): largest over the blocks at the first / middle / "
             "last probe.", "",
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
