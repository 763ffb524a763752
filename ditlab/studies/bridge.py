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

import json
import os
import shutil
import sys

import matplotlib.pyplot as plt
import torch

from diffusion import create_diffusion

from ditlab.cli import COUNT, INDEX, NON_NEGATIVE, POSITIVE
from ditlab.checkpoints import load_model
from ditlab.data import write_digits_folder
from ditlab.features import DIGITS_CLASSIFIER
from ditlab.run import newest_run
from ditlab.studies import runner
from ditlab.studies.bridge_report import write_report
from ditlab.studies.digits_runs import DIGITS_REF, run_step
from ditlab.studies.runner import dispatch_of, run_jobs, study_parser
from ditlab.toy.evals import draw_samples
from ditlab.toy.readers import last_probe, load_metrics
from ditlab.toy.task import sample_error

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


def toy_key(variant, spread, seed):
    """A toy run's name in records and logs, e.g. toy-none-std0.3-s2."""
    return f"toy-{variant}-std{spread:g}-s{seed}"


def find_toy_run(args, variant, spread, seed):
    wanted = {"normalization": variant, "data_std": spread, "global_seed": seed, "max_steps": args.toy_steps}
    return newest_run(os.path.join(args.out, "toy-runs"), wanted)


def toy_command(args, variant, spread, seed):
    """train_toy.py's command for one toy run (the CPU preset at --toy-steps), or the resume of the one started."""
    run = find_toy_run(args, variant, spread, seed)
    if run:
        return [sys.executable, "train_toy.py", "--resume", run, "--threads", "1"]
    return [sys.executable, "train_toy.py", "--preset", "cpu", "--normalization", variant, "--data-std", f"{spread:g}",
            "--global-seed", str(seed), "--max-steps", str(args.toy_steps), "--eval-steps", str(args.toy_steps),
            "--sampling-steps", str(args.toy_sampling_steps),
            "--results-dir", os.path.join(args.out, "toy-runs"), "--threads", "1"]


def toy_record(args, run, spread):
    """What a toy run's record keeps: its EMA weights' last probe per timestep (eps error, the Gaussian
    optimum's and the excess over it, x0 error in 8-bit levels) and its samples. For the all-zero task those
    are train_toy.py's last evaluation (every value an error); for Gaussian data, --toy-samples drawn here
    from fixed noise without clipping (train_toy.py's clip to [-1, 1] suits only the all-zero task), whose
    variance is set against the data's."""
    probe = {t: {k: r[k] for k in ("eps_rel_error", "eps_excess_error", "eps_opt_error", "x0_rmse_8bit")}
             for t, r in last_probe(run).items()}
    if spread:
        model, _ = load_model(run, weights="ema")
        sampler = create_diffusion(str(args.toy_sampling_steps))
        samples = draw_samples(model.eval(), sampler, args.toy_samples, 0, torch.device("cpu"), clip=False)
        sample = dict(step=run_step(run), num_samples=args.toy_samples, **sample_error(samples, spread))
    else:
        sample = max((r for r in load_metrics(run) if r["weights"] == "ema"), key=lambda r: r["step"])
    return dict(run=os.path.basename(run), probe=probe,
                sample={k: sample[k] for k in ("step", "num_samples", "rms", "std", "var_ratio") if k in sample})


def toy_part(args):
    """Train and record every toy run (variant x spread x seed) without a record, --parallel at a time, each
    wave recorded before the next; returns {(variant, spread, seed): record}."""
    keys = {"toy_steps": args.toy_steps, "toy_sampling_steps": args.toy_sampling_steps, "toy_samples": args.toy_samples}
    runs = [(v, S, s) for s in args.seeds for S in args.spreads for v in TOY_VARIANTS]
    todo = [r for r in runs if runner.read_record(args.records, toy_key(*r), keys) is None]
    print(f"[bridge] toy: {len(runs) - len(todo)} of {len(runs)} runs recorded", flush=True)
    for i in range(0, 0 if args.report else len(todo), args.parallel):  # --report: the recorded runs only
        wave = todo[i:i + args.parallel]
        train = [r for r in wave if run_step(find_toy_run(args, *r)) < args.toy_steps]  # finished: record only
        names = [toy_key(*r) for r in train]
        run_jobs([toy_command(args, *r) for r in train], args.parallel, os.path.join(args.out, "logs"), names=names,
                 tags=names, append=True, **dispatch_of(args, parallel=False))
        for v, S, s in wave:
            record = dict(variant=v, spread=S, seed=s, **toy_record(args, find_toy_run(args, v, S, s), S))
            runner.write_record(args.records, toy_key(v, S, s), record, keys)
    return {r: runner.read_record(args.records, toy_key(*r), keys) for r in runs}


def analysis_command(args, run, out):
    """intervene.py's command for one digits model: the probe, every edit with its control, and samples
    under the edits at the final norm and the place they move most, scored against the digits."""
    return [sys.executable, "intervene.py", "--ckpt", run, "--data-path", args.digits_ref, "--eval-ref",
            args.digits_ref, "--eval-features", "digits", "--digits-classifier", args.digits_classifier,
            "--sample-places", "final.norm", "--sample-top", "1", "--probe-samples", str(args.probe_samples),
            "--stats-samples", "64", "--num-samples", str(args.num_samples), "--sampling-steps",
            str(args.sampling_steps), "--out", out, "--threads", "1", "--progress-every", "60"]


def digits_settings(args):
    return {k: getattr(args, k) for k in ("steps", "lr", "probe_samples", "num_samples", "sampling_steps")}


def digits_record(model):
    """What a digits model's record keeps from intervene.py's result: the probe per timestep, the signal to
    outlier ratio at every norm input, the blocks' largest max/median ratio, every edit and the samples."""
    errors = {r["t"]: {k: r[k] for k in ("eps_rel_error", "x0_rmse_8bit", "var_rel_error")}
              for r in model["probe"]["errors"]}
    norm_inputs = {}
    for r in model["probe"]["norm_inputs"]:
        norm_inputs.setdefault(r["layer"], {})[r["t"]] = dict(signal_to_outlier=r["signal_to_outlier"],
                                                              outlier_channel=r["outlier_channel"])
    blocks = [r["max_median_ratio"] for r in model["probe"]["outliers"] if r["layer"].startswith("block.")]
    return dict(probe=errors, norm_inputs=norm_inputs, max_median=max(blocks), baseline=model["baseline"],
                places=model["places"])


def digits_part(args):
    """Train every digits model without a record (--parallel at a time, seed by seed), analyse each wave with
    intervene.py and record it before the next wave; returns {(variant, seed): record}."""
    keys, models = digits_settings(args), digits_models(args)
    todo = [m for m in models if runner.read_record(args.records, "digits-" + digits_key(*m), keys) is None]
    print(f"[bridge] digits: {len(models) - len(todo)} of {len(models)} models recorded", flush=True)
    for i in range(0, 0 if args.report else len(todo), args.parallel):  # --report: the recorded models only
        wave = todo[i:i + args.parallel]
        runs = train_digits(args, wave)
        names = [digits_key(*m) for m in wave]
        outs = [os.path.join(args.out, "analysis", name) for name in names]
        print(f"[bridge] analysing {', '.join(names)}: probe, edits, samples under the edits", flush=True)
        run_jobs([analysis_command(args, runs[m], out) for m, out in zip(wave, outs)], args.parallel,
                 os.path.join(args.out, "logs"), names=[f"analysis-{n}" for n in names], tags=names,
                 **dispatch_of(args, parallel=False))
        for (v, s), name, out in zip(wave, names, outs):
            with open(os.path.join(out, "interventions.json")) as f:
                (model,) = json.load(f)["models"].values()
            record = dict(variant=v, seed=s, run=os.path.basename(runs[(v, s)]), **digits_record(model))
            if model.get("grids"):  # the samples under the edits, for the report's grid figure
                record["grid"] = f"digits-{name}.grid.npz"
                shutil.copyfile(os.path.join(out, model["grids"]), os.path.join(args.records, record["grid"]))
            os.makedirs(args.records, exist_ok=True)
            runner.write_record(args.records, "digits-" + name, record, keys)
    return {m: runner.read_record(args.records, "digits-" + digits_key(*m), keys) for m in models}


def run(args, extra=()):
    """The study: train what is missing, analyse what is trained, record, report (--report: records only)."""
    args.records = args.records or os.path.join(args.out, "records")
    if not os.path.isdir(args.digits_ref):
        write_digits_folder(args.digits_ref)
    plt.switch_backend("Agg")
    if args.train_only:
        return train_digits(args, digits_models(args))
    parts = {}
    if not args.skip_toy:
        parts["toy"] = toy_part(args)
    if not args.skip_digits:
        parts["digits"] = digits_part(args)
    return write_report(args, parts)


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
    p.add_argument("--toy-steps", type=COUNT, default=12000, help="training steps of the toy runs (CPU preset)")
    p.add_argument("--toy-sampling-steps", type=COUNT, default=1000,
                   help="DDPM steps of the toy runs' final samples (1000: the full chain, as the toy study)")
    p.add_argument("--toy-samples", type=COUNT, default=1000,
                   help="samples per toy run with Gaussian data, drawn without clipping to measure their variance")
    p.add_argument("--probe-samples", type=COUNT, default=256, help="digits the probe denoises at each timestep")
    p.add_argument("--num-samples", type=COUNT, default=500,
                   help="samples per model and per sampled edit, scored by FD-digits (the digits study's curve size)")
    p.add_argument("--sampling-steps", type=COUNT, default=100, help="their DDPM steps (the digits study's)")
    p.add_argument("--digits-ref", default=DIGITS_REF, help="the digits (train.py --demo writes them)")
    p.add_argument("--digits-classifier", default=DIGITS_CLASSIFIER)
    p.add_argument("--out", default="results/bridge")
    p.add_argument("--records", default=None, help="finished models' JSON records (default: <out>/records; the "
                   "measured study's are in docs/results/bridge_runs/)")
    p.add_argument("--train-only", action="store_true", help="train the digits models only")
    p.add_argument("--skip-toy", action="store_true", help="leave out the toy part")
    p.add_argument("--skip-digits", action="store_true", help="leave out the digits part")
    p.add_argument("--report", action="store_true", help="only rewrite the report from the records")
    p.add_argument("--record", default="", metavar="PAGE", help="also write the report to PAGE")
    return p
