"""The digits study (`python study.py digits`, `make digits`): does a normalization variant change the quality of
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
Runs and sample sets go through the studies' runner (runner.py); single runs are digits_runs.py, the
report digits_report.py, the length check digits_lengths.py.

    python study.py digits                          # the whole study (hours on 2 cores: docs/results/digits.md)
    python study.py digits --sweep-only             # phase 1 alone (the lr sweep)
    python study.py digits --report --record docs/results/digits.md
    python study.py digits --lengths docs/results/digits_runs docs/results/digits_long_runs \
        --record docs/results/digits_lengths.md     # the length check: is a doubling still better?
    python study.py digits --variants layer-norm none --seeds 0 --lrs 2e-3 --sweep-steps 200 --steps 400 \\
        --fid-every 200 --samples 100 --cfg-scale 2 --out results/digits-quick   # a quick end-to-end check
"""

import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from ditlab.cli import COUNT, INDEX, NON_NEGATIVE, POSITIVE
from ditlab.data import write_digits_folder
from ditlab.errors import UsageError
from ditlab.features import DIGITS_CLASSIFIER, classifier_id, digits_rgb, to_gray
from ditlab.files import provenance
from ditlab.memorisation import memorisation
from ditlab.run import LR_SCHEDULES
from ditlab.studies import runner
from ditlab.studies.digits_lengths import write_lengths_report
from ditlab.studies.digits_report import final_table, real_floor, settings_of, sweep_fd, write_report
from ditlab.studies.digits_runs import (
    DIGITS_REF,
    QUALITY,
    choose_cfg,
    curve,
    find_run,
    outliers_of,
    run_key,
    run_step,
    sample_all,
    train_all,
    training_speed,
)
from ditlab.studies.runner import study_parser
from ditlab.studies.variants import DIGITS_VARIANTS as VARIANTS
from models import NORM_LAYERS

# A finished run is kept as a small JSON record (curve, scores, memorisation, outliers, speed) in
# --records, so that the study continues across machines, where the run directories (tens of
# MB each) do not travel: a record is never recomputed, and the report is built from records alone.
SWEEP_SETTINGS = ("sweep_steps", "fid_every", "curve_samples", "curve_sampling_steps")
FINAL_SETTINGS = (*SWEEP_SETTINGS, "steps", "lr_schedule", "final_fid_every", "samples", "sampling_steps", "grad_clip")
GUIDANCE_SETTINGS = (*FINAL_SETTINGS, "cfg_candidates", "cfg_samples")



def read_record(args, name, keys):
    """The record `name`, or None; a record made with other settings (keys) is refused, not reused."""
    return runner.read_record(args.records, name, {k: getattr(args, k) for k in keys})


def write_record(args, name, record, keys):
    """The record `name` with the settings it was made with, its provenance and the fingerprint of the digits
    classifier that scored it (None where none exists yet)."""
    scorer = classifier_id(args.digits_classifier) if os.path.isfile(args.digits_classifier) else None
    runner.write_record(args.records, name, record, {k: getattr(args, k) for k in keys}, digits_classifier=scorer)



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
        raise UsageError(f"the lr sweep has not finished ({', '.join(run_key(v, lr, 0) for v, lr in todo)}); "
                         "run without --report")
    for i in range(0, len(todo), args.parallel):  # in waves, each recorded before the next starts (run
        wave = todo[i:i + args.parallel]           # directories need not outlive a machine; records do)
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


def best_lrs(args, sweep):
    """Per variant, the lr whose seed-0 run has the lowest FD-digits at --sweep-steps (ties: the lower lr;
    a diverged run is the worst)."""
    best = {v: min(args.lrs, key=lambda lr: (sweep_fd(args, sweep[(v, lr)]), lr)) for v in args.variants}
    for v, lr in best.items():
        if sweep[(v, lr)].get("diverged"):
            raise UsageError(f"every lr of the sweep diverged for {v} ({', '.join(f'{x:g}' for x in args.lrs)}); "
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
            raise UsageError(f"{v}: a final run diverged at every lr up to its sweep's best {top:g} "
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
    if args.report:  # a study cut short: report the recorded runs (the report names the rest)
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
        path = runner.record_path(args.records, "guidance")
        raise UsageError(f"{path}: this study guides at {record['scale']:g}, not --cfg-scale {args.cfg_scale:g}"
                         f" (its final records were guided at it); pass --cfg-scale "
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
        raise UsageError("no guidance record yet; run without --report")
    variant = "layer-norm" if "layer-norm" in args.variants else args.variants[0]
    run = find_run(args, variant, lrs[variant], args.seeds[0], args.steps, final=True)
    if args.cfg_scale is None and run_step(run) < args.steps:
        raise UsageError(f"choosing the guidance scale needs the {variant} seed-{args.seeds[0]} final run; "
                         "rerun with that seed included")
    scale, fds = choose_cfg(args, run)
    write_record(args, "guidance", dict(scale=scale, candidates={f"{g:g}": fd for g, fd in fds.items()}), keys)
    return read_record(args, "guidance", keys)


def sampling_noise(args, finals):
    """Phase 7: the unguided set of every final model drawn again at each --noise-seeds (sample_ddp.py's
    --global-seed; the study's own sets are seed 0) and scored the same way, so that the spread of one model's
    FD-digits over sample sets can be set against the spread between training seeds, and a comparison of
    two models rests on more than one set. Kept as noise-<run>.json beside the run's record, topped up when
    more seeds are asked for; a run whose directory is gone (trained on another machine) keeps what it has.
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


def parser():
    """The digits study's flags."""
    p = study_parser("digits", __doc__)
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
    return p


def check(args):
    """Refuse settings the study cannot run, before anything starts; fills in the default --records."""
    if args.sweep_steps > args.steps:
        raise UsageError(f"--sweep-steps {args.sweep_steps} is more than --steps {args.steps}: "
                         "the final runs extend the sweep's")
    if args.sweep_steps % args.fid_every or args.steps % args.final_fid_every:
        raise UsageError(f"--sweep-steps must be a multiple of --fid-every {args.fid_every} and --steps of "
                         f"--final-fid-every {args.final_fid_every} (the curves' points)")
    if 0 in args.noise_seeds:
        raise UsageError("--noise-seeds: 0 is the study's own sample seed (its sets are already scored); "
                         "pass others, e.g. 1 2")
    args.records = args.records or os.path.join(args.out, "records")


def run(args, extra=()):
    """The length check (--lengths), or the study (every phase; --report: from the records alone)."""
    check(args)
    plt.switch_backend("Agg")
    start = time.time()
    if args.lengths:
        return write_lengths_report(args)
    summary = run_study(args)
    print(f"[digits] wrote {os.path.join(args.out, 'summary.md')} ({(time.time() - start) / 60:.1f} min)")
    return summary
