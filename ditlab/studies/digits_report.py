"""The digits study's report: the tables of summary.md (the lr sweep, the final runs' scores, the sampling
noise, paired gaps at matched labels), its figures, and the real-digit floor every score is set against."""

import math
import os
import statistics

import matplotlib.pyplot as plt
import numpy as np

from ditlab.evaluation import Evaluator
from ditlab.features import real_digits
from ditlab.files import write_json, write_page
from ditlab.sampling import image_generators, image_labels
from ditlab.studies.digits_runs import QUALITY, run_key
from ditlab.studies.stats import spread
from ditlab.studies.variants import color


def settings_of(args):
    keys = ("variants", "seeds", "lrs", "sweep_steps", "steps", "lr_schedule", "grad_clip", "stop_loss_ratio", "fid_every",
            "final_fid_every",
            "curve_samples", "curve_sampling_steps", "samples", "sampling_steps", "cfg_candidates", "cfg_samples",
            "noise_seeds")
    return {k: getattr(args, k) for k in keys}


def real_floor(args, sample_seed=None):
    """Real digits (features.real_digits, --samples of them) scored against the same reference: balanced
    classes, or with sample_seed the class counts of the sets sample_ddp.py draws at that --global-seed
    (set_labels), the floor a perfect model sampled at those labels reaches."""
    counts = None if sample_seed is None else np.bincount(set_labels(args.samples, sample_seed), minlength=10)
    images, labels = real_digits(args.samples, 0, counts)
    evaluator = Evaluator(args.digits_ref, features="digits", digits_classifier=args.digits_classifier, device="cpu",
                          progress=False)
    return {k: float(v) for k, v in evaluator(images, labels).items() if k in QUALITY}


def set_labels(num, sample_seed):
    """The class labels of a set of `num` digits sample_ddp.py draws at --global-seed `sample_seed`: at
    random, as the reference DiT and ADM's samplers draw them, so every set of one seed has the same labels
    (whatever the model) and their counts are uneven (81 to 123 per class for seed 0 at 1,000)."""
    return np.asarray(image_labels(image_generators(sample_seed, range(num)), 10))


def final_table(summary, variants):
    """Per variant: each metric of both sample sets, memorisation, outliers and training speed, mean/min/max
    over seeds."""
    table = {}
    for v in variants:
        runs = [r for r in summary["runs"].values() if r["variant"] == v]
        if not runs:  # not yet measured
            continue
        row = dict(lr=runs[0]["lr"], seeds=[r["seed"] for r in runs])
        for name in ("unguided", "guided"):
            row[name] = {k: spread([r[name][k] for r in runs]) for k in QUALITY}
            row[name]["near_copies"] = spread([r[name]["memorisation"]["near_copies"] for r in runs])
            row[name]["nn_ratio"] = spread([r[name]["memorisation"]["ratio"] for r in runs])
        for k in ("max_median_ratio", "rms_kurtosis", "max_abs"):
            row[k] = spread([r["outliers"][k] for r in runs])
        row["steps_per_s"] = spread([r["steps_per_s"] for r in runs])
        last = [r["curve"][-1] for r in runs]
        quarter = [max(c for c in r["curve"] if c[0] <= 0.75 * r["curve"][-1][0]) for r in runs]
        row["last_quarter_fd_change"] = spread([(a[1] - b[1]) / b[1] for a, b in zip(last, quarter)])
        table[v] = row
    return table


def sweep_fd(args, record):
    """FD-digits of a sweep run at --sweep-steps; infinite for a run that diverged."""
    if record.get("diverged"):
        return math.inf
    return [c[1] for c in record["curve"] if c[0] == args.sweep_steps][0]


#################################################################################
#                                    Report                                     #
#################################################################################

DEFINITIONS = "Definitions: docs/digits.md#how-the-tables-are-measured."


def fmt(d, digits=3):
    return f"{d['mean']:.{digits}g} [{d['min']:.{digits}g}, {d['max']:.{digits}g}]"


def run_line(summary, args):
    """The page's one line on what was run: variants, the sweep's lrs, seeds, steps and sample counts."""
    lrs = ", ".join(f"{lr:g}" for lr in args.lrs)
    line = (f"Run: variants {', '.join(args.variants)}; lr sweep {lrs} at seed 0, {args.sweep_steps} steps; curves of "
            f"{args.curve_samples} samples ({args.curve_sampling_steps} DDPM steps)")
    if "missing" in summary:  # the final runs were asked for (not --sweep-only)
        line += (f"; final runs at seeds {' '.join(map(str, args.seeds))}, {args.steps} steps ({args.lr_schedule} lr), "
                 f"{args.samples} samples per set ({args.sampling_steps} DDPM steps)")
    if "cfg_scale" in summary:
        line += f", guided at scale {summary['cfg_scale']:g}"
    return line + "."


def sweep_lines(summary, args):
    lines = ["## 1. Learning rate per variant (seed 0)", "",
             f"Unguided FD-digits at step {args.sweep_steps}; bold: the lowest, the variant's lr for the final runs; "
             f"diverged: the loss became non-finite. {DEFINITIONS}", "",
             "| variant | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |",
             "|---|" + "---:|" * len(args.lrs)]
    for v in args.variants:
        cells = []
        for lr in args.lrs:
            record = summary["sweep"][run_key(v, lr, 0)]
            fd = "diverged" if record.get("diverged") else f"{sweep_fd(args, record):.3g}"
            cells.append(f"**{fd}**" if lr == summary["best_lr"][v] else fd)
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines + ["", "![lr sweep](lr_sweep.png)", ""]


def classifier_lines(classifiers):
    """A warning when the floor and the runs were not all scored with one digits classifier (a classifier
    trained on another CPU is another classifier: FD-digits moves by 1-3%)."""
    floor = classifiers.get("floor")
    others = {}
    for run, scorer in classifiers.items():
        if run != "floor" and scorer != floor:
            others.setdefault(scorer, []).append(run)
    if not others:
        return []
    parts = [f"{', '.join(runs)} with {scorer or 'one not recorded'}" for scorer, runs in others.items()]
    return [f"**Not all scored with one digits classifier** (another moves FD-digits by 1-3%): the floor and the "
            f"other runs with {floor}; " + "; ".join(parts) + ".", ""]


def final_lines(summary, args):
    table, floor = summary["table"], summary["floor"]
    lines = [f"## 2. Trained models: {args.steps} steps ({args.lr_schedule} lr), seeds {args.seeds}", ""]
    if summary["missing"]:
        lines += [f"**Not yet measured** ({len(summary['missing'])} of {len(args.variants) * len(args.seeds)} final "
                  f"runs; the seeds column says which are in): {', '.join(summary['missing'])}.", ""]
    lines += classifier_lines(summary.get("classifiers") or {})
    if summary.get("stepped_down"):
        lines += ["**Trained below the sweep's best lr** (a final run diverged there; every seed steps down): "
                  + "; ".join(f"{v} at {summary['final_lr'][v]:g} ({', '.join(why)})"
                              for v, why in summary["stepped_down"].items()) + ".", ""]
    if summary["cfg_candidates"]:
        cands = ", ".join(f"{g}: {fd:.3g}" for g, fd in summary["cfg_candidates"].items())
        lines += [f"Guidance scale chosen on {'layer-norm' if 'layer-norm' in args.variants else args.variants[0]} "
                  f"seed {args.seeds[0]} by FD-digits of {args.cfg_samples} samples ({cands}).", ""]
    for name in ("unguided", "guided"):
        lines += [f"### {name.capitalize()}", "",
                  f"Mean [min, max] over seeds; real digits: the floor a perfect model reaches. {DEFINITIONS}", "",
                  "| variant | lr | seeds | FD-digits | precision | recall | accuracy |",
                  "|---|---:|---|---|---|---|---|"]
        for v, row in table.items():
            q = row[name]
            lines.append(f"| {v} | {row['lr']:g} | {' '.join(map(str, row['seeds']))} | {fmt(q['fd_digits'])} | "
                         f"{fmt(q['precision'])} | {fmt(q['recall'])} | {fmt(q['accuracy'])} |")
        floors = [("real digits, balanced", floor)]
        if "0" in summary.get("floor_at_labels", {}):  # summaries written before it was measured lack it
            floors.append(("real digits, the sets' labels", summary["floor_at_labels"]["0"]))
        lines += [f"| {name} | - | - | {f['fd_digits']:.3g} | {f['precision']:.3g} | {f['recall']:.3g} | "
                  f"{f['accuracy']:.3g} |" for name, f in floors] + [""]
    lines += ["### Converged? Memorisation? Outliers?", "",
              "Last-quarter FD change below 0: still improving; fresh digits score a nearest-digit ratio of 1 and 5% "
              f"near-copies. {DEFINITIONS}", "",
              "| variant | last-quarter FD change | nearest-digit ratio | near-copies | max/median | RMS kurtosis |",
              "|---|---|---|---|---|---|"]
    for v, row in table.items():
        lines.append(f"| {v} | {fmt(row['last_quarter_fd_change'], 2)} | {fmt(row['guided']['nn_ratio'], 2)} | "
                     f"{fmt(row['guided']['near_copies'], 2)} | {fmt(row['max_median_ratio'])} | "
                     f"{fmt(row['rms_kurtosis'])} |")
    return lines + noise_lines(summary) + ["", "![quality over training](curves.png)", "",
                                           "![guided samples](grid.png)", ""]


def noise_lines(summary):
    """The sampling-noise section: every model's unguided FD-digits over its sample sets; per variant the
    spread within one model against the spread between training seeds, both raw and as the excess over the
    real digits at the set's labels (sets of different seeds have different labels, which alone moves
    FD-digits); and each variant minus layer-norm at the same sample seeds (same labels: the label effect
    cancels), the comparison the noise allows."""
    noise = summary.get("noise") or {}
    if not noise:
        return []
    seeds = sorted({int(k) for sets in noise.values() for k in sets})
    floors = {int(k): f["fd_digits"] for k, f in (summary.get("floor_at_labels") or {}).items()}
    by_variant = {}
    for v in summary["table"]:
        runs = {key: sets for key, sets in noise.items() if key.rsplit(" s", 1)[0] == v}
        if runs:
            by_variant[v] = {key: {int(k): m["fd_digits"] for k, m in sets.items()} for key, sets in runs.items()}
    have_floors = all(k in floors for sets in by_variant.values() for fds in sets.values() for k in fds)
    caption = (f"Unguided FD-digits at sample seeds {', '.join(map(str, seeds))} (seed 0: the sets above), "
               f"{summary['settings']['samples']} samples each")
    if have_floors:
        caption += "; real digits at each seed's labels: " + ", ".join(f"{floors[k]:.3g} (seed {k})" for k in seeds)
    lines = ["", "### Sampling noise: one model, several sample sets", "", f"{caption}. {DEFINITIONS}"]
    header = "| variant | FD-digits, mean of sets | within one model | between seeds |"
    rule = "|---|---|---:|---:|"
    if have_floors:
        header += " excess, mean | excess within | excess between |"
        rule += "---|---:|---:|"
    lines += ["", header + " minus layer-norm | per model: sets (mean) |", rule + "---|---|"]
    base = by_variant.get("layer-norm")
    for v, runs in by_variant.items():
        row = [v, *spread_cells(runs)]
        if have_floors:
            row += spread_cells({key: {k: fd - floors[k] for k, fd in fds.items()} for key, fds in runs.items()})
        paired = paired_gaps(runs, base) if base and v != "layer-norm" else []  # needs no floor: same labels
        row.append(fmt(spread(paired)) if paired else "-")
        row.append("; ".join(f"s{key.rsplit(' s', 1)[1]}: {' '.join(f'{x:.3g}' for _, x in sorted(fds.items()))} "
                             f"({statistics.fmean(fds.values()):.3g})" for key, fds in runs.items()))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def spread_cells(runs):
    """(mean of sets as mean [min, max] over models, within-model range, between-model range) of
    {model: {sample seed: value}}, formatted."""
    means = [statistics.fmean(x.values()) for x in runs.values()]
    within = statistics.fmean(max(x.values()) - min(x.values()) for x in runs.values())
    return [fmt(spread(means)), f"{within:.3g}", f"{max(means) - min(means):.3g}"]


def paired_gaps(runs, base):
    """Per sample seed that every model of both variants was drawn at: the mean over `runs`' models minus
    the mean over `base`'s ({model: {sample seed: FD}} each); [] when no seed is shared by all."""
    shared = set.intersection(*(set(x) for x in [*runs.values(), *base.values()]))
    return [statistics.fmean(x[k] for x in runs.values()) - statistics.fmean(x[k] for x in base.values())
            for k in sorted(shared)]


def result_line(summary, args):
    """The page's first sentence, its result in words: each trained variant's unguided FD-digits, lowest
    first: the mean over seeds of each model's mean over its sample sets (its set at sample seed 0, and those
    drawn again at other sample seeds); [] before any final run is recorded."""
    table, noise = summary.get("table") or {}, summary.get("noise") or {}
    if not table:
        return []
    counts = {}

    def fd(variant):
        per_model = []
        for seed in table[variant]["seeds"]:
            key = f"{variant} s{seed}"
            sets = noise.get(key) or {"0": summary["runs"][key]["unguided"]}
            counts[key] = len(sets)
            per_model.append(statistics.fmean(m["fd_digits"] for m in sets.values()))
        return statistics.fmean(per_model)

    ranked = sorted(table, key=fd)
    low, high = min(counts.values()), max(counts.values())
    sets = f"{low}" if low == high else f"{low} to {high}"
    seeds = sorted({s for v in ranked for s in table[v]["seeds"]})
    return [f"At {args.steps:,} steps, seeds {' '.join(map(str, seeds))}: unguided FD-digits (lower is better; mean "
            f"over seeds of each model's {sets} sample sets), lowest first: "
            + ", ".join(f"{v} {fd(v):.3g}" for v in ranked) + ".", ""]


def write_report(args, summary):
    """summary.md, summary.json and the figures in --out; with --record PAGE, the page and its figures in
    the page's ../figures/ named after it (docs/results/digits.md: docs/figures/digits_curves.png, ...; another
    page, such as a length check's, keeps the main study's figures)."""
    os.makedirs(args.out, exist_ok=True)
    plot_sweep(summary, args, os.path.join(args.out, "lr_sweep.png"))
    lines = ["# The digits study: normalization variants on trained digit models", "", summary["provenance"], "",
             *result_line(summary, args), run_line(summary, args), "", *sweep_lines(summary, args)]
    if "table" not in summary and summary.get("missing"):
        lines += ["## 2. Trained models", "", f"No final run recorded yet ({len(summary['missing'])} to measure).", ""]
    if "table" in summary:
        plot_curves(summary, args, os.path.join(args.out, "curves.png"))
        plot_grid(summary, args, os.path.join(args.out, "grid.png"))
        lines += final_lines(summary, args)
    text = "\n".join(lines)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(args.out, "summary.json"), summary)
    if args.record:
        prefix = os.path.splitext(os.path.basename(args.record))[0]
        write_page(args.record, text, args.out, {f"{n}.png": f"{prefix}_{n}.png" for n in ("lr_sweep", "curves", "grid")})
    print(text)
    return summary


def plot_sweep(summary, args, path):
    """FD-digits over training for every lr, one panel per variant (seed 0)."""
    fig, axes = plt.subplots(1, len(args.variants), figsize=(3.2 * len(args.variants), 3.2), sharey=True, squeeze=False)
    for ax, v in zip(axes[0], args.variants):
        for lr in args.lrs:
            record = summary["sweep"][run_key(v, lr, 0)]
            pts = record["curve"]
            style = dict(lw=2.2) if lr == summary["best_lr"][v] else dict(lw=1, alpha=0.7)
            label = f"lr {lr:g}" + (" (diverged)" if record.get("diverged") else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label, **style)
        ax.set_yscale("log")
        ax.set_title(v, fontsize=9, color=color(v))
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("FD-digits (unguided)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(summary, args, path):
    """FD-digits and accuracy over training: per variant the mean over seeds (line) and the range (band)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for v in summary["table"]:
        curves = [r["curve"] for r in summary["runs"].values() if r["variant"] == v]
        steps = sorted(set.intersection(*[{c[0] for c in cur} for cur in curves]))
        for ax, k in zip(axes, (1, 2)):
            vals = np.array([[dict((c[0], c[k]) for c in cur)[s] for s in steps] for cur in curves])
            ax.plot(steps, vals.mean(0), color=color(v), label=v)
            ax.fill_between(steps, vals.min(0), vals.max(0), color=color(v), alpha=0.2)
    floor = summary["floor"]
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"FD-digits ({args.curve_samples} unguided samples)")
    axes[1].set_ylabel("accuracy on the intended labels")
    axes[1].axhline(floor["accuracy"], color="0.4", ls="--", lw=1, label="real digits")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tile_by_class(images, labels, per_class, gap=2, fill=96):
    """The first `per_class` images of each digit 0-9 (N, H, W, C uint8) as one uint8 picture: a column per
    digit, a row per pick, `gap` pixels of grey `fill` around every cell (so neighbouring digits read as
    separate images, and a missing pick as an empty cell, not as a black digit)."""
    _, h, w, c = images.shape
    canvas = np.full((gap + per_class * (h + gap), gap + 10 * (w + gap), c), fill, np.uint8)
    for digit in range(10):
        for row, image in enumerate(images[labels == digit][:per_class]):
            y, x = gap + row * (h + gap), gap + digit * (w + gap)
            canvas[y:y + h, x:x + w] = image
    return canvas


def plot_grid(summary, args, path, per_class=4):
    """Guided samples of each variant's first seed: one panel per variant, a column per digit."""
    variants = list(summary["table"])
    fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 0.8 + 0.36 * per_class),
                             squeeze=False)
    for ax, v in zip(axes[0], variants):
        entry = min((r for r in summary["runs"].values() if r["variant"] == v), key=lambda r: r["seed"])
        with np.load(os.path.join(args.records, f"final-{run_key(v, entry['lr'], entry['seed'])}.grid.npz")) as f:
            images, labels = f["images"], f["labels"]
        ax.imshow(tile_by_class(images, labels, per_class), interpolation="nearest")
        ax.set_title(f"{v} (lr {entry['lr']:g}, seed {entry['seed']})", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"Guided samples (scale {summary['cfg_scale']:g}), first seed, one column per digit", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
