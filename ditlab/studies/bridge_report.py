"""The bridge study's report (bridge.py runs it): from the records alone, the toy's LayerNorm gap against its
data's spread, the digits models' per-timestep errors beside the toy's, what the edits of the loudest
channel do to digit samples, and the figures."""

import math
import os

import matplotlib.pyplot as plt
from matplotlib import ticker
import numpy as np

from ditlab.analysis import load_images
from ditlab.files import provenance, write_json, write_page
from ditlab.studies.stats import fmt_spread, geomean, spread
from ditlab.studies.variants import color

REPORT_T = (0, 1, 5, 10, 50, 100, 500, 999)
LATE = 10  # "t >= 10": the timesteps where the toy's blocks' norms cost precision (below, the final norm's)
EDIT_NAMES = ("mean", "per-t", "zero")
FIGURES = {"ratio_per_t.png": "bridge_ratio_per_t.png", "gap_vs_spread.png": "bridge_gap_vs_spread.png",
           "edits.png": "bridge_edits.png", "edit_grid.png": "bridge_edit_grid.png"}
GRID_COLUMNS = ("unedited", "final.norm/mean", "final.norm/per-t", "final.norm/zero")
DIGITS_LABELS = {"layer-norm": "LayerNorm", "none": "none", "ln-blocks": "LN blocks only",
                 "ln-final": "LN final only"}
DIGITS_COLORS = {"ln-blocks": "tab:orange", "ln-final": "tab:purple"}


def per_t(record, key="eps_rel_error"):
    """{t: value} of a record's probe (JSON keys back to ints)."""
    return {int(t): row[key] for t, row in record["probe"].items()}


def by_seed(records, **fixed):
    """{seed: {variant: record}} of the records (None skipped) whose fields equal `fixed` (e.g. spread=0.3)."""
    out = {}
    for r in records.values():
        if r is not None and all(r.get(f) == v for f, v in fixed.items()):
            out.setdefault(r["seed"], {})[r["variant"]] = r
    return dict(sorted(out.items()))


def ratio_per_t(records, variant, base, key="eps_rel_error", **fixed):
    """{t: [per-seed ratio variant/base]} over the seeds both have, for records keyed (variant, ..., seed)."""
    out = {}
    for got in by_seed(records, **fixed).values():
        if variant in got and base in got:
            a, b = per_t(got[variant], key), per_t(got[base], key)
            for t in a:
                out.setdefault(t, []).append(a[t] / b[t])
    return out


def late_geomean(ratios):
    """Per seed, the geometric mean over t >= LATE of {t: [per-seed ratios]}: a list over seeds."""
    late = [ts for t, ts in ratios.items() if t >= LATE]
    return [geomean(col) for col in zip(*late)] if late else []


#################################################################################
#                                   Toy                                         #
#################################################################################

def toy_rows(toy, spreads):
    """The toy's table: per spread, the LayerNorm/none ratio of the excess eps error (t >= 10 and t = 0), of
    the raw eps error, the samples' variance ratio per variant, and the all-zero task's sampled RMS ratio."""
    rows = []
    for S in spreads:
        excess = ratio_per_t(toy, "layer-norm", "none", "eps_excess_error", spread=S)
        raw = ratio_per_t(toy, "layer-norm", "none", "eps_rel_error", spread=S)
        if not excess:
            continue
        var = {v: [r["sample"]["var_ratio"] for r in toy.values() if r and r["spread"] == S and r["variant"] == v
                   and "var_ratio" in r["sample"]] for v in ("layer-norm", "none")}
        rms = [a["sample"]["rms"] / b["sample"]["rms"] for a, b in pairs_of(toy, S)] if S == 0 else []
        rows.append(f"| {S:g} | {len(late_geomean(excess))} | {fmt_spread(late_geomean(excess))} | "
                    f"{fmt_spread(excess[0])} | {fmt_spread(late_geomean(raw))} | "
                    + " | ".join(fmt_spread(var[v]) if var[v] else "-" for v in ("layer-norm", "none"))
                    + f" | {fmt_spread(rms) if rms else '-'} |")
    return rows


def pairs_of(toy, S):
    """(LayerNorm record, none record) per seed at spread S."""
    return [(g["layer-norm"], g["none"]) for g in by_seed(toy, spread=S).values() if len(g) == 2]


#################################################################################
#                                  Digits                                       #
#################################################################################

def digits_quality_rows(digits, variants):
    """Per variant: seeds, FD-digits and accuracy of the unedited samples, the blocks' max/median ratio, and
    the eps error's ratio to none (t >= 10 and t = 0) and the x0 error at t = 0 in 8-bit levels."""
    rows = []
    for v in variants:
        recs = [r for r in digits.values() if r and r["variant"] == v]
        if not recs:
            continue
        ratios = ratio_per_t(digits, v, "none")
        late = fmt_spread(late_geomean(ratios)) if ratios and v != "none" else "-"
        at0 = fmt_spread(ratios[0]) if ratios and v != "none" else "-"
        rows.append(f"| {DIGITS_LABELS[v]} | {len(recs)} | {fmt_spread(r['baseline']['sample']['fd_digits'] for r in recs)} | "
                    f"{fmt_spread(r['baseline']['sample']['accuracy'] for r in recs)} | "
                    f"{fmt_spread(r['max_median'] for r in recs)} | {late} | {at0} | "
                    f"{fmt_spread(per_t(r, 'x0_rmse_8bit')[0] for r in recs)} |")
    return rows


def per_t_rows(digits, toy, variants, spreads):
    """Per-timestep ratios to none: every digits variant, then the toy at every spread (excess eps error)."""
    rows = []
    for v in variants:
        ratios = ratio_per_t(digits, v, "none")
        if v != "none" and ratios:
            rows.append(f"| digits {DIGITS_LABELS[v]} | " + " | ".join(fmt_spread(ratios[t]) for t in REPORT_T) + " |")
    for S in spreads:
        ratios = ratio_per_t(toy, "layer-norm", "none", "eps_excess_error", spread=S)
        if ratios:
            rows.append(f"| toy LayerNorm, spread {S:g} | " + " | ".join(fmt_spread(ratios[t]) for t in REPORT_T) + " |")
    return rows


def edit_summary(record, place, edit, control=False):
    """(eps ratio geo-mean t >= 10, eps ratio at t = 0, samples' FD-digits ratio or None, accuracy or None) of
    one edit at one place of one digits record."""
    entry = record["places"].get(place)
    if entry is None or (control and "control" not in entry):
        return None
    e = (entry["control"] if control else entry)[edit]
    ratios = {int(t): r for t, r in e["ratio_per_t"].items()}
    late = geomean(r for t, r in ratios.items() if t >= LATE)
    sample = e.get("sample")
    return late, ratios[0], e.get("sample_ratio"), sample and sample.get("accuracy")


def sampled_places(records):
    """The places where samples were drawn under the edits in any of the records, in forward order (the one
    that moved most may differ between seeds)."""
    found = {p for r in records for p, entry in r["places"].items() if "sample_ratio" in entry.get("mean", {})}
    return [p for p in records[0]["places"] if p in found]


def edit_rows(digits, variant):
    """The edits of one variant's loudest channel (and the control channel) at the sampled places: spread over
    seeds of the eps ratios and of the samples' FD-digits ratio, and the accuracy under the edit."""
    recs = [r for r in digits.values() if r and r["variant"] == variant]
    if not recs:
        return []
    rows = []
    for place in sampled_places(recs):
        for control in (False, True):
            for edit in EDIT_NAMES:
                got = [s for s in (edit_summary(r, place, edit, control) for r in recs) if s]
                if not got:
                    continue
                fd = [g[2] for g in got if g[2] is not None]
                acc = [g[3] for g in got if g[3] is not None]
                name = f"{place} (control channel)" if control else place
                rows.append(f"| {name} | {edit} | {len(got)} | {fmt_spread(g[0] for g in got)} | "
                            f"{fmt_spread(g[1] for g in got)} | {len(fd)} | {fmt_spread(fd) if fd else '-'} | "
                            f"{fmt_spread(acc) if acc else '-'} |")
    return rows


#################################################################################
#                                  Figures                                      #
#################################################################################

def plain_log_y(ax):
    """A log y axis labelled 0.6, 1, 2, 3 rather than 6 x 10^-1: ratios read at a glance."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="both", labelsize=8)


def save(fig, path, **layout):
    """Lay out, write and close a figure; returns its path."""
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ratio_per_t(digits, toy, variants, spreads, path):
    """Per-timestep ratio to none: digits variants (left), the toy's excess eps error per spread (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))  # own y ranges: the digits' ratios sit within a few %
    for v in variants:
        ratios = ratio_per_t(digits, v, "none")
        if v == "none" or not ratios:
            continue
        ts = sorted(ratios)
        s = [spread(ratios[t]) for t in ts]
        x = [max(t, 0.5) for t in ts]
        c = DIGITS_COLORS.get(v, color(v))
        axes[0].plot(x, [p["mean"] for p in s], "o-", color=c, label=f"{DIGITS_LABELS[v]} ({plural(s[0]['n'], 'seed')})")
        axes[0].fill_between(x, [p["min"] for p in s], [p["max"] for p in s], color=c, alpha=0.2)
    cmap = plt.get_cmap("viridis")
    for i, S in enumerate(spreads):
        ratios = ratio_per_t(toy, "layer-norm", "none", "eps_excess_error", spread=S)
        if not ratios:
            continue
        ts = sorted(ratios)
        s = [spread(ratios[t]) for t in ts]
        x = [max(t, 0.5) for t in ts]
        c = cmap(i / max(len(spreads) - 1, 1))
        axes[1].plot(x, [p["mean"] for p in s], "o-", color=c, label=f"data std {S:g} ({plural(s[0]['n'], 'seed')})")
        axes[1].fill_between(x, [p["min"] for p in s], [p["max"] for p in s], color=c, alpha=0.2)
    for ax, title in zip(axes, ("digits: eps error / none's", "toy LayerNorm: excess eps error / none's")):
        ax.set_xscale("log")
        plain_log_y(ax)
        ax.axhline(1, color="0.5", lw=0.8)
        ax.set_xlabel("timestep t (t = 0 drawn at 0.5)")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("ratio (mean over seeds, band: min-max)")
    return save(fig, path)


def plot_gap_vs_spread(toy, digits, spreads, path, digits_std=None):
    """The toy's LayerNorm/none ratio (excess eps error, geo-mean over t >= 10 and at t = 0; raw eps error,
    t >= 10) against its data's spread, per seed and mean; the digits' raw ratio as a horizontal reference
    and their std (in the models' units) as a vertical one."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key_t, marker, label, key in (("late", "o", "excess eps, t >= 10 (geo-mean)", "eps_excess_error"),
                                      (0, "s", "excess eps, t = 0", "eps_excess_error"),
                                      ("late", "^", "raw eps, t >= 10 (geo-mean)", "eps_rel_error")):
        xs, means = [], []
        for S in spreads:
            ratios = ratio_per_t(toy, "layer-norm", "none", key, spread=S)
            if not ratios:
                continue
            vals = late_geomean(ratios) if key_t == "late" else ratios[0]
            x = max(S, 0.02)
            ax.scatter([x] * len(vals), vals, marker=marker, color="0.6", s=14)
            xs.append(x)
            means.append(spread(vals)["mean"])
        ax.plot(xs, means, marker + "-", label=f"toy, {label}")
    digits_late = late_geomean(ratio_per_t(digits, "layer-norm", "none"))
    if digits_late:
        ax.axhline(spread(digits_late)["mean"], color="tab:red", ls="--",
                   label=f"digits LayerNorm / none, raw eps, t >= 10 ({plural(len(digits_late), 'seed')})")
    if digits_std:
        ax.axvline(digits_std, color="tab:red", ls=":", label=f"the digits' std ({digits_std:.3g})")
    ax.axhline(1, color="0.5", lw=0.8)
    ax.set_xscale("log")
    plain_log_y(ax)
    ax.set_xlabel("toy data std S (S = 0 drawn at 0.02)")
    ax.set_ylabel("LayerNorm / none")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_edits(digits, variants, path):
    """Per variant, the edits of its loudest channel at the final norm's input: the probe's eps ratio
    (geo-mean t >= 10), beside the control channel's, and the samples' FD-digits ratio (only the loudest
    channel's edits are sampled): mean over seeds with a min-max bar, as the tables give them; one legend
    above both panels, so no bar hides under it."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), gridspec_kw=dict(width_ratios=[2, 1]))
    shown = [v for v in variants if any(r and r["variant"] == v for r in digits.values())]
    width = 0.8 / max(len(shown), 1)
    panels = [(axes[0], 0, (False, True), "probe eps error / unedited (t >= 10)"),
              (axes[1], 2, (False,), "samples' FD-digits / unedited")]
    for ax, k, controls, title in panels:
        labels = [f"{e} (control)" if control else e for control in controls for e in EDIT_NAMES]
        for i, v in enumerate(shown):
            recs = [r for r in digits.values() if r and r["variant"] == v]
            cells = []
            for control in controls:
                for edit in EDIT_NAMES:
                    got = [s[k] for s in (edit_summary(r, "final.norm", edit, control) for r in recs) if s and s[k]]
                    cells.append(spread(got) if got else dict(mean=math.nan, min=math.nan, max=math.nan))
            means = [c["mean"] for c in cells]
            bars = [[m - c["min"] for m, c in zip(means, cells)], [c["max"] - m for m, c in zip(means, cells)]]
            ax.bar([j + i * width for j in range(len(labels))], means, width, yerr=bars, capsize=2,
                   error_kw=dict(lw=0.8), color=DIGITS_COLORS.get(v, color(v)), label=DIGITS_LABELS[v])
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=30, ha="right", fontsize=8)
        plain_log_y(ax)
        ax.axhline(1, color="0.5", lw=0.8)
        ax.set_title(f"edits at the final norm's input:\n{title}", fontsize=9)
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    return save(fig, path, rect=(0, 0, 1, 0.93))


def tile(images, cols=5):
    """uint8 (N, H, W, 3) -> one (rows * H, cols * W, 3) image."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    canvas = np.full((rows * h, cols * w, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        canvas[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return canvas


def typical_record(records):
    """The record whose mean edit at the final norm moves FD-digits the median amount (the lower median of an
    even count; seeds break ties): the seed a grid of samples should show."""
    effect = lambda r: ((edit_summary(r, "final.norm", "mean") or (0, 0, None))[2] or 0, r["seed"])
    return sorted(records, key=effect)[(len(records) - 1) // 2]


def plot_edit_grid(records_dir, digits, variants, path):
    """Samples from the same noise and labels, unedited and with the loudest channel at the final norm's input
    set to its mean, its per-t mean and zero: one row per variant, from its typical seed (the median of its
    seeds by the mean edit's FD-digits ratio, so a row shows neither the luckiest nor the worst seed).
    Returns the path, or None when no record has a grid."""
    rows = []
    for v in variants:
        recs = [r for r in digits.values() if r and r["variant"] == v and r.get("grid")
                and os.path.isfile(os.path.join(records_dir, r["grid"]))]
        if not recs:
            continue
        typical = typical_record(recs)
        with np.load(os.path.join(records_dir, typical["grid"])) as f:
            rows.append((v, typical["seed"], {k: f[k] for k in GRID_COLUMNS if k in f}))
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), len(GRID_COLUMNS), figsize=(2.4 * len(GRID_COLUMNS), 2.2 * len(rows)),
                             squeeze=False)
    for i, (v, seed, grids) in enumerate(rows):
        for j, key in enumerate(GRID_COLUMNS):
            ax = axes[i][j]
            ax.axis("off")
            if key in grids:
                ax.imshow(tile(grids[key]))
            if i == 0:
                ax.set_title(key.replace("final.norm/", "final norm: ") + (" edit" if "/" in key else ""), fontsize=9)
        axes[i][0].text(-0.05, 0.5, f"{DIGITS_LABELS[v]}\nseed {seed}", transform=axes[i][0].transAxes,
                        ha="right", va="center", fontsize=9)
    return save(fig, path)


#################################################################################
#                                   Report                                      #
#################################################################################

def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def headline(parts, args):
    """The report's first sentences: the measured ratios in words, with seeds and steps."""
    toy, digits = parts.get("toy", {}), parts.get("digits", {})
    words = []
    d = late_geomean(ratio_per_t(digits, "layer-norm", "none"))
    if d:
        words.append(f"On digits ({args.steps} steps, {plural(len(d), 'seed')}), LayerNorm's eps error is "
                     f"{spread(d)['mean']:.2f}x none's at t >= {LATE} (range {min(d):.2f}-{max(d):.2f}).")
    gaps = [(S, late_geomean(ratio_per_t(toy, "layer-norm", "none", "eps_excess_error", spread=S)))
            for S in args.spreads]
    gaps = [(S, g) for S, g in gaps if g]
    if gaps:
        words.append(f"On the toy ({args.toy_steps} steps), LayerNorm's excess eps error is "
                     + ", ".join(f"{spread(g)['mean']:.2f}x none's at data std {S:g}" for S, g in gaps)
                     + f" ({seed_range([len(g) for _, g in gaps])} seeds per spread).")
    counts = [len(x) for x in [d, *(g for _, g in gaps)] if x]
    seeds = min(counts) if counts else 0
    if seeds and seeds < 3:
        words.append(f"Only {plural(seeds, 'seed')} per cell so far: too few to tell a gap from seed scatter.")
    return [" ".join(words) or "No runs are recorded yet.", ""]


def seed_range(counts):
    """'3' when every cell has 3 seeds, '2-3' when they differ."""
    low, high = min(counts), max(counts)
    return f"{low}" if low == high else f"{low}-{high}"


def evidence_lines(parts, args):
    """The numbers each explanation turns on, one bullet each: (a) the digits' per-timestep LayerNorm/none
    ratio against their FD-digits; (b) how the toy's gap moves from the all-zero task to the widest spread;
    (c) whether the digits LayerNorm model's loudest channel carries t (its per-t edit against its mean edit)."""
    toy, digits = parts.get("toy", {}), parts.get("digits", {})
    out = []
    ratios = ratio_per_t(digits, "layer-norm", "none")
    if ratios:
        worst = max(ratios, key=lambda t: spread(ratios[t])["mean"])
        fd = {v: [r["baseline"]["sample"]["fd_digits"] for r in digits.values() if r and r["variant"] == v]
              for v in ("layer-norm", "none")}
        at_zero = "" if worst == 0 else f"; at t = 0 {fmt_spread(ratios[0])}"
        out.append(f"- (a) Digits, LayerNorm / none eps error: largest at t = {worst}, {fmt_spread(ratios[worst])}"
                   f"{at_zero}. FD-digits: LayerNorm {fmt_spread(fd['layer-norm'])}, "
                   f"none {fmt_spread(fd['none']) if fd['none'] else '-'}.")
    gaps = [(S, late_geomean(ratio_per_t(toy, "layer-norm", "none", "eps_excess_error", spread=S)))
            for S in args.spreads]
    gaps = [(S, g) for S, g in gaps if g]
    if len(gaps) > 1:
        out.append(f"- (b) Toy, LayerNorm / none excess eps error (t >= {LATE}): "
                   + "; ".join(f"std {S:g}: {fmt_spread(g)}" for S, g in gaps) + ".")
    recs = [r for r in digits.values() if r and r["variant"] == "layer-norm" and "final.norm" in r["places"]]
    if recs:
        got = {e: [edit_summary(r, "final.norm", e) for r in recs] for e in EDIT_NAMES}
        out.append(f"- (c) Digits LayerNorm, its loudest channel at the final norm's input: eps error (t >= {LATE}) "
                   + ", ".join(f"x{fmt_spread(g[0] for g in got[e])} set to its {e}" if e != "zero" else
                               f"x{fmt_spread(g[0] for g in got[e])} zeroed" for e in EDIT_NAMES)
                   + "; FD-digits " + ", ".join(f"x{fmt_spread(g[2] for g in got[e])} ({e})" for e in EDIT_NAMES
                                                if all(g[2] for g in got[e])) + ".")
    return (["## The numbers each explanation turns on", "", *out, ""] if out else [])


def digits_std(args):
    """The std of the digits as the models see them (16 px, [-1, 1]) and around each pixel's mean; None
    without the digits folder."""
    if not os.path.isdir(args.digits_ref):
        return None
    x, _, _ = load_images(args.digits_ref, 16, 10_000, 0)
    return float(x.std()), float((x - x.mean(0)).std())


def digits_spread_line(stds):
    """For scale beside the toy's spreads: the digits' std in the models' units."""
    if stds is None:
        return []
    return [f"For scale: the digits in the models' units have std {stds[0]:.3g} ({stds[1]:.3g} around each "
            "pixel's mean).", ""]


def missing_lines(parts):
    """One line naming the runs the study has not recorded yet (a study cut short reports what it has)."""
    missing = [f"toy {v} std {S:g} seed {s}" for (v, S, s), r in parts.get("toy", {}).items() if r is None]
    missing += [f"digits {v} seed {s}" for (v, s), r in parts.get("digits", {}).items() if r is None]
    if not missing:
        return []
    return [f"Not recorded yet ({len(missing)}), so not in the tables: {', '.join(missing)}.", ""]


def write_report(args, parts):
    """<out>/summary.md, summary.json and the figures (and --record PAGE, its figures in docs/figures/)."""
    os.makedirs(args.out, exist_ok=True)
    toy, digits = parts.get("toy", {}), parts.get("digits", {})
    variants = list(args.variants)
    head_t = " | ".join(f"t={t}" for t in REPORT_T)
    lines = ["# The bridge study: why the toy's LayerNorm cost does not reach digit images", "", provenance(), "",
             *headline(parts, args),
             f"Run: digits {', '.join(variants)} at lr {args.lr:g}, {args.steps} steps (cosine), seeds "
             f"{' '.join(map(str, args.seeds))}; toy LayerNorm and none at data std "
             f"{', '.join(f'{S:g}' for S in args.spreads)}, {args.toy_steps} steps, the same seeds. Cells: mean "
             "[min, max] over seeds; ratios are paired by seed.", "", *missing_lines(parts),
             *evidence_lines(parts, args)]
    drawn = {}
    if digits or toy:
        plot_ratio_per_t(digits, toy, variants, args.spreads, os.path.join(args.out, "ratio_per_t.png"))
        drawn["ratio_per_t.png"] = FIGURES["ratio_per_t.png"]
        lines += ["## Per timestep: each variant's error over none's", "",
                  "Digits: the probe's eps error on 256 fixed digits and fixed noise (EMA weights). Toy: the excess "
                  "eps error over the Gaussian optimum (at std 0 that is the raw error).", "",
                  "![per-timestep ratios](ratio_per_t.png)", "",
                  f"| model | {head_t} |", "|---|" + "---|" * len(REPORT_T),
                  *per_t_rows(digits, toy, variants, args.spreads), ""]
    if toy:
        stds = digits_std(args)
        plot_gap_vs_spread(toy, digits, args.spreads, os.path.join(args.out, "gap_vs_spread.png"),
                           stds[0] if stds else None)
        drawn["gap_vs_spread.png"] = FIGURES["gap_vs_spread.png"]
        lines += ["## The toy's gap against its data's spread", "", *digits_spread_line(stds),
                  "LayerNorm / none of the excess eps error (geo-mean t >= 10, and t = 0), of the raw eps error, the "
                  "samples' variance over the data's per variant, and at std 0 the sampled RMS ratio.", "",
                  "![gap vs spread](gap_vs_spread.png)", "",
                  "| data std | seeds | excess eps, t >= 10 | excess eps, t = 0 | raw eps, t >= 10 | variance ratio, "
                  "LayerNorm | variance ratio, none | sampled RMS (std 0) |", "|---:|---:|---|---|---|---|---|---|",
                  *toy_rows(toy, args.spreads), ""]
    if digits:
        plot_edits(digits, variants, os.path.join(args.out, "edits.png"))
        drawn["edits.png"] = FIGURES["edits.png"]
        lines += ["## Digits: quality, outliers and precision", "",
                  f"FD-digits and accuracy of {args.num_samples} unguided samples ({args.sampling_steps} DDPM steps); "
                  "max/median: the blocks' largest channel-RMS ratio; eps and x0 errors from the probe.", "",
                  "| variant | seeds | FD-digits | accuracy | max/median | eps / none, t >= 10 | eps / none, t = 0 | "
                  "x0 error at t = 0 (8-bit levels) |", "|---|---:|---|---|---|---|---|---|",
                  *digits_quality_rows(digits, variants), "",
                  "## Digits: what the loudest channel carries", "",
                  "The loudest channel at each place replaced by its mean, its per-timestep mean, or zero; the control "
                  "is a channel of median size at the same place. Samples are drawn under the edits at the final "
                  "norm's input and at the place whose edits move the probe most.", "",
                  "![edits at the final norm](edits.png)", ""]
        if plot_edit_grid(args.records, digits, variants, os.path.join(args.out, "edit_grid.png")):
            drawn["edit_grid.png"] = FIGURES["edit_grid.png"]
            lines += ["Samples from the same noise and labels, unedited and under each edit at the final norm's input; "
                      "each variant's typical seed (the median by the mean edit's FD-digits):",
                      "", "![samples under the edits](edit_grid.png)", ""]
        for v in variants:
            rows = edit_rows(digits, v)
            if rows:
                lines += [f"### {DIGITS_LABELS[v]}", "", "| place | edit | seeds | eps / unedited, t >= 10 | eps / "
                          "unedited, t = 0 | sampled seeds | FD-digits / unedited | accuracy |",
                          "|---|---|---:|---|---|---:|---|---|", *rows, ""]
    text = "\n".join(lines)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(args.out, "summary.json"), dict(
        toy={f"{k[0]} std{k[1]:g} s{k[2]}": r for k, r in toy.items() if r},
        digits={f"{k[0]} s{k[1]}": r for k, r in digits.items() if r}))
    if args.record:
        write_page(args.record, text, args.out, drawn)
    print(f"[bridge] wrote {os.path.join(args.out, 'summary.md')}", flush=True)
    return dict(toy=toy, digits=digits)
