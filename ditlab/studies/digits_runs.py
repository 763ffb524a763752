"""The digits study's single runs: train.py commands for the lr sweep and the final runs, sample_ddp.py
commands for the scored sample sets, and what is read back from a run (its FD-digits curve, its training
speed, the outliers of its EMA model). The phases that use them are in digits.py."""

import glob
import json
import os
import re
import statistics
import sys
from types import SimpleNamespace

import torch

from diffusion import create_diffusion
from ditlab.analysis import DEFAULT_TIMESTEPS, analyze_checkpoint
from ditlab.checkpoints import load_checkpoint
from ditlab.errors import DIVERGED_EXIT, JobError, UsageError
from ditlab.run import newest_run
from ditlab.files import read_log
from ditlab.studies.runner import dispatch_of, run_jobs

QUALITY = ("fd_digits", "precision", "recall", "accuracy")
DIGITS_REF = os.path.join("data", "digits")


def run_key(variant, lr, seed):
    """A run's name in records and logs, e.g. layer-norm-lr0.004-s1."""
    return f"{variant}-lr{lr:g}-s{seed}"


def run_settings(args, final):
    """(lr schedule, evaluation and checkpoint interval, gradient clipping) of the final runs or of the
    sweep's (constant lr, no clipping)."""
    if final:
        return args.lr_schedule, args.final_fid_every, args.grad_clip
    return "constant", args.fid_every, None


def find_run(args, variant, lr, seed, steps, final):
    """The newest run of this variant, lr, seed and lr schedule under <out>/runs (None if there is none
    yet). A constant-lr run of any length matches (seed 0's final run extends its sweep run: the run that
    would have gone there directly); a decaying run belongs to its own length."""
    schedule, _, clip = run_settings(args, final)
    wanted = {"normalization": variant, "lr": lr, "global_seed": seed, "lr_schedule": schedule, "grad_clip": clip}
    if schedule != "constant":
        wanted["max_steps"] = steps
    return newest_run(os.path.join(args.out, "runs"), wanted)


def run_step(run):
    return load_checkpoint(run, mmap=True)["step"] if run else 0


def train_command(args, variant, lr, seed, steps, final):
    """train.py's command for one run: a new demo run, or a resume of the existing one to `steps`."""
    run = find_run(args, variant, lr, seed, steps, final)
    schedule, every, clip = run_settings(args, final)
    spike = ["--stop-loss-ratio", f"{args.stop_loss_ratio:g}"] if final and args.stop_loss_ratio else []
    if run:
        return [sys.executable, "train.py", "--resume", run, "--max-steps", str(steps), "--threads", "1",
                "--ckpt-every", str(every), "--fid-every", str(every)] + spike
    return [sys.executable, "train.py", "--demo", "--data-path", args.digits_ref, "--normalization", variant, "--lr",
            f"{lr:g}", "--lr-schedule", schedule, "--global-seed",
            str(seed), "--max-steps", str(steps), "--results-dir", os.path.join(args.out, "runs"), "--threads", "1",
            "--sample-every", "0", "--ckpt-every", str(every), "--fid-every", str(every),
            "--fid-ref", args.digits_ref, "--fid-features", "digits", "--fid-num-samples", str(args.curve_samples),
            "--fid-sampling-steps", str(args.curve_sampling_steps), "--fid-cfg-scale", "1",
            "--digits-classifier", args.digits_classifier] + (["--grad-clip", f"{clip:g}"] if clip else []) + spike


def train_all(args, runs, final, diverged=None):
    """Train every (variant, lr, seed, steps) not yet at its step count (the final runs, or the sweep's),
    --parallel at a time, the runs with the most steps left first; returns {(variant, lr, seed): run dir}.
    A failed run stops the study (naming its log), except that with a `diverged` dict a run whose loss
    became non-finite or, in a final run, spiked past --stop-loss-ratio (train.py stops it with exit code
    DIVERGED_EXIT) is entered there, {(variant, lr,
    seed): where, from train.py's message}, and the others go on: a sweep that reaches a too-large lr learns
    that it diverges."""
    todo = [(steps - run_step(find_run(args, v, lr, s, steps, final)), v, lr, s, steps) for v, lr, s, steps in runs]
    todo = sorted((t for t in todo if t[0] > 0), key=lambda t: -t[0])
    print(f"[digits] training {len(todo)} of {len(runs)} runs ({sum(t[0] for t in todo):,} steps to go)", flush=True)
    log_dir, names = os.path.join(args.out, "logs"), [run_key(v, lr, s) for _, v, lr, s, _ in todo]
    codes = run_jobs([train_command(args, v, lr, s, steps, final) for _, v, lr, s, steps in todo], args.parallel,
                     log_dir, names=names, tags=names, append=True, check=diverged is None,
                     **dispatch_of(args, parallel=False))
    for (_, v, lr, s, _), name, code in zip(todo, names, codes or []):
        if code == 0:
            continue
        if code != DIVERGED_EXIT:
            raise JobError(f"{name} failed (exit {code}); its log: {os.path.join(log_dir, name + '.log')}")
        found = re.findall(r"loss became \S+ between steps \d+ and \d+(?:, \S+x its lowest logged value [^\s(]+)?",
                           read_log(os.path.join(log_dir, f"{name}.log")))
        diverged[(v, lr, s)] = found[-1] if found else f"loss became non-finite (exit {code})"
    return {(v, lr, s): find_run(args, v, lr, s, steps, final) for v, lr, s, steps in runs}


def fid_rows(run):
    """The FD-digits rows of a run's metrics.jsonl, by step."""
    rows = {}
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("kind") == "fid" and "fd_digits" in row:
                rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def curve(run, steps):
    """(step, FD-digits, accuracy) of a run's evaluations up to `steps`."""
    return [(r["step"], r["fd_digits"], r["accuracy"]) for r in fid_rows(run) if r["step"] <= steps]


def training_speed(run):
    """Median of the steps/s that a run's log.txt reports (training only: evaluations are left out)."""
    rates = []
    with open(os.path.join(run, "log.txt")) as f:
        for line in f:
            if " steps/s" in line:
                rates.append(float(line.split(" steps/s")[0].rsplit("| ", 1)[1]))
    return statistics.median(rates) if rates else None


def sample_folder(args, run, cfg, num, seed=0):
    name = f"{os.path.basename(run)}-cfg{cfg:g}-n{num}" + (f"-seed{seed}" if seed else "")
    return os.path.join(args.out, "samples", name)


def sample_command(args, run, cfg, num, seed=0):
    return [sys.executable, "sample_ddp.py", "--ckpt", run, "--device", "cpu", "--sample-dir",
            sample_folder(args, run, cfg, num, seed), "--num-fid-samples", str(num), "--per-proc-batch-size", "250",
            "--num-sampling-steps", str(args.sampling_steps), "--cfg-scale", f"{cfg:g}", "--global-seed", str(seed),
            "--eval-ref", args.digits_ref, "--eval-features", "digits", "--digits-classifier", args.digits_classifier]


def scored(folder):
    """(metrics, .npz path) of a scored sample folder, or None while it is not scored."""
    found = glob.glob(os.path.join(folder, "*.metrics.json"))
    if not found:
        return None
    with open(found[0]) as f:
        return json.load(f), found[0][: -len(".metrics.json")] + ".npz"


def sample_all(args, items):
    """Sample and score every (run, cfg, num[, seed]) not yet scored (with args.report: none, and a UsageError
    if one is missing); returns {item: (metrics, npz)}. The seed is sample_ddp.py's --global-seed (0 unless
    given: the study's sets; others measure the sampling noise)."""
    items = list(dict.fromkeys(items))  # guidance 1 is the unguided set: sampled once
    todo = [it for it in items if scored(sample_folder(args, *it)) is None]
    if todo and args.report:
        raise UsageError(f"{len(todo)} sample sets are not scored yet (e.g. {sample_folder(args, *todo[0])}); "
                         "run without --report")
    print(f"[digits] sampling {len(todo)} of {len(items)} sets ({args.sampling_steps} DDPM steps)", flush=True)
    run_jobs([sample_command(args, *it) for it in todo], args.parallel, os.path.join(args.out, "logs", "samples"),
             names=[os.path.basename(sample_folder(args, *it)) for it in todo],
             **dispatch_of(args, parallel=False))
    return {it: scored(sample_folder(args, *it)) for it in items}


def choose_cfg(args, run):
    """The guidance scale for every guided set: --cfg-scale if given, else the lowest FD-digits of `run`
    (the LayerNorm seed-0 final model) over --cfg-candidates at --cfg-samples samples; (scale, {g: FD})."""
    if args.cfg_scale is not None:
        return args.cfg_scale, {}
    sets = sample_all(args, [(run, g, args.cfg_samples) for g in args.cfg_candidates])
    fds = {g: sets[(run, g, args.cfg_samples)][0]["fd_digits"] for g in args.cfg_candidates}
    return min(fds, key=lambda g: (fds[g], g)), fds


def outlier_summary(per_timestep):
    """From outliers' per-timestep per-layer statistics ({t: {layer: stats}}): the largest |x|, max/median
    ratio and kurtosis of channel RMS over the blocks and timesteps, and the count of massive activations."""
    blocks = [s for per_layer in per_timestep.values() for name, s in per_layer.items() if name.startswith("block.")]
    return {k: max(s[k] for s in blocks) for k in ("max_abs", "max_median_ratio", "rms_kurtosis", "massive_count")}


def outliers_of(args, run):
    """Outlier statistics of one final model: EMA weights, a batch of 64 real digits noised to t = 50 ... 999
    (as analyze_embeddings.py --data-path DIGITS, in this process and without its plots)."""
    settings = SimpleNamespace(weights="ema", vae=None, batch_size=64, data_path=args.digits_ref, zero_data=False,
                               seed=0, class_labels=None, timesteps=list(DEFAULT_TIMESTEPS), top_k=5)
    _, _, result = analyze_checkpoint(run, settings, torch.device("cpu"), {}, create_diffusion(timestep_respacing=""))
    return outlier_summary(result.to_json()["stats"])
