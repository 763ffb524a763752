"""Run the toy identity study end to end and write its figure and tables (`make toy`).

Trains every variant (LayerNorm and no-LayerNorm by default) for every seed with train_toy.py, several
runs in parallel (one CPU thread each), then writes to --out:

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

    python toy_study.py                          # CPU preset, seed 0, both variants
    python toy_study.py --seeds 0 1 2            # the 3-seed check
    python toy_study.py --report results/toy-runs/000-* results/toy-runs/001-*   # re-plot finished runs

The loading and plotting functions live in ditlab/toy/ (also used by notebooks/ToyDiT_visualization.ipynb);
the runs go through ditlab/jobs.py, one thread each, their logs in <results-dir>/logs/.
"""

import argparse
import os
import time

import matplotlib.pyplot as plt

from ditlab.cli import COUNT, INDEX
from ditlab.toy.study import analyze_outliers, write_report
from ditlab.toy.sweep import train_runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=["layer-norm", "none"])
    p.add_argument("--parallel", type=COUNT, default=2, help="training processes at a time (one thread each)")
    p.add_argument("--results-dir", default="results/toy-runs", help="where the run directories go")
    p.add_argument("--out", default="results/toy", help="where compare.png and the summaries go")
    p.add_argument("--report", nargs="+", metavar="RUN_DIR", help="only write the report for finished runs")
    p.add_argument("--no-outliers", action="store_true", help="skip the embedding-outlier analysis of the final models")
    args, extra = p.parse_known_args(argv)  # anything else is passed to train_toy.py (e.g. --steps 2000)
    plt.switch_backend("Agg")  # files only, no windows
    start = time.time()
    if args.report:
        runs = args.report
    else:
        jobs = [(norm, seed, extra) for seed in args.seeds for norm in args.variants]
        print(f"toy study: {len(jobs)} runs ({', '.join(args.variants)} x seeds {args.seeds}), "
              f"{args.parallel} at a time; run directories in {args.results_dir}", flush=True)
        runs = train_runs(jobs, args.parallel, args.results_dir, os.path.join(args.results_dir, "logs"))
    stats = None if args.no_outliers else analyze_outliers(runs, args.out)
    text = write_report(runs, args.out, stats)
    print(text)
    print(f"wrote {args.out}/compare.png, errors.png, timestep_errors.png, outlier_growth.png, mechanism*.png, summary.md, "
          f"summary.json ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
