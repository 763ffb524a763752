"""The sweep (`make sweep`): where is the LayerNorm gap large?

LayerNorm vs no LayerNorm, one factor at a time around the CPU preset of the toy study (ditlab.toy.sweep.SWEEP_CELLS):
the preset itself, constant lr 1e-4 (the study's) and constant lr 1e-3 beside the cosine schedule, width
128, batch 1024 and twice the training steps, two seeds per cell (and, asked for by name, steps4x: four
times the steps, near the study's 50k). Every run is train_toy.py (through ditlab/jobs.py, one thread each,
--parallel at a time) with `--resume auto`: a rerun skips finished runs and continues interrupted ones. Writes to --out: summary.md (final sample RMS, per-t eps error and the probe error
over training: LayerNorm / no-LayerNorm ratio per cell with the spread over seeds), summary.json, ratios.png
and trajectories.png.

    python sweep.py                              # every cell, seeds 0 1 (about 80 min on 2 idle cores)
    python sweep.py --steps-scale 0.05           # a quick end-to-end check (600-step runs)
    python sweep.py --cells preset width128 --seeds 0 1 2
    python sweep.py --cells preset steps2x steps4x   # the training-length axis (adds 48k-step runs)
    python sweep.py --report                     # only rewrite the report from the finished runs

The report covers the cells asked for at --seeds, plus any other seed whose runs of a cell have all
finished (so a third seed run for some cells appears beside the others' two).

Any other flag is passed to train_toy.py (e.g. --num-eval-samples 50).
"""

import argparse
import os
import time

import matplotlib.pyplot as plt

from ditlab.cli import COUNT, INDEX, POSITIVE
from ditlab.toy.sweep import DEFAULT_SWEEP_CELLS, SWEEP_CELLS, report_jobs, run_sweep, sweep_jobs, write_sweep_report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", nargs="+", default=list(DEFAULT_SWEEP_CELLS), choices=list(SWEEP_CELLS),
                   help=f"default: {' '.join(DEFAULT_SWEEP_CELLS)}; also steps4x (48k steps, about 30 minutes more)")
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0, 1])
    p.add_argument("--steps-scale", type=POSITIVE, default=1.0,
                   help="multiply every cell's training (and warm-up) steps, e.g. 0.05 for a quick check")
    p.add_argument("--parallel", type=COUNT, default=2, help="training processes at a time (one thread each)")
    p.add_argument("--out", default="results/sweep")
    p.add_argument("--report", action="store_true", help="only write the report (every run must have finished)")
    args, extra = p.parse_known_args(argv)
    plt.switch_backend("Agg")
    start = time.time()
    log_dir = os.path.join(args.out, "logs")
    if not args.report:
        run_sweep(sweep_jobs(args.cells, args.seeds, args.out, args.steps_scale, extra), args.parallel, log_dir)
    # the report: these cells at --seeds, and any other seed whose runs of a cell have finished
    runs = run_sweep(report_jobs(args.cells, args.seeds, args.out, args.steps_scale, extra), args.parallel, log_dir,
                     train=False)
    print(write_sweep_report(runs, args.out))
    print(f"wrote {args.out}/summary.md, summary.json, ratios.png, trajectories.png ({(time.time() - start) / 60:.1f} min)")
    return runs


if __name__ == "__main__":
    main()
