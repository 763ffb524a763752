"""The digits study's length check (`python study.py digits --lengths ...`): is a run of a given length
trained? The same variant and seed at L and 2L steps, each annealed to its own end and scored the same way;
L is long enough when 2L is not measurably better. Reads only the studies' records."""

import glob
import json
import os
import statistics

import matplotlib.pyplot as plt
import numpy as np

from ditlab.errors import InputError
from ditlab.files import provenance, write_page
from ditlab.studies.digits_runs import run_key
from ditlab.studies.variants import DIGITS_VARIANTS as VARIANTS
from ditlab.studies.variants import color as variant_color


# Point 2 of the study: a training length at which quality has stopped improving. Under a decaying lr a
# run's own curve always flattens at its end (the lr is near zero there), so flattening is read across
# lengths instead: the same variant and seed trained to L and to 2L, each annealed to its own end, and
# scored the same way. L is long enough when 2L is not measurably better.

def length_records(folders):
    """{(variant, seed): {steps: record}} of the final runs recorded in `folders` (each the study at one
    --steps). A variant may train at another lr (or --grad-clip) at another length, where its own lr no
    longer trains stably: the rows say so. A folder without final records, or two folders at the same
    length, are refused."""
    found = {}
    for folder in folders:
        paths = sorted(glob.glob(os.path.join(folder, "final-*.json")))
        if not paths:
            raise InputError(f"--lengths {folder}: no final-*.json records there (a study's --records folder)")
        for path in paths:
            with open(path) as f:
                record = json.load(f)
            if record.get("diverged"):  # no model to compare (its variant trained at a lower lr: final_lrs)
                continue
            steps = record["settings"]["steps"]
            runs = found.setdefault((record["variant"], record["seed"]), {})
            if steps in runs:
                raise InputError(f"--lengths: {path} and {runs[steps]['path']} are both {record['variant']} seed "
                                 f"{record['seed']} at {steps} steps; pass one folder per length")
            noise = os.path.join(folder, f"noise-{run_key(record['variant'], record['lr'], record['seed'])}.json")
            sets = {0: record["unguided"]}
            if os.path.isfile(noise):
                with open(noise) as f:
                    sets.update({int(k): m for k, m in json.load(f)["sets"].items()})
            runs[steps] = {**record, "path": path, "sets": sets}
    return found


def recipe(record):
    """A final record's lr, with its gradient clipping where it had one: "0.004", "0.002 clip 1"."""
    clip = record["settings"].get("grad_clip")
    return f"{record['lr']:g}" + (f" clip {clip:g}" if clip else "")


def length_change(a, b):
    """From run a to run b (the same variant and seed at two lengths): the relative change of unguided
    FD-digits and the change of accuracy, each of the means over the sample seeds both have (a paired
    comparison: one sample seed draws the same labels and noise for every model), and how many seeds."""
    seeds = sorted(set(a["sets"]) & set(b["sets"]))
    mean = lambda r, key: statistics.fmean(r["sets"][k][key] for k in seeds)  # noqa: E731
    return dict(fd=mean(b, "fd_digits") / mean(a, "fd_digits") - 1, accuracy=mean(b, "accuracy") - mean(a, "accuracy"),
                sets=len(seeds))


def length_verdict(runs, tolerance, accuracy_tolerance):
    """The shortest length whose doubling (the next recorded length) lowers unguided FD-digits by less than
    `tolerance` of its value and raises accuracy by less than `accuracy_tolerance`, both as means over the
    sample sets the two lengths share: (length, the changes to the next length), or (None, the last
    changes) while every recorded length still improves."""
    lengths = sorted(runs)
    changes = None
    for a, b in zip(lengths, lengths[1:]):
        changes = dict(to=b, **length_change(runs[a], runs[b]))
        if changes["fd"] > -tolerance and changes["accuracy"] < accuracy_tolerance:
            return a, changes
    return None, changes


def variant_order(key):
    """Sort key of (variant, seed): the variants in VARIANTS order, then the seed."""
    return (VARIANTS.index(key[0]) if key[0] in VARIANTS else len(VARIANTS), key)


def compared(found):
    """The runs of length_records recorded at two or more lengths (the ones a length check compares)."""
    return {k: runs for k, runs in found.items() if len(runs) > 1}


def length_lines(found, args):
    """The length check's page: every run at every length, the change from the length before, and the
    verdict per run and for the study."""
    lines = ["# The digits study: how long is trained?", "", provenance(), "",
             f"Run: the final runs recorded in {', '.join(f'`{f}`' for f in args.lengths)}, one run per variant, seed "
             "and length, 1,000 EMA samples per set; a length is trained when the next lowers unguided FD-digits by "
             f"less than {args.converged_within:.0%} and raises accuracy by less than {args.accuracy_within:g}.", "",
             "| variant | lr | seed | steps | FD-digits unguided | sample sets | change | accuracy | recall | "
             "FD-digits guided (scale) | nearest-digit ratio | near-copies | max/median |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = {}
    for (v, s), runs in sorted(compared(found).items(), key=lambda kv: variant_order(kv[0])):
        before = None
        for steps in sorted(runs):
            r = runs[steps]
            g, fds = r["guided"], [m["fd_digits"] for m in r["sets"].values()]
            mean = lambda key: statistics.fmean(m[key] for m in r["sets"].values())  # noqa: E731
            if before:
                ch = length_change(before, r)
                change = f"{ch['fd']:+.0%}" + (f" ({ch['sets']} paired)" if ch["sets"] > 1 else "")
            else:
                change = "-"
            sets = " ".join(f"{x:.3g}" for x in fds) if len(fds) > 1 else "1"
            lines.append(f"| {v} | {recipe(r)} | {s} | {steps} | {statistics.fmean(fds):.3g} | {sets} | {change} | "
                         f"{mean('accuracy'):.3g} | {mean('recall'):.3g} | {g['fd_digits']:.3g} ({r['cfg_scale']:g}) | "
                         f"{g['memorisation']['ratio']:.2f} | {g['memorisation']['near_copies']:.1%} | "
                         f"{r['outliers']['max_median_ratio']:.3g} |")
            before = r
        verdicts[(v, s)] = length_verdict(runs, args.converged_within, args.accuracy_within), runs
    single = len(found) - len(verdicts)
    lines += [""] + ([f"{single} more run(s) are recorded at one length only and not compared.", ""] if single else [])
    lines += ["Unguided columns: the mean over the model's sample sets; change: paired over the sample seeds both "
              "lengths have; guided and the rest: sample seed 0. Definitions: "
              "docs/digits.md#how-the-tables-are-measured.", "", "## Verdict", ""]
    for (v, s), ((length, ch), runs) in verdicts.items():
        paired = f", mean of {ch['sets']} paired sample sets" if ch["sets"] > 1 else ""
        recipes = [recipe(runs[steps]) for steps in sorted(runs)]
        lrs = f", lr {' -> '.join(recipes)}" if len(set(recipes)) > 1 else ""
        step = f"to {ch['to']} steps{paired}{lrs}: FD-digits {ch['fd']:+.0%}, accuracy {ch['accuracy']:+.3f}"
        lines.append(f"- {v} seed {s}: " + (f"trained at {length} steps ({step})" if length else
                                            f"still improving at its longest length ({step})"))
    reached = [length for (length, _), _ in verdicts.values()]
    if all(reached):
        lines.append(f"- **Every run compared is trained at {max(reached)} steps**: the study's length.")
    else:
        lines.append(f"- **Not every run has stopped improving** ({sum(1 for x in reached if not x)} of {len(reached)} "
                     "still improve at their longest length): a longer length is needed.")
    return lines + ["", "![quality against training step at every length](lengths.png)", ""]


def plot_lengths(found, path):
    """FD-digits (curve samples) and accuracy over training, one line per length; one row per variant and
    a pair of panels (FD-digits, accuracy) per seed, so that 15 runs stay readable; the 1,000-sample
    unguided FD-digits at each run's end as a cross."""
    found = compared(found)
    variants = list(dict.fromkeys(key[0] for key in sorted(found, key=variant_order)))
    seeds = sorted({key[1] for key in found})
    fig, axes = plt.subplots(len(variants), 2 * len(seeds), figsize=(3.6 * 2 * len(seeds), 3.0 * len(variants)),
                             squeeze=False)
    for row, variant in enumerate(variants):
        for j, seed in enumerate(seeds):
            ax_fd, ax_acc = axes[row][2 * j], axes[row][2 * j + 1]
            if (variant, seed) not in found:
                ax_fd.axis("off")
                ax_acc.axis("off")
                continue
            runs = found[(variant, seed)]
            for i, steps in enumerate(sorted(runs)):
                r, color = runs[steps], plt.cm.viridis(i / max(1, len(runs) - 1) * 0.85)
                pts = np.array(r["curve"])
                ax_fd.plot(pts[:, 0], pts[:, 1], marker="o", ms=2, color=color, label=f"{steps} steps")
                ax_fd.plot([steps], [r["unguided"]["fd_digits"]], marker="x", ms=7, mew=2, color=color)
                ax_acc.plot(pts[:, 0], pts[:, 2], marker="o", ms=2, color=color)
            ax_fd.set_yscale("log")
            lrs = " / ".join(dict.fromkeys(recipe(runs[steps]) for steps in sorted(runs)))
            ax_fd.set_title(f"{variant} seed {seed}: FD-digits (lr {lrs})", fontsize=8, color=variant_color(variant))
            ax_acc.set_title(f"{variant} seed {seed}: accuracy", fontsize=8, color=variant_color(variant))
            ax_acc.set_ylim(0, 1.02)
            ax_fd.legend(fontsize=6)
            if row == len(variants) - 1:
                ax_fd.set_xlabel("training step")
                ax_acc.set_xlabel("training step")
    fig.suptitle("FD-digits (line: 500 curve samples; x: 1,000 samples at the run's end) and accuracy on the "
                 "intended labels, one line per training length", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_lengths_report(args):
    """The length check (--lengths): <out>/lengths.md and lengths.png, and with --record PAGE the page and
    its figure (docs/figures/<page>.png: digits_lengths.png). Returns the page's text."""
    found = length_records(args.lengths)
    if not compared(found):
        raise InputError(f"--lengths {' '.join(args.lengths)}: no variant and seed is recorded at two lengths there; "
                         "pass the --records folders of the same runs trained to different --steps")
    os.makedirs(args.out, exist_ok=True)
    plot_lengths(found, os.path.join(args.out, "lengths.png"))
    text = "\n".join(length_lines(found, args))
    with open(os.path.join(args.out, "lengths.md"), "w") as f:
        f.write(text)
    if args.record:
        prefix = os.path.splitext(os.path.basename(args.record))[0]
        write_page(args.record, text, args.out, {"lengths.png": f"{prefix}.png"})
    print(text)
    return text
