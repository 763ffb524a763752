"""The sweep (`python study.py sweep`, `make sweep`): where is the LayerNorm gap large?

LayerNorm vs no LayerNorm, one factor at a time around the CPU preset of the toy study (SWEEP_CELLS below):
the preset itself, constant lr 1e-4 (the study's) and constant lr 1e-3 beside the cosine schedule, width
128, batch 1024 and twice the training steps, two seeds per cell (and, asked for by name, steps4x: four
times the steps, near the study's 50k). Every run is train_toy.py (through the studies' runner, one thread
each, --parallel at a time) with `--resume auto`: a rerun skips finished runs and continues interrupted ones;
each finished run is also recorded in <out>/records. Writes to --out: summary.md (final sample RMS, per-t eps
error and the probe error over training: LayerNorm / no-LayerNorm ratio per cell with the spread over seeds),
summary.json, ratios.png and trajectories.png.

    python study.py sweep                              # every cell, seeds 0 1 (about 80 min on 2 idle cores)
    python study.py sweep --steps-scale 0.05           # a quick end-to-end check (600-step runs)
    python study.py sweep --cells preset width128 --seeds 0 1 2
    python study.py sweep --cells preset steps2x steps4x   # the training-length axis (adds 48k-step runs)
    python study.py sweep --report                     # only rewrite the report from the finished runs

The report covers the cells asked for at --seeds, plus any other seed whose runs of a cell have all
finished (so a third seed run for some cells appears beside the others' two).

Any other flag is passed to train_toy.py (e.g. --num-eval-samples 50).
"""


import json
import os
import sys
import time

import matplotlib.pyplot as plt

from ditlab.cli import INDEX, POSITIVE
from ditlab.errors import InputError, UsageError
from ditlab.files import provenance
from ditlab.studies.runner import dispatch_of, read_record, run_jobs, study_parser, write_record
from ditlab.studies.stats import ratio_spread, spread
from ditlab.studies.variants import TOY_VARIANTS, label
from ditlab.run import newest_run
from ditlab.studies.toy_plots import plot_sweep, plot_trajectories
from ditlab.toy.readers import final_sample_errors, load_config, load_metrics, probe_trajectory
from ditlab.studies.toy_report import ema_lag_line, ratio_sentence, times, timestep_summary, too_short_line
from ditlab.toy.task import PRESETS


#################################################################################
#                 The sweep (`make sweep`): where is the LayerNorm gap large?   #
#################################################################################

SWEEP_VARIANTS = TOY_VARIANTS
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
DEFINITIONS = "Definitions: docs/sweep.md#how-the-tables-are-measured."
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
            raise UsageError(f"unknown sweep cell {cell!r}; choose from {', '.join(SWEEP_CELLS)}")
        _, flags, factor = SWEEP_CELLS[cell]
        steps = max(4, round(preset["max_steps"] * factor * steps_scale))
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


def finished_job_run(job):
    """The run directory of a job that has finished (its final sampling evaluation is written), or None."""
    run = newest_run(job["results_dir"], {"normalization": job["normalization"], "global_seed": job["seed"],
                                          "max_steps": job["steps"]})
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
            if all(finished_job_run(job) for job in more):
                jobs += more
    return jobs


def run_sweep(jobs, dispatch, log_dir, train=True):
    """Run the jobs that have not finished (the studies' runner, a "[cell variant sN]" tag per job; none when
    not `train`); returns {cell: [run directories]} of all jobs."""
    dispatch = dict(dispatch)
    parallel = dispatch.pop("parallel", 2)
    todo = [job for job in jobs if finished_job_run(job) is None] if train else []
    if train:
        print(f"sweep: {len(jobs)} runs, {len(jobs) - len(todo)} already finished (skipped), {len(todo)} to run, "
              f"{parallel} at a time", flush=True)
    run_jobs([job["argv"] for job in todo], parallel, log_dir,
             tags=[f"{job['cell']} {label(job['normalization'])} s{job['seed']}" for job in todo], **dispatch)
    runs = {}
    for job in sorted(jobs, key=lambda j: list(SWEEP_CELLS).index(j["cell"])):  # cells in table order
        run = finished_job_run(job)
        if run is not None and train:
            keep_record(job, run)
        if run is None:
            raise InputError(f"sweep: {job['cell']} {job['normalization']} seed {job['seed']} has not finished in "
                             f"{job['results_dir']}: run `python study.py sweep` with the same flags (without --report) to finish it")
        runs.setdefault(job["cell"], []).append(run)
    return runs


def keep_record(job, run):
    """The record of one finished sweep run (<out>/records/<cell>-<steps>-<variant>-s<seed>.json): where it
    is and its final sample errors, written once."""
    records = os.path.join(os.path.dirname(os.path.dirname(job["results_dir"])), "records")
    name = f"{os.path.basename(job['results_dir'])}-{job['normalization']}-s{job['seed']}"
    if read_record(records, name) is None:
        write_record(records, name, dict(cell=job["cell"], variant=job["normalization"], seed=job["seed"], run=run,
                                         steps=job["steps"], ema_rms=final_sample_errors(run, "ema"),
                                         raw_rms=final_sample_errors(run, "raw")), {"argv": job["argv"][1:]})


def sweep_cell_summary(runs):
    """One cell: per variant the final sample RMS (EMA and raw) over seeds, the LayerNorm / none ratio of
    the means with the range of per-seed ratios, and the per-t eps error ratios (timestep_summary)."""
    values = {}  # (weights, normalization) -> seed -> rms
    for run in runs:
        cfg = load_config(run)
        for weights in ("ema", "raw"):
            values.setdefault((weights, cfg["normalization"]), {})[cfg["global_seed"]] = final_sample_errors(run, weights)
    cfg = load_config(runs[0])
    cell = dict(steps=cfg["max_steps"], seeds=sorted({load_config(r)["global_seed"] for r in runs}),
                num_eval_samples=cfg["num_eval_samples"], sampling_steps=cfg["sampling_steps"],
                ema_decay=cfg["ema_decay"])
    for weights in ("ema", "raw"):
        ln, none = values.get((weights, "layer-norm"), {}), values.get((weights, "none"), {})
        cell[weights] = dict(layer_norm=spread(ln.values()), none=spread(none.values()), **ratio_spread(ln, none))
    cell["timesteps"] = timestep_summary(runs, "ema")["rows"]
    cell["trajectory"] = {weights: trajectory_summary(runs, weights) for weights in ("ema", "raw")}
    return cell


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
        a, b = {s: at(ln[s], step) for s in seeds}, {s: at(none[s], step) for s in seeds}
        ratios = ratio_spread(a, b)
        del ratios["per_seed_ratios"]
        out[name] = dict(step=step, layer_norm=spread(a.values()), none=spread(b.values()), **ratios)
    out["drop"] = {norm: spread([at(c[s], half) / at(c[s], steps[-1]) for s in seeds])
                   for norm, c in (("layer-norm", ln), ("none", none))}
    return out


def steps_scale(name, cell):
    """The --steps-scale a cell was run with: its steps over the preset's for that cell."""
    return cell["steps"] / (PRESETS["cpu"]["max_steps"] * SWEEP_CELLS[name][2])


def sweep_headline(summary):
    """The sweep's first lines: its result in one sentence (the first cell's EMA ratio and the range over the
    cells) and, when the runs are too short to mean anything, one line that says so."""
    cells = summary["cells"]
    name, first = next(iter(cells.items()))
    sentence = ratio_sentence(first["steps"], len(first["seeds"]), first["ema"]["ratio"])
    sentence = sentence.replace(f"At {first['steps']:,} steps", f"In the {name} cell, at {first['steps']:,} steps", 1)
    if len(cells) > 1:
        ratios = [c["ema"]["ratio"] for c in cells.values()]
        sentence = (f"{sentence[:-1]}; over the {len(cells)} cells this ratio runs from {times(min(ratios))} "
                    f"to {times(max(ratios))}.")
    scale = min(steps_scale(n, c) for n, c in cells.items())
    quick = f"a quick sweep (runs of {scale:.2g}x the preset's steps, --steps-scale)" if scale < 1 else None
    shortest = min(cells.values(), key=lambda c: c["steps"])
    rms = max(max(c["ema"]["layer_norm"]["mean"], c["ema"]["none"]["mean"]) for c in cells.values())
    warning = too_short_line(shortest["steps"], shortest.get("ema_decay", PRESETS["cpu"]["ema_decay"]), rms, quick)
    return [sentence] + (["", warning] if warning else [])


def sweep_markdown(summary, timesteps=(0, 1, 5, 10, 50, 100, 500, 999)):
    """summary.md of the sweep: its result in a sentence, the sample-error table and the per-t eps error
    ratio table."""
    first = next(iter(summary["cells"].values()))
    lines = ["# Sweep: where is the LayerNorm gap large?", "", provenance(), "", *sweep_headline(summary), "",
             "Run: " + ", ".join(f"{name} ({cell['steps']} steps, seeds {' '.join(map(str, cell['seeds']))})"
                                 for name, cell in summary["cells"].items()) + "; "
             f"{first['num_eval_samples']} samples ({first['sampling_steps']}-step {first.get('sampler', 'ddpm')}) "
             "at the last step.", "",
             "Sample RMS (target 0), mean over seeds [min, max]; ratio: LayerNorm / no LayerNorm [range of per-seed "
             f"ratios], above 1: LayerNorm is worse. {DEFINITIONS}",
             ema_lag_line(first.get("ema_decay", PRESETS["cpu"]["ema_decay"])), "",
             "| cell | change | steps | seeds | EMA RMS, LayerNorm | EMA RMS, no LayerNorm | EMA ratio | raw ratio |",
             "|---|---|---:|---:|---|---|---|---|"]
    spread = lambda s: f"{s['mean']:.2e} [{s['min']:.1e}, {s['max']:.1e}]"
    ratio = lambda c: f"{c['ratio']:.2f} [{c['ratio_min']:.2f}, {c['ratio_max']:.2f}]"
    for name, cell in summary["cells"].items():
        lines.append(f"| {name} | {SWEEP_CELLS[name][0]} | {cell['steps']} | {len(cell['seeds'])} | "
                     f"{spread(cell['ema']['layer_norm'])} | {spread(cell['ema']['none'])} | {ratio(cell['ema'])} | "
                     f"{ratio(cell['raw'])} |")
    lines += ["", "Per-timestep eps error at the last probe (EMA weights): LayerNorm / no LayerNorm [range of per-seed "
              "ratios].", "",
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
    lines = [f"Does the gap grow with training? Probe eps error ({weights} weights), geometric mean over t >= {t_min}, "
             f"mean over seeds; drop: half-way / end. {DEFINITIONS}", "",
             "| cell | half-way step | LayerNorm | no LayerNorm | ratio | end step | LayerNorm | no LayerNorm | ratio "
             "| drop, LayerNorm | drop, no LayerNorm |", "|---|---:|---|---|---|---:|---|---|---|---|---|"]
    for name, tr in cells.items():
        h, e = tr["half"], tr["end"]
        lines.append(f"| {name} | {h['step']} | {h['layer_norm']['mean']:.2e} | {h['none']['mean']:.2e} | {ratio(h)} "
                     f"| {e['step']} | {e['layer_norm']['mean']:.2e} | {e['none']['mean']:.2e} | {ratio(e)} "
                     f"| {drop(tr['drop']['layer-norm'])} | {drop(tr['drop']['none'])} |")
    lines += ["", "![probe error during training per cell](trajectories.png)", ""] if figure else [""]
    return lines


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


def parser():
    """The sweep's flags (any other flag goes to train_toy.py, e.g. --num-eval-samples 50)."""
    p = study_parser("sweep", __doc__)
    p.add_argument("--cells", nargs="+", default=list(DEFAULT_SWEEP_CELLS), choices=list(SWEEP_CELLS),
                   help=f"default: {' '.join(DEFAULT_SWEEP_CELLS)}; also steps4x (48k steps, about 30 minutes more)")
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0, 1])
    p.add_argument("--steps-scale", type=POSITIVE, default=1.0,
                   help="multiply every cell's training (and warm-up) steps, e.g. 0.05 for a quick check")
    p.add_argument("--out", default="results/sweep")
    p.add_argument("--report", action="store_true", help="only write the report (every run must have finished)")
    return p


def run(args, extra=()):
    """Train what has not finished (unless --report), then report; returns {cell: [run directories]}."""
    plt.switch_backend("Agg")
    start = time.time()
    log_dir = os.path.join(args.out, "logs")
    if not args.report:
        run_sweep(sweep_jobs(args.cells, args.seeds, args.out, args.steps_scale, extra), dispatch_of(args), log_dir)
    # the report: these cells at --seeds, and any other seed whose runs of a cell have finished
    runs = run_sweep(report_jobs(args.cells, args.seeds, args.out, args.steps_scale, extra), dispatch_of(args),
                     log_dir, train=False)
    print(write_sweep_report(runs, args.out))
    print(f"wrote {args.out}/summary.md, summary.json, ratios.png, trajectories.png ({(time.time() - start) / 60:.1f} min)")
    return runs
