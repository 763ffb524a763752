"""The normalization ablation on the toy (`python study.py ablation`, `make ablation`): train_toy.py for every
variant and seed (the same CPU preset and seeds as `make toy`), and the sample errors at the last evaluated step.

Writes to --out (results/ablation/): summary.md (the table), summary.json and toy_errors.png (toy error
against training step per variant). A finished run is reused by a rerun; any flag not listed here goes
to train_toy.py. The same question on images, trained to convergence with a learning rate per variant,
is the digits study (`python study.py digits`, `make digits`).

    python study.py ablation                                   # all variants, seed 0
    python study.py ablation --variants layer-norm dyt --seeds 0 1 2
"""

import json
import os
import time

import matplotlib.pyplot as plt

from ditlab.cli import INDEX
from ditlab.files import provenance
from ditlab.studies.runner import study_parser, dispatch_of
from ditlab.studies.stats import spread
from ditlab.studies.toy import train_runs
from ditlab.studies.toy_report import seeds_phrase, summarize, times, too_short_line
from ditlab.studies.variants import ABLATION_VARIANTS, color, order_key
from ditlab.toy.readers import load_config, load_metrics
from models import NORM_LAYERS


def run_toy(variants, seeds, dispatch, results_dir, extra):
    """train_toy.py for every (variant, seed), --parallel at a time; returns the runs."""
    jobs = [(v, s, list(extra)) for s in seeds for v in variants]
    print(f"[ablation] toy study: {len(jobs)} runs", flush=True)
    return train_runs(jobs, results_dir, os.path.join(results_dir, "logs"), dispatch)


def toy_table(runs):
    """Per variant, the errors at the last evaluated step (EMA and raw), mean and range over seeds."""
    last = {}
    for run in runs:
        cfg = load_config(run)
        rows = load_metrics(run)
        step = max(r["step"] for r in rows)
        for r in rows:
            if r["step"] == step:
                last.setdefault((cfg["normalization"], r["weights"]), []).append(r)
    table = {}
    losses = summarize(runs)["final_loss"]
    for (norm, weights), rows in last.items():
        table.setdefault(norm, {"step": rows[0]["step"], "seeds": len(rows), "final_loss": losses.get(norm, {}).get("mean"),
                                "ema_decay": load_config(runs[0])["ema_decay"]})
        for e in ("rms", "max_abs"):
            table[norm][f"{weights}_{e}"] = spread(r[e] for r in rows)
    return table


def plot_toy(runs, path):
    """RMS error of the EMA weights against training step, one colour per variant, one line per seed."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    seen = set()
    for run in sorted(runs, key=lambda r: order_key(load_config(r)["normalization"])):  # legend in registry order
        norm = load_config(run)["normalization"]
        pts = sorted((r["step"], r["rms"]) for r in load_metrics(run) if r["weights"] == "ema")
        ax.plot(*zip(*pts), marker="o", color=color(norm), label=None if norm in seen else norm)
        seen.add(norm)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("RMS of sampled pixels (EMA weights)")
    ax.set_title("Toy identity study: error per normalization variant")
    ax.axhline(1 / 127.5, color="0.5", lw=0.8, ls=":", label="one 8-bit level")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt(x):
    return f"{x:.2e}" if isinstance(x, float) else str(x)


def headline(toy, variants):
    """The ablation's first lines: its result in one sentence (each variant's EMA sampled error over
    LayerNorm's, the lowest named) and, when the runs are too short to mean anything, one line that says so."""
    shown = [v for v in variants if v in toy]
    if not shown:
        return []
    first = toy[shown[0]]
    rms = {v: toy[v]["ema_rms"]["mean"] for v in shown}
    best = min(rms, key=rms.get)
    parts = [f"the lowest sampled error is {best}'s ({rms[best]:.2e})"]
    if "layer-norm" in rms and len(rms) > 1:
        parts.append("relative to LayerNorm's: " + ", ".join(
            f"{v} {times(rms[v] / rms['layer-norm'])}" for v in shown if v != "layer-norm"))
    sentence = f"At {first['step']:,} steps, {seeds_phrase(first['seeds'])} (EMA weights): {'; '.join(parts)}."
    warning = too_short_line(first["step"], first["ema_decay"], max(rms.values()))
    return [sentence] + (["", warning] if warning else [])


def write_summary(out, toy, args):
    """summary.md (its result in a sentence, the toy table, with its provenance) and summary.json in `out`;
    returns the markdown."""
    lines = ["# Normalization ablation (toy)", "", provenance(), "", *headline(toy, args.variants), "",
             f"Run: variants {', '.join(args.variants)}; seeds {args.seeds}; the `make toy` CPU preset.", ""]
    text = "\n".join(lines + toy_lines(toy, args))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"toy": toy, "variants": args.variants, "seeds": args.seeds}, f, indent=2)
    return text


def toy_lines(toy, args):
    """The toy table (markdown lines)."""
    lines = ["## Toy identity study (error of the samples, target 0; last evaluated step)", "",
             "Mean [min, max] over seeds; RMS / layer-norm: the EMA RMS over layer-norm's. "
             "Definitions: docs/normalization.md#how-the-table-is-measured.", "",
             "| variant | step | seeds | EMA RMS (mean [min, max]) | EMA max abs | raw RMS | RMS / layer-norm | final train loss |",
             "|---|---:|---:|---|---|---|---:|---|"]
    base = toy.get("layer-norm", {}).get("ema_rms", {}).get("mean")
    for v in args.variants:
        if v not in toy:
            continue
        r = toy[v]
        ratio = f"{r['ema_rms']['mean'] / base:.2f}" if base else "- (no layer-norm run)"
        rms = r["ema_rms"]
        lines.append(f"| {v} | {r['step']} | {r['seeds']} | {rms['mean']:.2e} [{rms['min']:.2e}, {rms['max']:.2e}] | "
                     f"{r['ema_max_abs']['mean']:.2e} | {r['raw_rms']['mean']:.2e} | {ratio} | {fmt(r['final_loss'])} |")
    return lines + ["", "![toy error per variant](toy_errors.png)", ""]


def parser():
    """The ablation's flags (any other flag goes to train_toy.py)."""
    p = study_parser("ablation", __doc__)
    p.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS), choices=sorted(NORM_LAYERS))
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0])
    p.add_argument("--out", default="results/ablation")
    return p


def run(args, extra=()):
    """Train every variant and seed, then write the table and figure; returns the table."""
    plt.switch_backend("Agg")
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    runs = run_toy(args.variants, args.seeds, dispatch_of(args), os.path.join(args.out, "toy-runs"), extra)
    toy = toy_table(runs)
    plot_toy(runs, os.path.join(args.out, "toy_errors.png"))
    print(write_summary(args.out, toy, args))
    print(f"[ablation] wrote {args.out}/summary.md ({(time.time() - start) / 60:.1f} min)")
    return toy
