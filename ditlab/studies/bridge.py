"""The bridge study (`python study.py bridge`, `make bridge`): why does LayerNorm's cost on the toy (2-5x in
sampled error) not reach the digits' image quality? The toy's instruments on image models, and the toy on
data that vary:

  1. digits: the demo with LayerNorm everywhere, nowhere, in the blocks only (ln-blocks) and in the final
     layer only (ln-final), --seeds each, at the 8k digits study's recipe (cosine lr to --steps, --lr);
  2. every digits model probed per timestep (eps and x0 error on fixed digits and noise, ditlab/probe.py),
     its loudest channel edited (mean, per-timestep mean, zero; ditlab/edits.py) with a channel of ordinary
     size as a control, and samples drawn under the edits at the final norm's input (FD-digits, accuracy);
  3. toy: LayerNorm vs none at --spreads (the std of the toy's Gaussian images; 0 is the all-zero task),
     --seeds each, --toy-steps, scored against the Gaussian task's closed-form optimum;
  4. the report: per-timestep LayerNorm/none error ratios on images beside the toy's, the edits, and the
     toy's gap against its data's spread.

Every finished model is kept as a small JSON record in --records (never recomputed), so the study
continues on another machine and `--report` rewrites the page from records alone.

    python study.py bridge                          # the whole study (hours on 2 cores)
    python study.py bridge --train-only             # train the models, analyse them later
    python study.py bridge --report --record docs/results/bridge.md
"""

import os
import sys

from ditlab.cli import COUNT, INDEX, NON_NEGATIVE, POSITIVE
from ditlab.data import write_digits_folder
from ditlab.features import DIGITS_CLASSIFIER
from ditlab.run import newest_run
from ditlab.studies import runner
from ditlab.studies.digits_runs import DIGITS_REF, run_step
from ditlab.studies.runner import dispatch_of, run_jobs, study_parser

# variant -> (the blocks' normalization, the final layer's)
DIGITS_VARIANTS = {"layer-norm": ("layer-norm", "layer-norm"), "none": ("none", "none"),
                   "ln-blocks": ("layer-norm", "none"), "ln-final": ("none", "layer-norm")}
TOY_VARIANTS = ("layer-norm", "none")


def digits_key(variant, seed):
    """A digits model's name in records and logs, e.g. ln-blocks-s1."""
    return f"{variant}-s{seed}"


def find_digits_run(args, variant, seed):
    """The newest digits run of this variant and seed at this study's recipe under <out>/runs, or None."""
    blocks, final = DIGITS_VARIANTS[variant]
    wanted = {"normalization": blocks, "final_normalization": None if final == blocks else final,
              "lr": args.lr, "global_seed": seed, "lr_schedule": "cosine", "max_steps": args.steps}
    return newest_run(os.path.join(args.out, "runs"), wanted)


def digits_train_command(args, variant, seed):
    """train.py's command for one digits model: a new demo run, or the resume of the one already started."""
    run = find_digits_run(args, variant, seed)
    if run:
        return [sys.executable, "train.py", "--resume", run, "--max-steps", str(args.steps), "--threads", "1"]
    blocks, final = DIGITS_VARIANTS[variant]
    own_final = ["--final-normalization", final] if final != blocks else []
    return [sys.executable, "train.py", "--demo", "--data-path", args.digits_ref, "--normalization", blocks,
            *own_final, "--lr", f"{args.lr:g}", "--lr-schedule", "cosine",
            "--global-seed", str(seed), "--max-steps", str(args.steps), "--results-dir",
            os.path.join(args.out, "runs"), "--threads", "1", "--sample-every", "0",
            "--ckpt-every", str(args.ckpt_every), "--fid-every", "0"]


def train_digits(args, models):
    """Train every (variant, seed) in `models` not yet at --steps, --parallel at a time; returns
    {(variant, seed): run directory}."""
    todo = [(v, s) for v, s in models if run_step(find_digits_run(args, v, s)) < args.steps]
    print(f"[bridge] training {len(todo)} of {len(models)} digits models", flush=True)
    names = [digits_key(v, s) for v, s in todo]
    run_jobs([digits_train_command(args, v, s) for v, s in todo], args.parallel, os.path.join(args.out, "logs"),
             names=names, tags=names, append=True, **dispatch_of(args, parallel=False))
    return {(v, s): find_digits_run(args, v, s) for v, s in models}


def digits_models(args):
    """Every (variant, seed) of the digits part, seed by seed (a study cut short has every variant at seed 0)."""
    return [(v, s) for s in args.seeds for v in args.variants]


def run(args, extra=()):
    """The study: train what is missing, analyse what is trained, record, report."""
    args.records = args.records or os.path.join(args.out, "records")
    if not os.path.isdir(args.digits_ref):
        write_digits_folder(args.digits_ref)
    models = digits_models(args)
    if args.train_only:
        return train_digits(args, models)
    raise NotImplementedError


def parser():
    """The bridge study's flags."""
    p = study_parser("bridge", __doc__)
    p.add_argument("--variants", nargs="+", default=list(DIGITS_VARIANTS), choices=list(DIGITS_VARIANTS))
    p.add_argument("--seeds", type=INDEX, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=COUNT, default=8000, help="training steps of the digits models")
    p.add_argument("--lr", type=POSITIVE, default=4e-3,
                   help="every digits variant's lr: the 8k digits study's best for both LayerNorm and none")
    p.add_argument("--ckpt-every", type=COUNT, default=2000, help="the digits runs' checkpoint interval")
    p.add_argument("--spreads", type=NON_NEGATIVE, nargs="+", default=[0.0, 0.1, 0.3, 1.0],
                   help="the toy's data spreads (std of its Gaussian images; 0: the all-zero task)")
    p.add_argument("--toy-steps", type=COUNT, default=12000, help="training steps of the toy runs")
    p.add_argument("--digits-ref", default=DIGITS_REF, help="the digits (train.py --demo writes them)")
    p.add_argument("--digits-classifier", default=DIGITS_CLASSIFIER)
    p.add_argument("--out", default="results/bridge")
    p.add_argument("--records", default=None, help="finished models' JSON records (default: <out>/records; the "
                   "measured study's are in docs/results/bridge_runs/)")
    p.add_argument("--train-only", action="store_true", help="train the digits models only")
    p.add_argument("--report", action="store_true", help="only rewrite the report from the records")
    p.add_argument("--record", default="", metavar="PAGE", help="also write the report to PAGE")
    return p
