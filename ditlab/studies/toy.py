"""The toy study (`python study.py toy`, `make toy`): LayerNorm against no LayerNorm on the toy identity task.

Trains every variant (LayerNorm and no-LayerNorm by default) for every seed with train_toy.py, --parallel
runs at a time (one CPU thread each, through the studies' runner), then writes to --out. Each finished run
is recorded in <results-dir>/records; a rerun with the same flags reuses it while its directory is here.
Each run is reachable by a stable name, <results-dir>/<variant>-s<seed> (e.g. results/toy-runs/layer-norm-s0).


  compare.png    channel 0 vs channel 1 of every sampled pixel, all variants on one axis, a panel per
                 evaluated step (the study's scatter plot); the target is the origin
  summary.md     per variant and step: mean/max/RMS error (mean and spread over seeds) and the ratio
  summary.json   LayerNorm error / no-LayerNorm error; the same numbers as JSON
  timestep_errors.png  the probe's per-timestep errors (eps, implied x0, learned variance; no sampling),
                 log-log, per variant; summary.md tabulates them with the LayerNorm / no-LayerNorm ratio per t
  outlier_growth.png   per-block max |x|, max/median ratio and channel-RMS kurtosis against the training step
  mechanism.png  does the LayerNorm model's per-t error track the signal/outlier ratio at its norm inputs?
                 (EMA weights; mechanism_raw.png the raw weights)
  outliers/      the embedding-outlier analysis (analyze_embeddings.py) of each variant's final EMA
                 weights: does the LayerNorm model grow an outlier channel to get its signal through?

    python study.py toy                          # CPU preset, seed 0, both variants
    python study.py toy --seeds 0 1 2            # the 3-seed check
    python study.py toy --report results/toy-runs/layer-norm-s0 results/toy-runs/none-s0   # re-plot finished runs

Any other flag goes to train_toy.py. The readers live in ditlab/toy/readers.py, the tables and figures in
toy_report.py and toy_plots.py (also used by notebooks/ToyDiT_visualization.ipynb); logs go to <results-dir>/logs/.
"""

import json
import os
import sys
import time

import matplotlib.pyplot as plt

from ditlab.cli import INDEX
from ditlab.errors import InputError
from ditlab.files import provenance
from ditlab.run import newest_run
from ditlab.studies.runner import dispatch_of, read_record, run_jobs, study_parser, write_record
from ditlab.studies.variants import TOY_VARIANTS, label
from ditlab.studies.toy_plots import (
    plot_compare,
    plot_error_curves,
    plot_mechanism,
    plot_outlier_growth,
    plot_timestep_errors,
)
from ditlab.toy.readers import final_loss, final_sample_errors, first_seed_runs, last_probe, load_config
from ditlab.studies.toy_report import (
    format_markdown,
    growth_markdown,
    mechanism,
    mechanism_markdown,
    summarize,
    timestep_markdown,
    timestep_summary,
)


def run_name(norm, seed):
    """A toy run's name in the study's records and logs, e.g. layer-norm-s0."""
    return f"{norm}-s{seed}"


def recorded_run(records, norm, seed, extra):
    """The run directory the record of (norm, seed) points to, if that run was made with the same train_toy.py
    flags and its directory is still here (the figures plot its samples and curves); else None."""
    record = read_record(records, run_name(norm, seed), {"train_toy_flags": list(extra)})
    if record and os.path.isfile(os.path.join(record["run"], "metrics.jsonl")):
        return record["run"]
    return None


def record_run(records, run, extra):
    """The record of one finished toy run: where it is and its final sample errors and loss."""
    cfg = load_config(run)
    write_record(records, run_name(cfg["normalization"], cfg["global_seed"]),
                 dict(variant=cfg["normalization"], seed=cfg["global_seed"], run=run, steps=cfg["max_steps"],
                      ema_rms=final_sample_errors(run, "ema"), raw_rms=final_sample_errors(run, "raw"),
                      final_loss=final_loss(run)),
                 {"train_toy_flags": list(extra)})


def link_run(results_dir, name, run):
    """A stable name for a run: <results_dir>/<variant>-s<seed> links to its numbered directory, so commands
    and examples can name it whatever order the jobs started in. A real folder of that name is left alone."""
    link = os.path.join(results_dir, name)
    if os.path.exists(link) and not os.path.islink(link):
        return None
    same_folder = os.path.dirname(os.path.abspath(run)) == os.path.abspath(results_dir)
    target = os.path.basename(run) if same_folder else os.path.abspath(run)  # relative: the folder can move whole
    tmp = f"{link}.tmp-{os.getpid()}"
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: a reader sees the old run or the new one, never no link
    return link


def train_runs(jobs, results_dir, log_dir, dispatch=None, records=None):
    """Train train_toy.py for each (normalization, seed, extra flags) through the studies' runner, progress
    lines echoed with a "[variant sN]" tag, and record each finished run in `records` (default
    <results_dir>/records). A run recorded with the same flags whose directory is still here is not trained
    again. Each run is also reachable as <results_dir>/<variant>-s<seed> (link_run). Returns the run
    directories, sorted by (seed, normalization)."""
    records = records or os.path.join(results_dir, "records")
    done = {(norm, seed): recorded_run(records, norm, seed, extra) for norm, seed, extra in jobs}
    todo = [(norm, seed, extra) for norm, seed, extra in jobs if done[(norm, seed)] is None]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already recorded with these flags (reused; "
              f"records in {records})", flush=True)
    commands = [[sys.executable, "train_toy.py", "--normalization", norm, "--global-seed", str(seed),
                 "--results-dir", results_dir, "--threads", "1", *extra] for norm, seed, extra in todo]
    dispatch = dict(dispatch or {})
    run_jobs(commands, dispatch.pop("parallel", 2), log_dir, names=[run_name(n, s) for n, s, _ in todo],
             tags=[f"{label(norm)} s{seed}" for norm, seed, _ in todo], **dispatch)
    for norm, seed, extra in todo:
        done[(norm, seed)] = newest_run(results_dir, {"normalization": norm, "global_seed": seed})
        record_run(records, done[(norm, seed)], extra)
    links = [link_run(results_dir, run_name(norm, seed), run) for (norm, seed), run in done.items()]
    print("runs by name: " + ", ".join(link for link in links if link), flush=True)
    return sorted(done.values(), key=lambda r: (load_config(r)["global_seed"], load_config(r)["normalization"]))


def outlier_lines(stats_path):
    """Markdown lines: per variant and timestep, the largest |x| over the blocks' token embeddings and
    how consistently one channel carries each token's largest value (from analyze_embeddings' stats)."""
    with open(stats_path) as f:
        stats = json.load(f)
    lines = ["", "Token embeddings of the final EMA weights (analyze_embeddings.py, x0 = 0 noised to each timestep):", "",
             "| variant | timestep | max abs over blocks | max/median (last block) | dominant channel | its share of tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    for model in stats["models"].values():
        norm = model["config"]["normalization"]
        for t, per_layer in model["stats"].items():
            blocks = [v for k, v in per_layer.items() if k.startswith("block.")]
            chan = model["summary"]["per_timestep"].get(str(t), {})
            lines.append(f"| {label(norm)} | {t} | {max(b['max_abs'] for b in blocks):.3g} | "
                         f"{blocks[-1]['max_median_ratio']:.3g} | {chan.get('channel')} | {chan.get('share', 0):.2f} |")
    return lines


def analyze_outliers(runs, out, timesteps=(0, 10, 100, 500, 999)):
    """Run the embedding-outlier analysis (analyze_embeddings.py, as a job) on the
    first seed of each variant; returns its stats.json path."""
    target = os.path.join(out, "outliers")
    run_jobs([[sys.executable, "analyze_embeddings.py", "--ckpt", *first_seed_runs(runs), "--zero-data", "--out",
               target, "--batch-size", "100", "--timesteps", *map(str, timesteps)]], 1, os.path.join(out, "logs"),
             tags=["outliers"])
    return os.path.join(target, "stats.json")


def probe_report(runs, out, summary):
    """The probe's figures (timestep_errors.png, outlier_growth.png, mechanism.png) and markdown lines;
    adds the per-timestep tables and the mechanism's correlations to `summary`. Nothing for old runs."""
    if not any(last_probe(run) for run in runs):
        return []
    plot_timestep_errors(runs, os.path.join(out, "timestep_errors.png"))
    plot_outlier_growth(runs, os.path.join(out, "outlier_growth.png"))
    summary["timesteps"] = {w: timestep_summary(runs, w) for w in ("ema", "raw")}
    lines = timestep_markdown(runs) + ["", "![per-timestep errors](timestep_errors.png)"]
    lines += growth_markdown(runs) + ["", "![outlier growth](outlier_growth.png)"]
    for weights in ("ema", "raw"):  # the EMA lags far behind in short runs: the raw weights are shown too
        result = mechanism(runs, weights)
        if result:
            name = "mechanism.png" if weights == "ema" else "mechanism_raw.png"
            plot_mechanism(result, os.path.join(out, name))
            summary.setdefault("mechanism", {})[weights] = result
            lines += mechanism_markdown(result) + ["", f"![mechanism, {weights} weights]({name})"]
    return lines


def write_report(runs, out, outlier_stats=None):
    """compare.png (first seed of each variant), errors.png, the probe's figures (probe_report),
    summary.md and summary.json in `out`."""
    os.makedirs(out, exist_ok=True)
    plot_compare(first_seed_runs(runs), os.path.join(out, "compare.png"))
    plot_error_curves(runs, os.path.join(out, "errors.png"))
    summary = summarize(runs)
    summary["runs"] = list(runs)
    lines = probe_report(runs, out, summary)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    text = format_markdown(summary, load_config(runs[0]))
    title, rest = text.split("\n", 1)
    text = f"{title}\n\n{provenance()}\n{rest}"
    if lines:
        text += "\n".join(lines) + "\n"
    if outlier_stats:
        text += "\n".join(outlier_lines(outlier_stats)) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def parser():
    """The toy study's flags (any other flag goes to train_toy.py)."""
    p = study_parser("toy", __doc__)
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(TOY_VARIANTS))
    p.add_argument("--results-dir", default="results/toy-runs", help="where the run directories go")
    p.add_argument("--out", default="results/toy", help="where compare.png and the summaries go")
    p.add_argument("--report", nargs="+", metavar="RUN_DIR", help="only write the report for finished runs")
    p.add_argument("--no-outliers", action="store_true", help="skip the embedding-outlier analysis of the final models")
    return p


def run(args, extra=()):
    """Train (unless --report), analyse and report; returns the report's markdown."""
    plt.switch_backend("Agg")  # files only, no windows
    start = time.time()
    if args.report:
        missing = [r for r in args.report if not os.path.isfile(os.path.join(r, "config.json"))]
        if missing:
            raise InputError(f"--report {' '.join(missing)}: not a finished train_toy.py run directory (no config.json)")
        runs = args.report
    else:
        jobs = [(norm, seed, list(extra)) for seed in args.seeds for norm in args.variants]
        print(f"toy study: {len(jobs)} runs ({', '.join(args.variants)} x seeds {args.seeds}), "
              f"{args.parallel} at a time; run directories in {args.results_dir}", flush=True)
        runs = train_runs(jobs, args.results_dir, os.path.join(args.results_dir, "logs"), dispatch_of(args))
    stats = None if args.no_outliers else analyze_outliers(runs, args.out)
    text = write_report(runs, args.out, stats)
    print(text)
    print(f"wrote {args.out}/compare.png, errors.png, timestep_errors.png, outlier_growth.png, mechanism*.png, "
          f"summary.md, summary.json ({time.time() - start:.0f}s)")
    return text
