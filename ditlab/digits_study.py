"""The digits study (digits_study.py, `make digits`): does a normalization variant change the quality of
trained image samples? Every variant of the digits demo at its own best learning rate, several seeds,
scored guided and unguided against the real-digit floor, with a memorisation check and the outliers.

The phases, each skipped where its output already exists (so an interrupted study continues):
  1. lr sweep: every variant at every --lrs, seed 0, --sweep-steps (FD-digits every --fid-every steps);
  2. the best lr of each variant: lowest FD-digits at --sweep-steps (a variant whose final run diverges
     steps down to the next lower --lrs value, all its seeds);
  3. final runs: every variant at its lr for every seed to --steps with --lr-schedule (cosine by default:
     annealed to zero at --steps; with constant, seed 0's sweep run is extended, the run that would have
     gone there directly) and --grad-clip (off by default);
  4. guidance: one scale for all, the best FD-digits of the LayerNorm seed-0 model over --cfg-candidates;
  5. sampling (sample_ddp.py, EMA weights) unguided and guided, scored by evaluate.py's digits route;
  6. memorisation (distance of every sample to its nearest training digit) and outliers (as
     analyze_embeddings.py on the real digits);
  7. sampling noise: every final model's unguided set drawn again at --noise-seeds (after each wave, while
     its run directories exist; again before the report for any model still short of them), then the report.
The length check (--lengths) compares the final runs of studies at several --steps.
"""

import glob
import json
import math
import os
import re
import statistics
import sys
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import torch

from diffusion import create_diffusion
from ditlab.analysis import DEFAULT_TIMESTEPS, analyze_checkpoint
from ditlab.checkpoints import load_checkpoint
from ditlab.data import write_digits_folder
from ditlab.evaluation import Evaluator
from ditlab.features import classifier_id, digits_rgb, real_digits, to_gray
from ditlab.files import provenance, write_json, write_page
from ditlab.jobs import read_log, run_jobs
from ditlab.run import newest_run
from ditlab.sampling import image_generators, image_labels
from ditlab.trainer import DIVERGED_EXIT

VARIANTS = ("layer-norm", "none", "rms-norm", "dyt", "derf")
COLORS = {"layer-norm": "tab:red", "none": "tab:blue", "rms-norm": "tab:green", "dyt": "tab:purple",
          "derf": "tab:orange"}
QUALITY = ("fd_digits", "precision", "recall", "accuracy")
DIGITS_REF = os.path.join("data", "digits")


#################################################################################
#                                  Training                                     #
#################################################################################

def run_key(variant, lr, seed):
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
                     log_dir, names=names, tags=names, append=True, check=diverged is None)
    for (_, v, lr, s, _), name, code in zip(todo, names, codes or []):
        if code == 0:
            continue
        if code != DIVERGED_EXIT:
            raise SystemExit(f"{name} failed (exit {code}); its log: {os.path.join(log_dir, name + '.log')}")
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


#################################################################################
#                               Sampling + scoring                              #
#################################################################################

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
    """Sample and score every (run, cfg, num[, seed]) not yet scored (with args.report: none, and a SystemExit
    if one is missing); returns {item: (metrics, npz)}. The seed is sample_ddp.py's --global-seed (0 unless
    given: the study's sets; others measure the sampling noise)."""
    items = list(dict.fromkeys(items))  # guidance 1 is the unguided set: sampled once
    todo = [it for it in items if scored(sample_folder(args, *it)) is None]
    if todo and args.report:
        raise SystemExit(f"{len(todo)} sample sets are not scored yet (e.g. {sample_folder(args, *todo[0])}); "
                         "run without --report")
    print(f"[digits] sampling {len(todo)} of {len(items)} sets ({args.sampling_steps} DDPM steps)", flush=True)
    run_jobs([sample_command(args, *it) for it in todo], args.parallel, os.path.join(args.out, "logs", "samples"),
             names=[os.path.basename(sample_folder(args, *it)) for it in todo])
    return {it: scored(sample_folder(args, *it)) for it in items}


def choose_cfg(args, run):
    """The guidance scale for every guided set: --cfg-scale if given, else the lowest FD-digits of `run`
    (the LayerNorm seed-0 final model) over --cfg-candidates at --cfg-samples samples; (scale, {g: FD})."""
    if args.cfg_scale is not None:
        return args.cfg_scale, {}
    sets = sample_all(args, [(run, g, args.cfg_samples) for g in args.cfg_candidates])
    fds = {g: sets[(run, g, args.cfg_samples)][0]["fd_digits"] for g in args.cfg_candidates}
    return min(fds, key=lambda g: (fds[g], g)), fds


#################################################################################
#                                 Memorisation                                  #
#################################################################################

def nearest_distances(samples, train, chunk=1024):
    """Euclidean distance of every row of `samples` to its nearest row of `train` (float64), and of every
    training row to its nearest other training row (leave-one-out): the second is what a sample that is
    as novel as a fresh draw from the data would show, the first is zero for a copy."""
    samples = torch.as_tensor(samples, dtype=torch.float64).flatten(1)
    train = torch.as_tensor(train, dtype=torch.float64).flatten(1)

    def nearest(x, exclude_self):
        out = []
        for i in range(0, len(x), chunk):
            d = torch.cdist(x[i:i + chunk], train, compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros
            if exclude_self:
                d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = math.inf
            out.append(d.min(1).values)
        return torch.cat(out).numpy()

    return nearest(samples, False), nearest(train, True)


def memorisation(npz_path, train=None):
    """Nearest-training-digit distances of a sample set in the demo's pixels (grey, [-1, 1], 16 x 16):
    the median, its ratio to the training digits' own median, and the share of samples closer to a
    training digit than 95% of training digits are to their nearest neighbour ("near-copies")."""
    if train is None:
        train = to_gray(torch.from_numpy(digits_rgb()[0]).permute(0, 3, 1, 2))
    with np.load(npz_path) as f:
        images = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2)
    to_sample, train_nn = nearest_distances(to_gray(images), train)
    threshold = np.quantile(train_nn, 0.05)
    return dict(median=float(np.median(to_sample)), train_median=float(np.median(train_nn)),
                ratio=float(np.median(to_sample) / np.median(train_nn)),
                near_copies=float((to_sample < threshold).mean()), threshold=float(threshold))


#################################################################################
#                                    Outliers                                   #
#################################################################################

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


#################################################################################
#                                     Study                                     #
#################################################################################

# A finished run is kept as a small JSON record (curve, scores, memorisation, outliers, speed) in
# --records, so that the study continues across machines and sessions where the run directories (tens of
# MB each) do not travel: a record is never recomputed, and the report is built from records alone.
SWEEP_SETTINGS = ("sweep_steps", "fid_every", "curve_samples", "curve_sampling_steps")
FINAL_SETTINGS = (*SWEEP_SETTINGS, "steps", "lr_schedule", "final_fid_every", "samples", "sampling_steps", "grad_clip")
GUIDANCE_SETTINGS = (*FINAL_SETTINGS, "cfg_candidates", "cfg_samples")


def spread(values):
    return dict(mean=statistics.fmean(values), min=min(values), max=max(values), values=list(values))


def record_path(args, name):
    return os.path.join(args.records, f"{name}.json")


def read_record(args, name, keys):
    """The record `name`, or None; a record made with other settings (keys) is refused, not reused."""
    path = record_path(args, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    differ = {k: (record["settings"].get(k), getattr(args, k)) for k in keys if record["settings"].get(k) != getattr(args, k)}
    if differ:
        raise SystemExit(f"{path} was made with other settings ({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in differ.items())}); "
                         "pass another --records folder (or the same settings)")
    return record


def write_record(args, name, record, keys):
    """The record `name` with the settings it was made with, its provenance and the fingerprint of the digits
    classifier that scored it (None where none exists yet)."""
    os.makedirs(args.records, exist_ok=True)
    scorer = classifier_id(args.digits_classifier) if os.path.isfile(args.digits_classifier) else None
    write_json(record_path(args, name), {**record, "settings": {k: getattr(args, k) for k in keys},
                                         "digits_classifier": scorer, "provenance": provenance()})


def training_speed(run):
    """Median of the steps/s that a run's log.txt reports (training only: evaluations are left out)."""
    rates = []
    with open(os.path.join(run, "log.txt")) as f:
        for line in f:
            if " steps/s" in line:
                rates.append(float(line.split(" steps/s")[0].rsplit("| ", 1)[1]))
    return statistics.median(rates) if rates else None


def lr_sweep(args):
    """Phase 1: {(variant, lr): record} of the seed-0 runs at --sweep-steps. A run that has finished gets
    its record first (also with --report, so that a study cut short keeps what it finished); then the
    rest is trained, --parallel runs at a time, each wave recorded before the next."""
    def missing():
        return [(v, lr) for v in args.variants for lr in args.lrs
                if read_record(args, "sweep-" + run_key(v, lr, 0), SWEEP_SETTINGS) is None]

    def keep(v, lr, run):
        write_record(args, "sweep-" + run_key(v, lr, 0), dict(variant=v, lr=lr, seed=0, run=os.path.basename(run),
                     curve=curve(run, args.sweep_steps), steps_per_s=training_speed(run)), SWEEP_SETTINGS)

    for v, lr in missing():
        run = find_run(args, v, lr, 0, args.sweep_steps, final=False)
        if run_step(run) >= args.sweep_steps:
            keep(v, lr, run)
    todo = missing()
    total = len(args.variants) * len(args.lrs)
    print(f"[digits] lr sweep: {total - len(todo)} of {total} runs recorded, {len(todo)} to train", flush=True)
    if todo and args.report:
        raise SystemExit(f"the lr sweep has not finished ({', '.join(run_key(v, lr, 0) for v, lr in todo)}); "
                         "run without --report")
    for i in range(0, len(todo), args.parallel):  # in waves, each recorded before the next starts (run
        wave = todo[i:i + args.parallel]           # directories do not outlive a session; records do)
        diverged = {}
        runs = train_all(args, [(v, lr, 0, args.sweep_steps) for v, lr in wave], final=False, diverged=diverged)
        for v, lr in wave:
            if (v, lr, 0) in diverged:  # a result of the sweep (this lr is too large), kept like any other,
                run = runs[(v, lr, 0)]      # with its evaluations up to its last checkpoint, if it made one
                write_record(args, "sweep-" + run_key(v, lr, 0), dict(
                    variant=v, lr=lr, seed=0, run=run and os.path.basename(run), steps_per_s=None,
                    curve=curve(run, args.sweep_steps) if run else [], diverged=diverged[(v, lr, 0)]), SWEEP_SETTINGS)
            else:
                keep(v, lr, runs[(v, lr, 0)])
    return {(v, lr): read_record(args, "sweep-" + run_key(v, lr, 0), SWEEP_SETTINGS)
            for v in args.variants for lr in args.lrs}


def sweep_fd(args, record):
    """FD-digits of a sweep run at --sweep-steps; infinite for a run that diverged."""
    if record.get("diverged"):
        return math.inf
    return [c[1] for c in record["curve"] if c[0] == args.sweep_steps][0]


def best_lrs(args, sweep):
    """Per variant, the lr whose seed-0 run has the lowest FD-digits at --sweep-steps (ties: the lower lr;
    a diverged run is the worst)."""
    best = {v: min(args.lrs, key=lambda lr: (sweep_fd(args, sweep[(v, lr)]), lr)) for v in args.variants}
    for v, lr in best.items():
        if sweep[(v, lr)].get("diverged"):
            raise SystemExit(f"every lr of the sweep diverged for {v} ({', '.join(f'{x:g}' for x in args.lrs)}); "
                             "pass lower --lrs")
    return best


def final_lrs(args, best):
    """Per variant, the lr of its final runs: the sweep's best (best_lrs), stepped down to the next lower
    --lrs value for as long as a final run of the variant at that lr has diverged (recorded as such): a short
    sweep cannot see a divergence that comes later in a long run, and one lr serves all of a variant's seeds.
    Returns ({variant: lr}, {variant: [the diverged final records it stepped past]})."""
    lrs, stepped = {}, {}
    for v, top in best.items():
        for lr in sorted((x for x in args.lrs if x <= top), reverse=True):
            bad = [r for r in (read_record(args, "final-" + run_key(v, lr, s), FINAL_SETTINGS) for s in args.seeds)
                   if r and r.get("diverged")]
            if not bad:
                lrs[v] = lr
                break
            stepped.setdefault(v, []).extend(bad)
        else:
            raise SystemExit(f"{v}: a final run diverged at every lr up to its sweep's best {top:g} "
                             f"({', '.join(run_key(v, r['lr'], r['seed']) for r in stepped[v])}); pass lower --lrs")
    return lrs, stepped


def final_runs(args, best):
    """Phases 3-6 for every (variant, seed) without a record, --parallel runs at a time (a wave): train,
    choose the guidance scale (once, after the wave holding its model), sample, score, memorisation,
    outliers, and write each run's record before the next wave starts (so a study cut short keeps every
    finished wave); phase 7 (sampling_noise) for each wave after its records, and once before the first
    wave for every model recorded earlier whose run directory is here. A run that diverges is recorded as
    such and its variant goes on at the next lower lr (final_lrs), all its seeds. Returns ({(variant, seed):
    record}, the guidance record); with --report, trains nothing and returns the recorded runs only (and no
    guidance record when there are none)."""
    def missing(lrs):
        return [(v, s) for s in args.seeds for v in args.variants
                if read_record(args, "final-" + run_key(v, lrs[v], s), FINAL_SETTINGS) is None]

    lrs, _ = final_lrs(args, best)
    if args.report:  # the study spans sessions: report the recorded runs (the report names the rest)
        done = {(v, s): read_record(args, "final-" + run_key(v, lrs[v], s), FINAL_SETTINGS)
                for s in args.seeds for v in args.variants if (v, s) not in missing(lrs)}
        return done, (recorded_guidance(args) if done else None)
    # phase 7 first for the models recorded earlier whose run directories are here (a study begun before
    # phase 7 followed each wave, or one cut off between a wave's records and its noise sets)
    recorded = {(v, s): r for s in args.seeds for v in args.variants
                if (r := read_record(args, "final-" + run_key(v, lrs[v], s), FINAL_SETTINGS)) and "unguided" in r}
    if recorded:
        sampling_noise(args, recorded)
    first = ("layer-norm" if "layer-norm" in args.variants else args.variants[0], args.seeds[0])
    train = to_gray(torch.from_numpy(digits_rgb()[0]).permute(0, 3, 1, 2))
    while todo := sorted(missing(lrs), key=lambda vs: vs != first):  # guidance is chosen on `first`: its wave first
        wave, diverged = {vs: lrs[vs[0]] for vs in todo[:args.parallel]}, {}
        runs = train_all(args, [(v, lr, s, args.steps) for (v, s), lr in wave.items()], final=True, diverged=diverged)
        for (v, lr, s), why in diverged.items():
            run = runs[(v, lr, s)]
            write_record(args, "final-" + run_key(v, lr, s), dict(variant=v, lr=lr, seed=s, diverged=why,
                         run=run and os.path.basename(run)), FINAL_SETTINGS)
            print(f"[digits] {run_key(v, lr, s)} diverged ({why}): {v} goes on at a lower lr", flush=True)
        lrs, _ = final_lrs(args, best)  # a variant with a diverged run: its other seeds of this wave wait for it
        wave = [(v, s) for (v, s), lr in wave.items() if (v, lr, s) not in diverged and lr == lrs[v]]
        if first not in wave and recorded_guidance(args) is None and args.cfg_scale is None:
            continue  # the guidance model diverged: the next wave trains it at its lower lr, then samples these
        cfg = guidance(args, lrs)
        sets = sample_all(args, [(runs[(v, lrs[v], s)], g, args.samples) for v, s in wave for g in (1.0, cfg["scale"])])
        for v, s in wave:
            run = runs[(v, lrs[v], s)]
            record = dict(variant=v, lr=lrs[v], seed=s, run=os.path.basename(run), curve=curve(run, args.steps),
                          steps_per_s=training_speed(run), outliers=outliers_of(args, run), cfg_scale=cfg["scale"])
            for name, g in (("unguided", 1.0), ("guided", cfg["scale"])):
                metrics, npz = sets[(run, g, args.samples)]
                record[name] = dict({k: metrics[k] for k in QUALITY}, memorisation=memorisation(npz, train))
            save_grid_images(args, "final-" + run_key(v, lrs[v], s), sets[(run, cfg["scale"], args.samples)][1])
            write_record(args, "final-" + run_key(v, lrs[v], s), record, FINAL_SETTINGS)
        # phase 7 for this wave now, while its run directories are here (they may not last to the study's end)
        sampling_noise(args, {(v, s): read_record(args, "final-" + run_key(v, lrs[v], s), FINAL_SETTINGS)
                              for v, s in wave})
    cfg = guidance(args, lrs)
    return {(v, s): read_record(args, "final-" + run_key(v, lrs[v], s), FINAL_SETTINGS)
            for s in args.seeds for v in args.variants}, cfg


def recorded_guidance(args):
    """The guidance record, or None. It is never replaced: another --cfg-scale would leave the recorded final
    runs guided at the old scale, so it is refused."""
    record = read_record(args, "guidance", GUIDANCE_SETTINGS)
    if record is not None and args.cfg_scale not in (None, record["scale"]):
        raise SystemExit(f"{record_path(args, 'guidance')}: this study guides at {record['scale']:g}, not --cfg-scale "
                         f"{args.cfg_scale:g} (its final records were guided at it); pass --cfg-scale "
                         f"{record['scale']:g}, or another --records folder for another scale")
    return record


def guidance(args, lrs):
    """Phase 4, once: the guidance record {"scale", "candidates"} (--cfg-scale, or chosen by choose_cfg on the
    first variant's first-seed final run, which must then be here)."""
    keys = GUIDANCE_SETTINGS
    record = recorded_guidance(args)
    if record is not None:
        return record
    if args.report:
        raise SystemExit("no guidance record yet; run without --report")
    variant = "layer-norm" if "layer-norm" in args.variants else args.variants[0]
    run = find_run(args, variant, lrs[variant], args.seeds[0], args.steps, final=True)
    if args.cfg_scale is None and run_step(run) < args.steps:
        raise SystemExit(f"choosing the guidance scale needs the {variant} seed-{args.seeds[0]} final run; "
                         "rerun with that seed included")
    scale, fds = choose_cfg(args, run)
    write_record(args, "guidance", dict(scale=scale, candidates={f"{g:g}": fd for g, fd in fds.items()}), keys)
    return read_record(args, "guidance", keys)


def sampling_noise(args, finals):
    """Phase 7: the unguided set of every final model drawn again at each --noise-seeds (sample_ddp.py's
    --global-seed; the study's own sets are seed 0) and scored the same way, so that the spread of one model's
    FD-digits over sample sets can be set against the spread between training seeds, and a comparison of
    two models rests on more than one set. Kept as noise-<run>.json beside the run's record, topped up when
    more seeds are asked for; a run whose directory is gone (another session's machine) keeps what it has.
    Returns {(variant, seed): {sample seed: metrics}} with seed 0 from the final record."""
    keys, noise, todo = FINAL_SETTINGS, {}, []
    for (v, s), record in finals.items():
        name = "noise-" + run_key(v, record["lr"], s)
        kept = (read_record(args, name, keys) or {}).get("sets", {})
        missing = [seed for seed in args.noise_seeds if str(seed) not in kept]
        run = None if args.report or not missing else find_run(args, v, record["lr"], s, args.steps, final=True)
        if missing and run_step(run) >= args.steps:
            todo.append((v, s, name, run, kept, missing))
        noise[(v, s)] = {0: {k: record["unguided"][k] for k in QUALITY}, **{int(k): m for k, m in kept.items()}}
    if todo:
        sets = sample_all(args, [(run, 1.0, args.samples, seed) for *_, run, _, missing in todo for seed in missing])
        for v, s, name, run, kept, missing in todo:
            kept = {**kept, **{str(seed): {k: sets[(run, 1.0, args.samples, seed)][0][k] for k in QUALITY}
                               for seed in missing}}
            write_record(args, name, dict(variant=v, lr=finals[(v, s)]["lr"], seed=s, run=os.path.basename(run),
                                          sets=kept), keys)
            noise[(v, s)].update({int(k): m for k, m in kept.items()})
    return noise


def save_grid_images(args, name, npz_path, per_class=4):
    """The first `per_class` guided samples of every digit (the report's grid), kept beside the record."""
    with np.load(npz_path) as f:
        images, labels = f["arr_0"], f["arr_1"]
    picks = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    os.makedirs(args.records, exist_ok=True)
    np.savez_compressed(os.path.join(args.records, f"{name}.grid.npz"), images=images[picks], labels=labels[picks])


def run_study(args):
    """Every phase (module docstring); with args.report only reads the records. Returns the summary dict
    (also written to <out>/summary.json)."""
    if not os.path.isdir(args.digits_ref):  # the demo's data and the reference: written once, before any run
        write_digits_folder(args.digits_ref)
    sweep = lr_sweep(args)
    lrs = best_lrs(args, sweep)
    summary = dict(provenance=provenance(), settings=settings_of(args), best_lr=lrs,
                   sweep={run_key(v, lr, 0): r for (v, lr), r in sweep.items()})
    if args.sweep_only:
        return write_report(args, summary)
    finals, cfg = final_runs(args, lrs)
    summary["final_lr"], stepped = final_lrs(args, lrs)
    summary["stepped_down"] = {v: [f"{run_key(v, r['lr'], r['seed'])} {r['diverged']}" for r in bad]
                               for v, bad in stepped.items()}
    summary["missing"] = [f"{v} s{s}" for s in args.seeds for v in args.variants if (v, s) not in finals]
    if not finals:
        return write_report(args, summary)
    summary.update(cfg_scale=cfg["scale"], cfg_candidates=cfg["candidates"], floor=real_floor(args),
                   runs={f"{v} s{s}": r for (v, s), r in finals.items()})
    summary["table"] = final_table(summary, args.variants)
    summary["classifiers"] = {"floor": classifier_id(args.digits_classifier),
                              **{f"{v} s{s}": r.get("digits_classifier") for (v, s), r in finals.items()}}
    summary["noise"] = {f"{v} s{s}": {str(k): m for k, m in sorted(sets.items())}
                        for (v, s), sets in sampling_noise(args, finals).items() if len(sets) > 1}
    sample_seeds = {0} | {int(k) for sets in summary["noise"].values() for k in sets}  # also seeds kept from before
    summary["floor_at_labels"] = {str(k): real_floor(args, k) for k in sorted(sample_seeds)}
    return write_report(args, summary)


def settings_of(args):
    keys = ("variants", "seeds", "lrs", "sweep_steps", "steps", "lr_schedule", "grad_clip", "stop_loss_ratio", "fid_every",
            "final_fid_every",
            "curve_samples", "curve_sampling_steps", "samples", "sampling_steps", "cfg_candidates", "cfg_samples",
            "noise_seeds")
    return {k: getattr(args, k) for k in keys}


def curve(run, steps):
    """(step, FD-digits, accuracy) of a run's evaluations up to `steps`."""
    return [(r["step"], r["fd_digits"], r["accuracy"]) for r in fid_rows(run) if r["step"] <= steps]


def real_floor(args, sample_seed=None):
    """Real digits (features.real_digits, --samples of them) scored against the same reference: balanced
    classes, or with sample_seed the class counts of the sets sample_ddp.py draws at that --global-seed
    (set_labels), the floor a perfect model sampled at those labels reaches."""
    counts = None if sample_seed is None else np.bincount(set_labels(args.samples, sample_seed), minlength=10)
    images, labels = real_digits(args.samples, 0, counts)
    evaluator = Evaluator(args.digits_ref, features="digits", digits_classifier=args.digits_classifier, device="cpu",
                          progress=False)
    return {k: float(v) for k, v in evaluator(images, labels).items() if k in QUALITY}


def set_labels(num, sample_seed):
    """The class labels of a set of `num` digits sample_ddp.py draws at --global-seed `sample_seed`: at
    random, as the reference DiT and ADM's samplers draw them, so every set of one seed has the same labels
    (whatever the model) and their counts are uneven (81 to 123 per class for seed 0 at 1,000)."""
    return np.asarray(image_labels(image_generators(sample_seed, range(num)), 10))


def final_table(summary, variants):
    """Per variant: each metric of both sample sets, memorisation, outliers and training speed, mean/min/max
    over seeds."""
    table = {}
    for v in variants:
        runs = [r for r in summary["runs"].values() if r["variant"] == v]
        if not runs:  # not yet measured
            continue
        row = dict(lr=runs[0]["lr"], seeds=[r["seed"] for r in runs])
        for name in ("unguided", "guided"):
            row[name] = {k: spread([r[name][k] for r in runs]) for k in QUALITY}
            row[name]["near_copies"] = spread([r[name]["memorisation"]["near_copies"] for r in runs])
            row[name]["nn_ratio"] = spread([r[name]["memorisation"]["ratio"] for r in runs])
        for k in ("max_median_ratio", "rms_kurtosis", "max_abs"):
            row[k] = spread([r["outliers"][k] for r in runs])
        row["steps_per_s"] = spread([r["steps_per_s"] for r in runs])
        last = [r["curve"][-1] for r in runs]
        quarter = [max(c for c in r["curve"] if c[0] <= 0.75 * r["curve"][-1][0]) for r in runs]
        row["last_quarter_fd_change"] = spread([(a[1] - b[1]) / b[1] for a, b in zip(last, quarter)])
        table[v] = row
    return table


#################################################################################
#                                    Report                                     #
#################################################################################

def fmt(d, digits=3):
    return f"{d['mean']:.{digits}g} [{d['min']:.{digits}g}, {d['max']:.{digits}g}]"


def sweep_lines(summary, args):
    lines = ["## 1. Learning rate per variant (seed 0)", "",
             f"FD-digits of {args.curve_samples} unguided EMA samples ({args.curve_sampling_steps} DDPM steps) at "
             f"step {args.sweep_steps}; the lowest (bold) is the variant's lr for the final runs (unless one of them "
             "diverged there: section 2 says). Diverged: the "
             "training loss became non-finite and train.py stopped the run (where, in the run's record; a final run "
             "also stops at a finite blow-up, --stop-loss-ratio).", "",
             "| variant | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |",
             "|---|" + "---:|" * len(args.lrs)]
    for v in args.variants:
        cells = []
        for lr in args.lrs:
            record = summary["sweep"][run_key(v, lr, 0)]
            fd = "diverged" if record.get("diverged") else f"{sweep_fd(args, record):.3g}"
            cells.append(f"**{fd}**" if lr == summary["best_lr"][v] else fd)
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines + ["", "![lr sweep](lr_sweep.png)", ""]


def classifier_lines(classifiers):
    """A warning when the floor and the runs were not all scored with one digits classifier (a classifier
    trained on another CPU is another classifier: FD-digits moves by 1-3%)."""
    floor = classifiers.get("floor")
    others = {}
    for run, scorer in classifiers.items():
        if run != "floor" and scorer != floor:
            others.setdefault(scorer, []).append(run)
    if not others:
        return []
    parts = [f"{', '.join(runs)} with {scorer}" if scorer else f"{', '.join(runs)} with one not recorded (written "
             "before records kept it; the record's provenance names the machine)" for scorer, runs in others.items()]
    return [f"**Not all scored with one digits classifier**: the floor and the other runs with {floor}; "
            + "; ".join(parts) + ". A classifier retrained on another CPU moves FD-digits by 1-3%, so differences "
            "of that size between these runs and the rest are not evidence.", ""]


def final_lines(summary, args):
    table, floor = summary["table"], summary["floor"]
    lines = [f"## 2. Trained models: {args.steps} steps ({args.lr_schedule} lr), seeds {args.seeds}", "",
             f"{args.samples} samples per run from the EMA weights ({args.sampling_steps} DDPM steps), unguided and "
             f"guided at scale {summary['cfg_scale']:g}, scored against the 1,797 digits with the digits classifier's "
             "features (FD-digits, precision and recall at k = 3) and its accuracy on the labels the samples were "
             "drawn for; mean [min, max] over seeds. Real digits: the same number of training digits scored the "
             "same way (the floor a perfect model reaches), with balanced classes and with the class counts of the "
             "sets. The sets' labels are drawn at random (sample_ddp.py, as the reference DiT and ADM do), the same "
             "labels for every run, so an uneven draw raises every row by about as much: it does not favour a "
             "variant, but a "
             "perfect model sampled at these labels scores the second floor, not the first.", ""]
    if summary["missing"]:
        lines += [f"**Not yet measured** ({len(summary['missing'])} of {len(args.variants) * len(args.seeds)} final "
                  "runs; the tables use the recorded ones, the seeds column says which): "
                  f"{', '.join(summary['missing'])}.", ""]
    lines += classifier_lines(summary.get("classifiers") or {})
    if summary.get("stepped_down"):
        lines += ["**Trained below the sweep's best lr**: a final run diverged there, so every seed of the variant "
                  "trains at the next lower lr: " + "; ".join(f"{v} at {summary['final_lr'][v]:g} ({', '.join(why)})"
                                                             for v, why in summary["stepped_down"].items()) + ".", ""]
    if summary["cfg_candidates"]:
        cands = ", ".join(f"{g}: {fd:.3g}" for g, fd in summary["cfg_candidates"].items())
        lines += [f"Guidance scale chosen on {'layer-norm' if 'layer-norm' in args.variants else args.variants[0]} "
                  f"seed {args.seeds[0]} by FD-digits of {args.cfg_samples} samples ({cands}).", ""]
    for name in ("unguided", "guided"):
        lines += [f"### {name.capitalize()}", "", "| variant | lr | seeds | FD-digits | precision | recall | accuracy |",
                  "|---|---:|---|---|---|---|---|"]
        for v, row in table.items():
            q = row[name]
            lines.append(f"| {v} | {row['lr']:g} | {' '.join(map(str, row['seeds']))} | {fmt(q['fd_digits'])} | "
                         f"{fmt(q['precision'])} | {fmt(q['recall'])} | {fmt(q['accuracy'])} |")
        floors = [("real digits, balanced", floor)]
        if "0" in summary.get("floor_at_labels", {}):  # summaries written before it was measured lack it
            floors.append(("real digits, the sets' labels", summary["floor_at_labels"]["0"]))
        lines += [f"| {name} | - | - | {f['fd_digits']:.3g} | {f['precision']:.3g} | {f['recall']:.3g} | "
                  f"{f['accuracy']:.3g} |" for name, f in floors] + [""]
    lines += ["### Converged? Memorisation? Outliers?", "",
              "Last-quarter change: relative change of FD-digits (curve samples) over the last quarter of training "
              "(negative: still improving" + ("; under the cosine schedule the lr is small there, so a small change is "
              "partly by construction: the curves show whether it had flattened before" if args.lr_schedule == "cosine"
              else "") + "). Nearest-digit ratio: median distance of a guided sample to its nearest "
              "training digit over the training digits' own median nearest-neighbour distance (1: as novel as a "
              "fresh digit, 0: copies); near-copies: share of guided samples closer to a training digit than 95% "
              "of training digits are to theirs (5% for fresh digits). Outliers: over the blocks, EMA weights, the "
              "real digits noised to t = 50 ... 999 (analyze_embeddings.py).", "",
              "| variant | last-quarter FD change | nearest-digit ratio | near-copies | max/median | RMS kurtosis |",
              "|---|---|---|---|---|---|"]
    for v, row in table.items():
        lines.append(f"| {v} | {fmt(row['last_quarter_fd_change'], 2)} | {fmt(row['guided']['nn_ratio'], 2)} | "
                     f"{fmt(row['guided']['near_copies'], 2)} | {fmt(row['max_median_ratio'])} | "
                     f"{fmt(row['rms_kurtosis'])} |")
    return lines + noise_lines(summary) + ["", "![quality over training](curves.png)", "",
                                           "![guided samples](grid.png)", ""]


def noise_lines(summary):
    """The sampling-noise section: every model's unguided FD-digits over its sample sets; per variant the
    spread within one model against the spread between training seeds, both raw and as the excess over the
    real digits at the set's labels (sets of different seeds have different labels, which alone moves
    FD-digits); and each variant minus layer-norm at the same sample seeds (same labels: the label effect
    cancels), the comparison the noise allows."""
    noise = summary.get("noise") or {}
    if not noise:
        return []
    seeds = sorted({int(k) for sets in noise.values() for k in sets})
    floors = {int(k): f["fd_digits"] for k, f in (summary.get("floor_at_labels") or {}).items()}
    lines = ["", "### Sampling noise: one model, several sample sets", "",
             f"Unguided FD-digits of each final model drawn again at sample seeds {', '.join(map(str, seeds[1:]))} "
             f"(sample_ddp.py --global-seed; seed 0 is the set in the tables above), {summary['settings']['samples']} "
             "samples each. Within: the range of one model's sets (mean over its seeds); between: the range over "
             "training seeds of the per-model means."]
    by_variant = {}
    for v in summary["table"]:
        runs = {key: sets for key, sets in noise.items() if key.rsplit(" s", 1)[0] == v}
        if runs:
            by_variant[v] = {key: {int(k): m["fd_digits"] for k, m in sets.items()} for key, sets in runs.items()}
    have_floors = all(k in floors for sets in by_variant.values() for fds in sets.values() for k in fds)
    if have_floors:
        lines[-1] += (" Each seed draws other labels, and the labels alone move FD-digits: real digits at each "
                      "seed's class counts score " + ", ".join(f"{floors[k]:.3g} (seed {k})" for k in seeds) +
                      ". Excess: a set's FD-digits minus the real digits' at its labels (FD is not additive, so "
                      "this removes the label effect only to first order).")
    lines[-1] += (" Minus layer-norm: the variant's mean over training seeds minus layer-norm's at the same sample "
                  "seed (same labels, so the label effect cancels), mean [min, max] over sample seeds.")
    header = "| variant | FD-digits, mean of sets | within one model | between seeds |"
    rule = "|---|---|---:|---:|"
    if have_floors:
        header += " excess, mean | excess within | excess between |"
        rule += "---|---:|---:|"
    lines += ["", header + " minus layer-norm | per model: sets (mean) |", rule + "---|---|"]
    base = by_variant.get("layer-norm")
    for v, runs in by_variant.items():
        row = [v, *spread_cells(runs)]
        if have_floors:
            row += spread_cells({key: {k: fd - floors[k] for k, fd in fds.items()} for key, fds in runs.items()})
        paired = paired_gaps(runs, base) if base and v != "layer-norm" else []  # needs no floor: same labels
        row.append(fmt(spread(paired)) if paired else "-")
        row.append("; ".join(f"s{key.rsplit(' s', 1)[1]}: {' '.join(f'{x:.3g}' for _, x in sorted(fds.items()))} "
                             f"({statistics.fmean(fds.values()):.3g})" for key, fds in runs.items()))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def spread_cells(runs):
    """(mean of sets as mean [min, max] over models, within-model range, between-model range) of
    {model: {sample seed: value}}, formatted."""
    means = [statistics.fmean(x.values()) for x in runs.values()]
    within = statistics.fmean(max(x.values()) - min(x.values()) for x in runs.values())
    return [fmt(spread(means)), f"{within:.3g}", f"{max(means) - min(means):.3g}"]


def paired_gaps(runs, base):
    """Per sample seed that every model of both variants was drawn at: the mean over `runs`' models minus
    the mean over `base`'s ({model: {sample seed: FD}} each); [] when no seed is shared by all."""
    shared = set.intersection(*(set(x) for x in [*runs.values(), *base.values()]))
    return [statistics.fmean(x[k] for x in runs.values()) - statistics.fmean(x[k] for x in base.values())
            for k in sorted(shared)]


def write_report(args, summary):
    """summary.md, summary.json and the figures in --out; with --record PAGE, the page and its figures in
    the page's ../figures/ named after it (docs/results/digits.md: docs/figures/digits_curves.png, ...; another
    page, such as a length check's, keeps the main study's figures)."""
    os.makedirs(args.out, exist_ok=True)
    plot_sweep(summary, args, os.path.join(args.out, "lr_sweep.png"))
    lines = ["# The digits study: normalization variants on trained digit models", "", summary["provenance"], "",
             *sweep_lines(summary, args)]
    if "table" not in summary and summary.get("missing"):
        lines += ["## 2. Trained models", "", f"No final run recorded yet ({len(summary['missing'])} to measure).", ""]
    if "table" in summary:
        plot_curves(summary, args, os.path.join(args.out, "curves.png"))
        plot_grid(summary, args, os.path.join(args.out, "grid.png"))
        lines += final_lines(summary, args)
    text = "\n".join(lines)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(args.out, "summary.json"), summary)
    if args.record:
        prefix = os.path.splitext(os.path.basename(args.record))[0]
        write_page(args.record, text, args.out, {f"{n}.png": f"{prefix}_{n}.png" for n in ("lr_sweep", "curves", "grid")})
    print(text)
    return summary


def plot_sweep(summary, args, path):
    """FD-digits over training for every lr, one panel per variant (seed 0)."""
    fig, axes = plt.subplots(1, len(args.variants), figsize=(3.2 * len(args.variants), 3.2), sharey=True, squeeze=False)
    for ax, v in zip(axes[0], args.variants):
        for lr in args.lrs:
            record = summary["sweep"][run_key(v, lr, 0)]
            pts = record["curve"]
            style = dict(lw=2.2) if lr == summary["best_lr"][v] else dict(lw=1, alpha=0.7)
            label = f"lr {lr:g}" + (" (diverged)" if record.get("diverged") else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label, **style)
        ax.set_yscale("log")
        ax.set_title(v, fontsize=9, color=COLORS.get(v))
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("FD-digits (unguided)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(summary, args, path):
    """FD-digits and accuracy over training: per variant the mean over seeds (line) and the range (band)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for v in summary["table"]:
        curves = [r["curve"] for r in summary["runs"].values() if r["variant"] == v]
        steps = sorted(set.intersection(*[{c[0] for c in cur} for cur in curves]))
        for ax, k in zip(axes, (1, 2)):
            vals = np.array([[dict((c[0], c[k]) for c in cur)[s] for s in steps] for cur in curves])
            ax.plot(steps, vals.mean(0), color=COLORS.get(v), label=v)
            ax.fill_between(steps, vals.min(0), vals.max(0), color=COLORS.get(v), alpha=0.2)
    floor = summary["floor"]
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"FD-digits ({args.curve_samples} unguided samples)")
    axes[1].set_ylabel("accuracy on the intended labels")
    axes[1].axhline(floor["accuracy"], color="0.4", ls="--", lw=1, label="real digits")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tile_by_class(images, labels, per_class, gap=2, fill=96):
    """The first `per_class` images of each digit 0-9 (N, H, W, C uint8) as one uint8 picture: a column per
    digit, a row per pick, `gap` pixels of grey `fill` around every cell (so neighbouring digits read as
    separate images, and a missing pick as an empty cell, not as a black digit)."""
    _, h, w, c = images.shape
    canvas = np.full((gap + per_class * (h + gap), gap + 10 * (w + gap), c), fill, np.uint8)
    for digit in range(10):
        for row, image in enumerate(images[labels == digit][:per_class]):
            y, x = gap + row * (h + gap), gap + digit * (w + gap)
            canvas[y:y + h, x:x + w] = image
    return canvas


def plot_grid(summary, args, path, per_class=4):
    """Guided samples of each variant's first seed: one panel per variant, a column per digit."""
    variants = list(summary["table"])
    fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 0.8 + 0.36 * per_class),
                             squeeze=False)
    for ax, v in zip(axes[0], variants):
        entry = min((r for r in summary["runs"].values() if r["variant"] == v), key=lambda r: r["seed"])
        with np.load(os.path.join(args.records, f"final-{run_key(v, entry['lr'], entry['seed'])}.grid.npz")) as f:
            images, labels = f["images"], f["labels"]
        ax.imshow(tile_by_class(images, labels, per_class), interpolation="nearest")
        ax.set_title(f"{v} (lr {entry['lr']:g}, seed {entry['seed']})", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"Guided samples (scale {summary['cfg_scale']:g}), first seed, one column per digit", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#################################################################################
#                                 Length check                                  #
#################################################################################

# Point 2 of the study: a training length at which quality has stopped improving. Under a decaying lr a
# run's own curve always flattens at its end (the lr is near zero there), so flattening is read across
# lengths instead: the same variant and seed trained to L and to 2L, each annealed to its own end, and
# scored the same way. L is long enough when 2L is not measurably better.

def length_records(folders):
    """{(variant, seed): {steps: record}} of the final runs recorded in `folders` (each the study at one
    --steps). A variant may train at another lr (or --grad-clip) at another length, where its own lr no
    longer trains stably: the rows say so. A folder without final records, or two folders at the same
    length, are refused."""
    found = {}
    for folder in folders:
        paths = sorted(glob.glob(os.path.join(folder, "final-*.json")))
        if not paths:
            raise SystemExit(f"--lengths {folder}: no final-*.json records there (a study's --records folder)")
        for path in paths:
            with open(path) as f:
                record = json.load(f)
            if record.get("diverged"):  # no model to compare (its variant trained at a lower lr: final_lrs)
                continue
            steps = record["settings"]["steps"]
            runs = found.setdefault((record["variant"], record["seed"]), {})
            if steps in runs:
                raise SystemExit(f"--lengths: {path} and {runs[steps]['path']} are both {record['variant']} seed "
                                 f"{record['seed']} at {steps} steps; pass one folder per length")
            noise = os.path.join(folder, f"noise-{run_key(record['variant'], record['lr'], record['seed'])}.json")
            sets = {0: record["unguided"]}
            if os.path.isfile(noise):
                with open(noise) as f:
                    sets.update({int(k): m for k, m in json.load(f)["sets"].items()})
            runs[steps] = {**record, "path": path, "sets": sets}
    return found


def recipe(record):
    """A final record's lr, with its gradient clipping where it had one: "0.004", "0.002 clip 1"."""
    clip = record["settings"].get("grad_clip")
    return f"{record['lr']:g}" + (f" clip {clip:g}" if clip else "")


def length_change(a, b):
    """From run a to run b (the same variant and seed at two lengths): the relative change of unguided
    FD-digits and the change of accuracy, each of the means over the sample seeds both have (a paired
    comparison: one sample seed draws the same labels and noise for every model), and how many seeds."""
    seeds = sorted(set(a["sets"]) & set(b["sets"]))
    mean = lambda r, key: statistics.fmean(r["sets"][k][key] for k in seeds)  # noqa: E731
    return dict(fd=mean(b, "fd_digits") / mean(a, "fd_digits") - 1, accuracy=mean(b, "accuracy") - mean(a, "accuracy"),
                sets=len(seeds))


def length_verdict(runs, tolerance, accuracy_tolerance):
    """The shortest length whose doubling (the next recorded length) lowers unguided FD-digits by less than
    `tolerance` of its value and raises accuracy by less than `accuracy_tolerance`, both as means over the
    sample sets the two lengths share: (length, the changes to the next length), or (None, the last
    changes) while every recorded length still improves."""
    lengths = sorted(runs)
    changes = None
    for a, b in zip(lengths, lengths[1:]):
        changes = dict(to=b, **length_change(runs[a], runs[b]))
        if changes["fd"] > -tolerance and changes["accuracy"] < accuracy_tolerance:
            return a, changes
    return None, changes


def variant_order(key):
    """Sort key of (variant, seed): the variants in VARIANTS order, then the seed."""
    return (VARIANTS.index(key[0]) if key[0] in VARIANTS else len(VARIANTS), key)


def compared(found):
    """The runs of length_records recorded at two or more lengths (the ones a length check compares)."""
    return {k: runs for k, runs in found.items() if len(runs) > 1}


def length_lines(found, args):
    """The length check's page: every run at every length, the change from the length before, and the
    verdict per run and for the study."""
    lines = ["# The digits study: how long is trained?", "", provenance(), "",
             f"Final runs recorded in {', '.join(f'`{f}`' for f in args.lengths)}, each variant and seed trained to "
             "every length with the lr annealed to zero at that length (a separate run per length), 1,000 EMA "
             "samples each as in the study. A length counts as trained when the next one (about twice as long) "
             f"lowers unguided FD-digits by less than {args.converged_within:.0%} and raises accuracy by less "
             f"than {args.accuracy_within:g}.", "",
             "| variant | lr | seed | steps | FD-digits unguided | sample sets | change | accuracy | recall | "
             "FD-digits guided (scale) | nearest-digit ratio | near-copies | max/median |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = {}
    for (v, s), runs in sorted(compared(found).items(), key=lambda kv: variant_order(kv[0])):
        before = None
        for steps in sorted(runs):
            r = runs[steps]
            g, fds = r["guided"], [m["fd_digits"] for m in r["sets"].values()]
            mean = lambda key: statistics.fmean(m[key] for m in r["sets"].values())  # noqa: E731
            if before:
                ch = length_change(before, r)
                change = f"{ch['fd']:+.0%}" + (f" ({ch['sets']} paired)" if ch["sets"] > 1 else "")
            else:
                change = "-"
            sets = " ".join(f"{x:.3g}" for x in fds) if len(fds) > 1 else "1"
            lines.append(f"| {v} | {recipe(r)} | {s} | {steps} | {statistics.fmean(fds):.3g} | {sets} | {change} | "
                         f"{mean('accuracy'):.3g} | {mean('recall'):.3g} | {g['fd_digits']:.3g} ({r['cfg_scale']:g}) | "
                         f"{g['memorisation']['ratio']:.2f} | {g['memorisation']['near_copies']:.1%} | "
                         f"{r['outliers']['max_median_ratio']:.3g} |")
            before = r
        verdicts[(v, s)] = length_verdict(runs, args.converged_within, args.accuracy_within), runs
    single = len(found) - len(verdicts)
    lines += ["", (f"{single} more run(s) are recorded at one length only and not compared. " if single else "") +
              "FD-digits, accuracy and recall unguided: the mean over the model's sample sets (sample seeds 0 and "
              "the study's --noise-seeds where measured; the FD-digits of each set beside it); change: of that "
              "mean over the sample seeds both lengths have. Guided and the rest: the sample-seed-0 set. "
              "Nearest-digit ratio and near-copies: of the guided samples, as on the study's page (1 and 5% "
              "for fresh digits); max/median: the worst block's channel-RMS outlier.", "", "## Verdict", ""]
    for (v, s), ((length, ch), runs) in verdicts.items():
        paired = f", mean of {ch['sets']} paired sample sets" if ch["sets"] > 1 else ""
        recipes = [recipe(runs[steps]) for steps in sorted(runs)]
        lrs = f", lr {' -> '.join(recipes)}" if len(set(recipes)) > 1 else ""
        step = f"to {ch['to']} steps{paired}{lrs}: FD-digits {ch['fd']:+.0%}, accuracy {ch['accuracy']:+.3f}"
        lines.append(f"- {v} seed {s}: " + (f"trained at {length} steps ({step})" if length else
                                            f"still improving at its longest length ({step})"))
    reached = [length for (length, _), _ in verdicts.values()]
    if all(reached):
        lines.append(f"- **Every run compared is trained at {max(reached)} steps**: the study's length.")
    else:
        lines.append(f"- **Not every run has stopped improving** ({sum(1 for x in reached if not x)} of {len(reached)} "
                     "still improve at their longest length): a longer length is needed.")
    return lines + ["", "![quality against training step at every length](lengths.png)", ""]


def plot_lengths(found, path):
    """FD-digits (curve samples) and accuracy over training, one line per length; one row per variant and
    a pair of panels (FD-digits, accuracy) per seed, so that 15 runs stay readable; the 1,000-sample
    unguided FD-digits at each run's end as a cross."""
    found = compared(found)
    variants = list(dict.fromkeys(key[0] for key in sorted(found, key=variant_order)))
    seeds = sorted({key[1] for key in found})
    fig, axes = plt.subplots(len(variants), 2 * len(seeds), figsize=(3.6 * 2 * len(seeds), 3.0 * len(variants)),
                             squeeze=False)
    for row, variant in enumerate(variants):
        for j, seed in enumerate(seeds):
            ax_fd, ax_acc = axes[row][2 * j], axes[row][2 * j + 1]
            if (variant, seed) not in found:
                ax_fd.axis("off")
                ax_acc.axis("off")
                continue
            runs = found[(variant, seed)]
            for i, steps in enumerate(sorted(runs)):
                r, color = runs[steps], plt.cm.viridis(i / max(1, len(runs) - 1) * 0.85)
                pts = np.array(r["curve"])
                ax_fd.plot(pts[:, 0], pts[:, 1], marker="o", ms=2, color=color, label=f"{steps} steps")
                ax_fd.plot([steps], [r["unguided"]["fd_digits"]], marker="x", ms=7, mew=2, color=color)
                ax_acc.plot(pts[:, 0], pts[:, 2], marker="o", ms=2, color=color)
            ax_fd.set_yscale("log")
            lrs = " / ".join(dict.fromkeys(recipe(runs[steps]) for steps in sorted(runs)))
            ax_fd.set_title(f"{variant} seed {seed}: FD-digits (lr {lrs})", fontsize=8, color=COLORS.get(variant))
            ax_acc.set_title(f"{variant} seed {seed}: accuracy", fontsize=8, color=COLORS.get(variant))
            ax_acc.set_ylim(0, 1.02)
            ax_fd.legend(fontsize=6)
            if row == len(variants) - 1:
                ax_fd.set_xlabel("training step")
                ax_acc.set_xlabel("training step")
    fig.suptitle("FD-digits (line: 500 curve samples; x: 1,000 samples at the run's end) and accuracy on the "
                 "intended labels, one line per training length", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_lengths_report(args):
    """The length check (--lengths): <out>/lengths.md and lengths.png, and with --record PAGE the page and
    its figure (docs/figures/<page>.png: digits_lengths.png). Returns the page's text."""
    found = length_records(args.lengths)
    if not compared(found):
        raise SystemExit(f"--lengths {' '.join(args.lengths)}: no variant and seed is recorded at two lengths there; "
                         "pass the --records folders of the same runs trained to different --steps")
    os.makedirs(args.out, exist_ok=True)
    plot_lengths(found, os.path.join(args.out, "lengths.png"))
    text = "\n".join(length_lines(found, args))
    with open(os.path.join(args.out, "lengths.md"), "w") as f:
        f.write(text)
    if args.record:
        prefix = os.path.splitext(os.path.basename(args.record))[0]
        write_page(args.record, text, args.out, {"lengths.png": f"{prefix}.png"})
    print(text)
    return text
