"""What the mechanism study measures on one finished toy run (mechanism.py's records): the per-t probe error,
the sampled error, the outlier and signal/outlier statistics, the restoring weights and, for the cells that
are edited, the interventions of ditlab/edits.py. Each runs as a job of the studies' runner."""

import os
import time
from datetime import datetime

from diffusion import create_diffusion
from ditlab.checkpoints import load_model
from ditlab.edits import Progress, channel_statistics, intervene
from ditlab.toy.readers import final_sample_errors, last_probe, load_embeddings
from models import RestoringLayerNorm

INTERVENE_CELLS = ("layer-norm", "none", "restore")  # the cells whose outlier channel is edited
SUMMARY_PROGRESS_EVERY = 30.0  # seconds between a summary's progress lines (its interventions take minutes)


def run_seconds(run):
    """Wall-clock seconds of a run from the first to the last timestamp of its log.txt (training, probes and
    the final evaluation; a resumed run's pause counts too)."""
    stamps = []
    with open(os.path.join(run, "log.txt")) as f:
        for line in f:
            if line.startswith("[") and "]" in line:
                try:
                    stamps.append(datetime.strptime(line[1:line.index("]")], "%Y-%m-%d %H:%M:%S"))
                except ValueError:
                    continue
    return (stamps[-1] - stamps[0]).total_seconds() if stamps else None


def restoring_weights(model):
    """Largest |a| (log-scale) and |b| (mean) weight of every layer-norm-restore layer ({} for other
    models): how much of what LayerNorm removes the trained network takes back (both start at zero)."""
    return {name: dict(scale=m.scale_weight.detach().abs().max().item(), mean=m.mean_weight.detach().abs().max().item())
            for name, m in model.named_modules() if isinstance(m, RestoringLayerNorm)}


def progress_log(path):
    """A Progress whose lines are appended to the file `path` (a job's progress, echoed by the study)."""
    def append(line):
        with open(path, "a") as f:
            f.write(line + "\n")
    return Progress(every=SUMMARY_PROGRESS_EVERY, echo=append)


def summarise_run(args, cell, seed, steps, run, log=None):
    """The record of one finished run: per-t EMA probe error (last probe), sampled EMA RMS, the outlier
    (max/median ratio per block output, worst over t) and signal/outlier ratio at every norm input per t,
    and, for INTERVENE_CELLS, the interventions (with progress lines appended to the file `log`)."""
    probe = last_probe(run, "ema")
    outliers = {}
    for r in load_embeddings(run, "outliers"):
        if r["weights"] == "ema" and r["step"] == steps and r["layer"].startswith("block."):
            outliers.setdefault(r["layer"], {})[r["t"]] = r["max_median_ratio"]
    norm_inputs = {}
    for r in load_embeddings(run, "norm_input"):
        if r["weights"] == "ema" and r["step"] == steps:
            norm_inputs.setdefault(r["layer"], {})[r["t"]] = dict(signal_to_outlier=r["signal_to_outlier"],
                                                                  outlier_channel=r["outlier_channel"])
    record = dict(cell=cell, seed=seed, steps=steps, run=os.path.basename(run),
                  eps=({t: probe[t]["eps_rel_error"] for t in probe}), sample_rms=final_sample_errors(run),
                  max_median=outliers, norm_inputs=norm_inputs, run_seconds=run_seconds(run))
    model, _ = load_model(run)
    record["restoring_weights"] = restoring_weights(model)
    if cell in INTERVENE_CELLS:
        start = time.time()
        diffusion, sampler = create_diffusion(""), create_diffusion(str(args.intervene_sampling_steps))
        stats = channel_statistics(model, diffusion, num=args.stats_samples)
        progress = progress_log(log) if log else None
        result = intervene(model, diffusion, sampler, probe_samples=args.probe_samples,
                           num_samples=args.num_eval_samples, stats=stats, progress=progress)
        record["interventions"] = result
        record["intervene_seconds"] = time.time() - start
    return record


def summarise_one_thread(*call):
    """summarise_run in a job of its own, on one thread like the training jobs."""
    import torch

    torch.set_num_threads(1)
    return summarise_run(*call)
