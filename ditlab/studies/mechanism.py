"""The mechanism study (`python study.py mechanism`, `make mechanism`): why does LayerNorm cost the toy
denoiser its precision?

Cells, each a train_toy.py configuration on the CPU preset, several seeds:
  localise  LayerNorm everywhere, nowhere, in the blocks only (final norm identity), in the final layer only;
  restore   layer-norm-restore (LayerNorm that learns back the scale and mean it removes);
  stress    AdamW weight decay 0.01 / 0.1 and dropout 0.1, for LayerNorm and for no LayerNorm.
Every finished run is kept as a small JSON record (final per-t probe error, sampled error, outlier and
signal/outlier statistics at the last probe and, for the runs named in INTERVENE_CELLS, the interventions of
ditlab/edits.py), so the study continues across machines; the report reads only records.

    python study.py mechanism                                   # every cell, seeds 0 1 2, 12k steps
    python study.py mechanism --cells layer-norm none ln-blocks ln-final --long-steps 24000
    python study.py mechanism --report --record docs/results/mechanism.md
    python study.py mechanism --steps 200 --seeds 0 --cells layer-norm none --out results/mechanism-quick   # a quick check
"""

import os
import statistics
import sys
import time

from scipy.stats import spearmanr

from ditlab.cli import COUNT, INDEX
from ditlab.errors import JobError
from ditlab.files import provenance, write_json, write_page
from ditlab.run import newest_run
from ditlab.studies.mechanism_runs import INTERVENE_CELLS, summarise_one_thread
from ditlab.studies.runner import (
    dispatch_of,
    echo_new_lines,
    map_calls,
    read_record,
    run_jobs,
    study_parser,
    write_record,
)
from ditlab.studies.stats import fmt_spread
from ditlab.studies.toy_plots import plot_localise_lengths, plot_mechanism_study
from ditlab.toy.readers import load_metrics

# name -> (what it is, train_toy.py flags)
CELLS = {
    "layer-norm": ("LayerNorm in the blocks and the final layer", ["--normalization", "layer-norm"]),
    "none": ("no normalization", ["--normalization", "none"]),
    "ln-blocks": ("LayerNorm in the blocks only (final norm identity)",
                  ["--normalization", "layer-norm", "--final-normalization", "none"]),
    "ln-final": ("LayerNorm in the final layer only (blocks identity)",
                 ["--normalization", "none", "--final-normalization", "layer-norm"]),
    "restore": ("LayerNorm that learns back its removed log-scale and mean", ["--normalization", "layer-norm-restore"]),
    "layer-norm-wd0.01": ("LayerNorm, AdamW weight decay 0.01", ["--normalization", "layer-norm", "--weight-decay", "0.01"]),
    "none-wd0.01": ("no normalization, weight decay 0.01", ["--normalization", "none", "--weight-decay", "0.01"]),
    "layer-norm-wd0.1": ("LayerNorm, weight decay 0.1", ["--normalization", "layer-norm", "--weight-decay", "0.1"]),
    "none-wd0.1": ("no normalization, weight decay 0.1", ["--normalization", "none", "--weight-decay", "0.1"]),
    "layer-norm-dropout0.1": ("LayerNorm, dropout 0.1", ["--normalization", "layer-norm", "--dropout", "0.1"]),
    "none-dropout0.1": ("no normalization, dropout 0.1", ["--normalization", "none", "--dropout", "0.1"]),
}
GROUPS = {
    "localise": ("layer-norm", "none", "ln-blocks", "ln-final"),
    "restore": ("layer-norm", "none", "restore"),
    "stress": ("layer-norm", "none", "layer-norm-wd0.01", "none-wd0.01", "layer-norm-wd0.1", "none-wd0.1",
               "layer-norm-dropout0.1", "none-dropout0.1"),
}
STRESS_PAIRS = (("layer-norm", "none"), ("layer-norm-wd0.01", "none-wd0.01"), ("layer-norm-wd0.1", "none-wd0.1"),
                ("layer-norm-dropout0.1", "none-dropout0.1"))
FIGURE = "mechanism_study.png"
LENGTHS_FIGURE = "mechanism_localise_lengths.png"
REPORT_T = (0, 1, 5, 10, 100, 999)
DEFINITIONS = "Definitions: docs/mechanism.md#how-the-tables-are-measured."
RECORD_SETTINGS = ("steps", "probe_samples", "num_eval_samples")


def job_name(cell, seed, steps):
    return f"{cell}-{steps}-s{seed}"


def run_of(args, cell, seed, steps):
    """The newest finished-or-not run of a cell, seed and length under <out>/runs/<cell>-<steps>/."""
    return newest_run(os.path.join(args.out, "runs", f"{cell}-{steps}"), {"global_seed": seed, "max_steps": steps})


def finished(run, steps):
    """A run whose final evaluation (sampling rows at its last step) is written."""
    return run is not None and any(r["step"] == steps for r in load_metrics(run))


def train_command(args, cell, seed, steps):
    return [sys.executable, "train_toy.py", "--preset", "cpu", *CELLS[cell][1], "--global-seed", str(seed),
            "--max-steps", str(steps), "--eval-steps", str(steps), "--probe-samples", str(args.probe_samples),
            "--num-eval-samples", str(args.num_eval_samples), "--results-dir",
            os.path.join(args.out, "runs", f"{cell}-{steps}"), "--threads", "1", "--resume", "auto"]


def recorded(args, name):
    """The record of a run, or None; one made with another --probe-samples or --num-eval-samples is refused."""
    return read_record(args.records, name, {k: getattr(args, k) for k in ("probe_samples", "num_eval_samples")})


def wanted_runs(args):
    """Every (cell, seed, steps) the arguments ask for: --cells x --seeds at --steps, and --long-cells x
    --seeds at every --long-steps."""
    wanted = [(cell, seed, args.steps) for cell in args.cells for seed in args.seeds]
    return wanted + [(cell, seed, n) for n in args.long_steps for cell in args.long_cells for seed in args.seeds]


def run_cells(args):
    """Train every (cell, seed) without a record at --steps (and the localise cells at every --long-steps),
    --parallel at a time, then record each; returns {(cell, seed, steps): record}. With --report, trains
    nothing and returns the recorded runs only."""
    wanted = wanted_runs(args)
    todo = [w for w in wanted if recorded(args, job_name(*w)) is None]
    if args.report:  # a study cut short: report what is recorded; the report lists what is not
        print(f"[mechanism] --report: {len(wanted) - len(todo)} of {len(wanted)} runs recorded", flush=True)
        return {w: recorded(args, job_name(*w)) for w in wanted if w not in todo}
    train = [w for w in todo if not finished(run_of(args, *w), w[2])]
    train.sort(key=lambda w: -w[2])  # the long runs first, so that the two slots stay busy
    print(f"[mechanism] {len(wanted)} runs, {len(wanted) - len(todo)} recorded, {len(train)} to train", flush=True)
    # in waves of --parallel, each wave recorded before the next (a study cut short keeps what finished)
    for i in range(0, len(train), args.parallel):
        wave = train[i:i + args.parallel]
        run_jobs([train_command(args, *w) for w in wave], args.parallel, os.path.join(args.out, "logs"),
                 names=[job_name(*w) for w in wave], tags=[job_name(*w) for w in wave], append=True,
                 **dispatch_of(args, parallel=False))
        keep(args, wave)
    keep(args, [w for w in todo if w not in train])
    return {w: recorded(args, job_name(*w)) for w in wanted}


def summarise_all(args, runs):
    """summarise_run of every run as jobs of the runner; each job appends its progress lines to
    <out>/logs/summary-<name>.log, echoed here as "[summary of <name>] line" while it runs."""
    logs = [os.path.join(args.out, "logs", f"summary-{job_name(*w)}.log") for w in runs]
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    for path in logs:
        open(path, "w").close()
    offsets = [0] * len(logs)

    def echo(i):
        """Echo the progress lines a running summary added to its log."""
        offsets[i] = echo_new_lines(logs[i], offsets[i], f"summary of {job_name(*runs[i])}")
    calls = [(args, cell, seed, steps, run_of(args, cell, seed, steps), log)
             for (cell, seed, steps), log in zip(runs, logs)]
    records = map_calls(summarise_one_thread, calls, args.parallel, os.path.join(args.out, "logs"),
                        labels=[f"summary of {job_name(*w)}" for w in runs], watch=echo,
                        **dispatch_of(args, parallel=False))
    for i in range(len(logs)):
        echo(i)
    return records


def keep(args, runs):
    """Write the record of every finished run in `runs`; the summaries (the interventions take minutes per
    run) are jobs of the runner, --parallel at a time, one thread each, like the training jobs."""
    for cell, seed, steps in runs:
        if not finished(run_of(args, cell, seed, steps), steps):
            raise JobError(f"{job_name(cell, seed, steps)} did not finish; see {args.out}/logs")
    records = summarise_all(args, runs)
    for (cell, seed, steps), record in zip(runs, records):
        write_record(args.records, job_name(cell, seed, steps), record,
                     {k: getattr(args, k) for k in RECORD_SETTINGS})


#################################################################################
#                                    Report                                     #
#################################################################################

def ratio_rows(records, cells, steps, base, timesteps=REPORT_T):
    """Markdown rows: per cell, the per-t eps error and the sampled RMS relative to `base`'s, per seed
    paired (same seed), mean [min, max] over seeds."""
    lines = []
    for cell in cells:
        seeds = sorted(s for (c, s, n) in records if c == cell and n == steps and (base, s, n) in records)
        if not seeds:
            continue
        cells_t = []
        for t in timesteps:
            r = [records[(cell, s, steps)]["eps"][str(t)] / records[(base, s, steps)]["eps"][str(t)] for s in seeds]
            cells_t.append(fmt_spread(r))
        sampled = [records[(cell, s, steps)]["sample_rms"] / records[(base, s, steps)]["sample_rms"] for s in seeds]
        lines.append(f"| {cell} | {len(seeds)} | " + " | ".join(cells_t) + f" | {fmt_spread(sampled)} |")
    return lines


def error_rows(records, cells, steps, timesteps=REPORT_T):
    lines = []
    for cell in cells:
        recs = [r for (c, s, n), r in records.items() if c == cell and n == steps]
        if recs:
            lines.append(f"| {cell} | {len(recs)} | " + " | ".join(fmt_spread(r["eps"][str(t)] for r in recs)
                                                                  for t in timesteps)
                         + f" | {fmt_spread(r['sample_rms'] for r in recs)} |")
    return lines


def outlier_rows(records, cells, steps):
    """Per cell: the largest max/median ratio over block outputs and t (the outlier), and signal/outlier
    at the final norm's input at t = 0 and t = 100."""
    lines = []
    for cell in cells:
        recs = [r for (c, s, n), r in records.items() if c == cell and n == steps]
        if not recs:
            continue
        mm = [max(v for per_t in r["max_median"].values() for v in per_t.values()) for r in recs]
        fin = [r["norm_inputs"].get("final.norm", {}) for r in recs]
        s0 = [f["0"]["signal_to_outlier"] for f in fin if "0" in f]
        s100 = [f["100"]["signal_to_outlier"] for f in fin if "100" in f]
        lines.append(f"| {cell} | {fmt_spread(mm)} | {fmt_spread(s0) if s0 else '-'} | {fmt_spread(s100) if s100 else '-'} |")
    return lines


def intervention_rows(records, cell, steps, timesteps=(0, 10, 100, 999)):
    """Per place and edit: sampled RMS and probe eps error relative to the unedited model, over seeds."""
    recs = [r for (c, s, n), r in records.items() if c == cell and n == steps and "interventions" in r]
    if not recs:
        return []
    lines = []
    for place in recs[0]["interventions"]["places"]:
        for edit in ("mean", "per-t", "zero"):
            got = [r["interventions"]["places"][place][edit] for r in recs]
            cells_t = " | ".join(fmt_spread(g["ratio_per_t"][str(t)] for g in got) for t in timesteps)
            lines.append(f"| {place} | {edit} | {fmt_spread(g['sample_ratio'] for g in got)} | {cells_t} |")
    return lines


# pairs that differ only in the final layer's norm (LayerNorm, identity), for the (|s|/M)^2 test
FINAL_NORM_PAIRS = (("ln-final", "none"), ("layer-norm", "ln-blocks"))


def final_norm_test(records, cell, twin, steps):
    """The (|s|/M)^2 argument at the final norm by itself: per probe timestep, (s/M)^2 at the final norm's
    input of `cell` (mean [min, max] over seeds) and the eps error ratio cell / twin (same seed), where the
    two differ only in the final norm; and per seed the Spearman rank correlation over timesteps of the
    two (the argument predicts > 0: the norm costs most where it is least linear). Returns (rows, rhos)."""
    seeds = sorted(s for (c, s, n) in records if c == cell and n == steps and (twin, s, n) in records)
    if not seeds:
        return [], []
    timesteps = sorted(int(t) for t in records[(cell, seeds[0], steps)]["norm_inputs"]["final.norm"])
    q = {s: [records[(cell, s, steps)]["norm_inputs"]["final.norm"][str(t)]["signal_to_outlier"] ** 2
             for t in timesteps] for s in seeds}
    gap = {s: [records[(cell, s, steps)]["eps"][str(t)] / records[(twin, s, steps)]["eps"][str(t)]
               for t in timesteps] for s in seeds}
    rows = [f"| {t} | {fmt_spread(q[s][i] for s in seeds)} | {fmt_spread(gap[s][i] for s in seeds)} |"
            for i, t in enumerate(timesteps)]
    rhos = [float(spearmanr(q[s], gap[s]).statistic) for s in seeds]
    return rows, rhos


def cost_rows(records, cells, steps):
    """Per cell: runs, wall-clock minutes of one run (its log.txt: training, probes, final evaluation; two
    runs at a time on the measured machine) and of its interventions, where recorded."""
    lines = []
    for cell in cells:
        recs = [r for (c, s, n), r in records.items() if c == cell and n == steps]
        train = [r["run_seconds"] / 60 for r in recs if r.get("run_seconds")]
        edit = [r["intervene_seconds"] / 60 for r in recs if r.get("intervene_seconds")]
        if recs:
            lines.append(f"| {cell} | {len(recs)} | {fmt_spread(train) if train else '-'} | {fmt_spread(edit) if edit else '-'} |")
    return lines


def restore_lines(records, steps, cell="restore"):
    """How much the trained restoring layers take back: the largest |a| and |b| over the model's norms."""
    recs = [r for (c, s, n), r in records.items() if c == cell and n == steps and r.get("restoring_weights")]
    if not recs:
        return []
    a = [max(w["scale"] for w in r["restoring_weights"].values()) for r in recs]
    b = [max(w["mean"] for w in r["restoring_weights"].values()) for r in recs]
    return [f"Trained restoring weights, largest over the model's norms, {len(recs)} seeds: |a| {fmt_spread(a)}, "
            f"|b| {fmt_spread(b)}.", ""]


def missing_lines(args, records):
    """The runs the arguments ask for that have no record yet (a report written while the study is under
    way says what its tables leave out)."""
    missing = [job_name(*w) for w in wanted_runs(args) if w not in records]
    if not missing:
        return []
    return [f"**Not yet measured** ({len(missing)} of {len(wanted_runs(args))} runs; the tables use the "
            f"{len(records)} recorded): {', '.join(missing)}.", ""]


def intervention_table(records, cell, steps, title):
    """The report's lines for one cell's interventions at `steps` under `title` ([] if none recorded)."""
    rows = intervention_rows(records, cell, steps)
    return [title, "", "| place | edit | sampled | t=0 | t=10 | t=100 | t=999 |", "|---|---|---|---|---|---|---|",
            *rows, ""] if rows else []


def final_norm_table(records, cell, twin, steps, title):
    """The report's lines for the (|s|/M)^2 test of one pair at `steps` under `title` ([] without a paired
    seed): the per-t table and the per-seed rank correlations."""
    rows, rhos = final_norm_test(records, cell, twin, steps)
    return [title, "", f"| t | (s/M)^2 at {cell}'s final norm | eps {cell} / {twin} |", "|---:|---|---|", *rows, "",
            f"Spearman rank correlation over timesteps, per seed: {', '.join(f'{r:+.2f}' for r in rhos)}.", ""] if rows else []


def result_line(records, steps):
    """The page's first sentence, its result in words: the localise cells' sampled error over no
    normalization's (mean of the seed-paired ratios) at --steps; [] before any of them is recorded."""
    parts = []
    for cell, where in (("layer-norm", "everywhere"), ("ln-blocks", "in the blocks only"),
                        ("ln-final", "in the final layer only")):
        seeds = sorted(s for (c, s, n) in records if c == cell and n == steps and ("none", s, n) in records)
        if seeds:
            ratio = statistics.fmean(records[(cell, s, steps)]["sample_rms"] / records[("none", s, steps)]["sample_rms"]
                                     for s in seeds)
            parts.append(f"{where} {ratio:.2f}x ({len(seeds)} seed{'s' * (len(seeds) != 1)})")
    if not parts:
        return []
    return [f"At {steps:,} steps, LayerNorm multiplies the toy's sampled error over no normalization's: "
            + "; ".join(parts) + ".", ""]


def run_line(args):
    """The page's one line on what was run: cells, seeds, lengths, probe draws and samples."""
    longer = (f" (the localise cells {', '.join(args.long_cells)} also at {', '.join(map(str, args.long_steps))})"
              if args.long_steps else "")
    return (f"Run: toy CPU preset (`train_toy.py --preset cpu`), cells {', '.join(args.cells)}; seeds {args.seeds}; "
            f"{args.steps} steps{longer}; EMA weights, the last probe ({args.probe_samples} draws per t) and "
            f"{args.num_eval_samples} samples (1000 DDPM steps).")


def figure_lengths(args):
    """The lengths the localise figure compares: --steps and every --long-steps ([] without long runs)."""
    return [args.steps, *args.long_steps] if args.long_steps else []


def long_lines(records, n, cells):
    """The --long-cells at a longer length n (--long-steps): their errors, ratios to both full variants,
    the (|s|/M)^2 test at the final norm, outliers, the interventions where recorded, and cost, so that
    the t = 0 question can be read at the length where its gap is clear."""
    head_t = " | ".join(f"t={t}" for t in REPORT_T)
    rule = "|---|---:|" + "---|" * (len(REPORT_T) + 1)
    lines = [f"### At {n} steps", "", f"| cell | seeds | {head_t} | sampled RMS |", rule,
             *error_rows(records, cells, n), "", "Ratio to LayerNorm everywhere:", "",
             f"| cell | seeds | {head_t} | sampled |", rule, *ratio_rows(records, cells, n, "layer-norm"), "",
             "Ratio to no normalization:", "", f"| cell | seeds | {head_t} | sampled |", rule,
             *ratio_rows(records, cells, n, "none"), ""]
    for cell, twin in FINAL_NORM_PAIRS:
        lines += final_norm_table(records, cell, twin, n, f"(|s|/M)^2 at the final norm, {cell} / {twin} at {n} steps "
                                                          "(section 5's test):")
    for cell in INTERVENE_CELLS:
        lines += intervention_table(records, cell, n, f"Interventions, {cell} at {n} steps (as in section 2):")
    lines += [f"Outliers at {n} steps:", "", "| cell | max/median (worst block, any t) | final norm s/M at t=0 | at t=100 |",
              "|---|---|---|---|", *outlier_rows(records, cells, n), "",
              f"Cost at {n} steps (minutes per run):", "", "| cell | runs | train + evaluate | interventions |",
              "|---|---:|---|---|", *cost_rows(records, cells, n), ""]
    return lines


def write_report(args, records):
    """<out>/summary.md, summary.json and the figure (and --record PAGE, its figure in the page's
    ../figures/): the four parts' tables from the records."""
    steps = args.steps
    os.makedirs(args.out, exist_ok=True)
    figure = plot_mechanism_study(records, steps, os.path.join(args.out, FIGURE), STRESS_PAIRS, INTERVENE_CELLS)
    head_t = " | ".join(f"t={t}" for t in REPORT_T)
    lines = ["# The mechanism study: where and why LayerNorm costs the toy denoiser its precision", "", provenance(), "",
             *result_line(records, steps), run_line(args), "", f"Ratios: per seed, then mean [min, max] over seeds. {DEFINITIONS}", "",
             *missing_lines(args, records),
             *([f"![localise, restore, stress and ablate at {steps} steps]({FIGURE})", ""] if figure else []),
             "## Errors per cell", "", f"| cell | seeds | {head_t} | sampled RMS |",
             "|---|---:|" + "---|" * (len(REPORT_T) + 1), *error_rows(records, args.cells, steps), "",
             "## 1. Localise: which norm costs the precision? (ratio to LayerNorm everywhere)", "",
             f"| cell | seeds | {head_t} | sampled |", "|---|---:|" + "---|" * (len(REPORT_T) + 1),
             *ratio_rows(records, GROUPS["localise"], steps, "layer-norm"), "",
             "Ratio to no normalization:", "", f"| cell | seeds | {head_t} | sampled |",
             "|---|---:|" + "---|" * (len(REPORT_T) + 1), *ratio_rows(records, GROUPS["localise"], steps, "none"), ""]
    lengths = figure_lengths(args)
    drawn = {FIGURE: FIGURE} if figure else {}
    if lengths and plot_localise_lengths(records, lengths, os.path.join(args.out, LENGTHS_FIGURE)):
        drawn[LENGTHS_FIGURE] = LENGTHS_FIGURE
        lines += [f"![localise at {', '.join(map(str, lengths))} steps]({LENGTHS_FIGURE})", ""]
    for n in args.long_steps:
        lines += long_lines(records, n, args.long_cells)
    lines += ["## 2. Ablate: what does the outlier carry?", "",
              f"Sampled RMS and eps error of the edited model over the unedited one (1: no change). {DEFINITIONS}", ""]
    for cell in INTERVENE_CELLS:
        lines += intervention_table(records, cell, steps, f"### {cell}")
    lines += ["## 3. Restore: LayerNorm that hands back what it removes (ratio to LayerNorm)", "",
              f"| cell | seeds | {head_t} | sampled |", "|---|---:|" + "---|" * (len(REPORT_T) + 1),
              *ratio_rows(records, ("restore", "none"), steps, "layer-norm"), "", *restore_lines(records, steps),
              "## 4. Stress: weight decay and dropout (ratio of each LayerNorm cell to its no-LayerNorm twin)", ""]
    lines += [f"| cell | seeds | {head_t} | sampled |", "|---|---:|" + "---|" * (len(REPORT_T) + 1)]
    for ln, none in STRESS_PAIRS:
        twin = {k: v for k, v in records.items() if k[0] in (ln, none)}
        renamed = {(("A" if c == ln else "B"), s, n): r for (c, s, n), r in twin.items()}
        lines += [row.replace("| A |", f"| {ln} / {none} |", 1) for row in ratio_rows(renamed, ("A",), steps, "B")]
    lines += ["", "## 5. The (|s|/M)^2 argument at the final norm by itself", "",
              "Each pair differs only in the final layer's norm; the argument predicts a positive correlation. "
              + DEFINITIONS, ""]
    for cell, twin in FINAL_NORM_PAIRS:
        lines += final_norm_table(records, cell, twin, steps, f"### {cell} / {twin}")
    lines += ["", "## Outliers and the signal/outlier ratio at the final norm", "",
              "| cell | max/median (worst block, any t) | final norm s/M at t=0 | at t=100 |", "|---|---|---|---|",
              *outlier_rows(records, args.cells, steps), ""]
    lines += ["## Cost", "", "Minutes per run, mean [min, max]:", "",
              "| cell | runs | train + evaluate | interventions |", "|---|---:|---|---|",
              *cost_rows(records, args.cells, steps), ""]
    text = "\n".join(lines)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(args.out, "summary.json"), {job_name(*k): v for k, v in records.items()})
    if args.record:
        write_page(args.record, text, args.out, drawn)
    print(text)
    return text


def parser():
    """The mechanism study's flags."""
    p = study_parser("mechanism", __doc__)
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=COUNT, default=12_000, help="training steps of every cell (the CPU preset's 12k)")
    p.add_argument("--long-steps", type=COUNT, nargs="*", default=[],
                   help="also train the localise cells (--long-cells) at these lengths, e.g. 24000")
    p.add_argument("--long-cells", nargs="+", default=list(GROUPS["localise"]), choices=list(CELLS))
    p.add_argument("--probe-samples", type=COUNT, default=256)
    p.add_argument("--num-eval-samples", type=COUNT, default=100)
    p.add_argument("--stats-samples", type=COUNT, default=64, help="probe draws per timestep for the channel means")
    p.add_argument("--intervene-sampling-steps", type=COUNT, default=1000)
    p.add_argument("--out", default="results/mechanism")
    p.add_argument("--records", default=None, help="default: <out>/records (the measured study's: "
                   "docs/results/mechanism_runs/)")
    p.add_argument("--report", action="store_true", help="only rewrite the report from the records (those "
                   "recorded so far: the report names the runs still to measure)")
    p.add_argument("--record", default="", metavar="PAGE", help="also write the report to PAGE")
    return p


def run(args, extra=()):
    """Train and record what is missing (unless --report), then write the report; returns the records."""
    args.records = args.records or os.path.join(args.out, "records")
    start = time.time()
    records = run_cells(args)
    write_report(args, records)
    print(f"[mechanism] wrote {args.out}/summary.md ({(time.time() - start) / 60:.1f} min)")
    return records
