"""The mechanism study (`make mechanism`): why does LayerNorm cost the toy denoiser its precision?

Localise (LayerNorm in the blocks only, in the final layer only, beside everywhere and nowhere), ablate
(the outlier channel set to its mean, its per-timestep mean or zero: intervene.py), restore (a LayerNorm
that learns back the scale and mean it removes: --normalization layer-norm-restore) and stress (weight
decay 0.01 / 0.1, dropout 0.1), each cell several seeds of the toy CPU preset (ditlab/toy/mechanism.py).
Every run is train_toy.py (one thread, --parallel at a time, `--resume auto`); a finished run is kept as
a JSON record in --records and never recomputed, so the study continues across sessions and machines;
--report rewrites the report from the records alone.

    python mechanism.py                                   # every cell, seeds 0 1 2, 12k steps
    python mechanism.py --cells layer-norm none ln-blocks ln-final --long-steps 24000
    python mechanism.py --report --record docs/results/mechanism.md
    python mechanism.py --steps 200 --seeds 0 --cells layer-norm none --out results/mechanism-quick   # a quick check
"""

import argparse
import os
import time

from ditlab.cli import COUNT, INDEX
from ditlab.toy.mechanism import CELLS, GROUPS, run_cells, write_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--parallel", type=COUNT, default=2)
    p.add_argument("--out", default="results/mechanism")
    p.add_argument("--records", default=None, help="default: <out>/records (the measured study's: "
                   "docs/results/mechanism_runs/)")
    p.add_argument("--report", action="store_true", help="only rewrite the report from the records (those "
                   "recorded so far: the report names the runs still to measure)")
    p.add_argument("--record", default="", metavar="PAGE", help="also write the report to PAGE")
    args = p.parse_args(argv)
    args.records = args.records or os.path.join(args.out, "records")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    records = run_cells(args)
    write_report(args, records)
    print(f"[mechanism] wrote {args.out}/summary.md ({(time.time() - start) / 60:.1f} min)")
    return records


if __name__ == "__main__":
    main()
