"""The digits study (`make digits`): does removing or replacing LayerNorm change the quality of trained
image samples? layer-norm, none, rms-norm, dyt and derf on the digits demo (train.py --demo), each at its
own best learning rate, several seeds, trained to a length where quality has stopped improving, then
sampled unguided and guided and scored against the real-digit floor (ditlab/digits_study.py has the phases).

Every run is a train.py / sample_ddp.py / analyze_embeddings.py subprocess (ditlab/jobs.py, one thread
each, --parallel at a time). Everything is resumable: a rerun skips finished runs and scored sample sets
and continues interrupted runs from their last checkpoint (every --fid-every steps); --report only rewrites
the report from what has finished. Writes to --out: summary.md, summary.json, lr_sweep.png, curves.png,
grid.png; --record PAGE also writes the page (docs/results/digits.md) and its figures to docs/figures/.

    python digits_study.py                          # the whole study (hours on 2 cores: docs/results/digits.md)
    python digits_study.py --sweep-only             # phase 1 alone (the lr sweep)
    python digits_study.py --report --record docs/results/digits.md
    python digits_study.py --lengths docs/results/digits_runs docs/results/digits_long_runs \
        --record docs/results/digits_lengths.md     # the length check: is a doubling still better?
    python digits_study.py --variants layer-norm none --seeds 0 --lrs 2e-3 --sweep-steps 200 --steps 400 \\
        --fid-every 200 --samples 100 --cfg-scale 2 --out results/digits-quick   # a quick end-to-end check
"""

import argparse
import os
import time

import matplotlib.pyplot as plt

from ditlab.cli import COUNT, INDEX, NON_NEGATIVE, POSITIVE
from ditlab.digits_study import DIGITS_REF, VARIANTS, run_study, write_lengths_report
from ditlab.features import DIGITS_CLASSIFIER
from ditlab.run import LR_SCHEDULES
from models import NORM_LAYERS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(NORM_LAYERS))
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=POSITIVE, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3],
                   help="the lr sweep's values (seed 0, --sweep-steps); each variant then trains at its best")
    p.add_argument("--sweep-steps", type=COUNT, default=3000, help="training steps of the lr sweep's runs")
    p.add_argument("--steps", type=COUNT, default=8000, help="training steps of the final runs")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
                   help="the final runs' lr schedule (the sweep's is constant): cosine decays to zero at --steps")
    p.add_argument("--grad-clip", type=POSITIVE, default=None,
                   help="clip the final runs' global grad norm at this value (default: off, as the sweep and DiT)")
    p.add_argument("--stop-loss-ratio", type=POSITIVE, default=5.0, metavar="R",
                   help="a final run whose logged loss exceeds R times its lowest so far is stopped as diverged (a "
                        "blow-up that stays finite; train.py --stop-loss-ratio); its variant then steps down an lr")
    p.add_argument("--final-fid-every", type=COUNT, default=2000,
                   help="the final runs' curve points and checkpoint interval")
    p.add_argument("--fid-every", type=COUNT, default=1000,
                   help="FD-digits of the EMA model every this many steps (the curves; also the checkpoint interval)")
    p.add_argument("--curve-samples", type=COUNT, default=500, help="unguided samples of each curve point")
    p.add_argument("--curve-sampling-steps", type=COUNT, default=50, help="their DDPM steps")
    p.add_argument("--samples", type=COUNT, default=1000, help="samples per final run and guidance setting")
    p.add_argument("--noise-seeds", type=INDEX, nargs="*", default=[1, 2],
                   help="sample seeds at which every final model's unguided set is drawn again, to measure the "
                        "sampling noise of FD-digits (none: skip)")
    p.add_argument("--sampling-steps", type=COUNT, default=100, help="their DDPM steps")
    p.add_argument("--cfg-scale", type=NON_NEGATIVE, default=None,
                   help="guidance scale of the guided sets (default: chosen on layer-norm seed 0 over --cfg-candidates)")
    p.add_argument("--cfg-candidates", type=POSITIVE, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    p.add_argument("--cfg-samples", type=COUNT, default=500, help="samples per candidate scale")
    p.add_argument("--parallel", type=COUNT, default=2, help="processes at a time (one thread each)")
    p.add_argument("--digits-ref", default=DIGITS_REF, help="the reference digits (train.py --demo writes them)")
    p.add_argument("--digits-classifier", default=DIGITS_CLASSIFIER)
    p.add_argument("--out", default="results/digits")
    p.add_argument("--records", default=None, help="where finished runs are kept as small JSON records, never "
                   "recomputed (default: <out>/records; the measured study's are in docs/results/digits_runs/)")
    p.add_argument("--sweep-only", action="store_true", help="stop after the lr sweep (and report it)")
    p.add_argument("--report", action="store_true", help="only rewrite the report from finished runs")
    g = p.add_argument_group("length check (instead of the study: compare runs recorded at several --steps)")
    g.add_argument("--lengths", nargs="+", metavar="RECORDS", default=None,
                   help="--records folders of the study at different --steps (one per length): writes the length "
                        "check to <out>/lengths.md (and --record PAGE), trains nothing")
    g.add_argument("--converged-within", type=POSITIVE, default=0.1, metavar="FRACTION",
                   help="a length is trained when the next lowers unguided FD-digits by less than this fraction")
    g.add_argument("--accuracy-within", type=POSITIVE, default=0.01,
                   help="... and raises accuracy by less than this")
    p.add_argument("--record", default="", metavar="PAGE", help="also write the report to PAGE (e.g. "
                   "docs/results/digits.md) and its figures to docs/figures/digits_*.png")
    args = p.parse_args(argv)
    if args.sweep_steps > args.steps:
        p.error(f"--sweep-steps {args.sweep_steps} is more than --steps {args.steps}: the final runs extend the sweep's")
    if args.sweep_steps % args.fid_every or args.steps % args.final_fid_every:
        p.error(f"--sweep-steps must be a multiple of --fid-every {args.fid_every} and --steps of --final-fid-every "
                f"{args.final_fid_every} (the curves' points)")
    if 0 in args.noise_seeds:
        p.error("--noise-seeds: 0 is the study's own sample seed (its sets are already scored); pass others, e.g. 1 2")
    args.records = args.records or os.path.join(args.out, "records")
    return args


def main(argv=None):
    args = parse_args(argv)
    plt.switch_backend("Agg")
    start = time.time()
    if args.lengths:
        return write_lengths_report(args)
    summary = run_study(args)
    print(f"[digits] wrote {os.path.join(args.out, 'summary.md')} ({(time.time() - start) / 60:.1f} min)")
    return summary


if __name__ == "__main__":
    main()
