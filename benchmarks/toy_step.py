"""Where a toy training step's time goes on the CPU, and what the per-timestep probe costs.

Builds the toy study's CPU preset (DiT-XS/1 at depth 2, width 64, batch 256, one thread) with the real
ditlab.trainer.Trainer and prints:
  1. the torch.profiler table of --profile-steps steps (self CPU time per op, the largest first);
  2. an A/B in alternating rounds of AdamW as the Trainer builds it (on a CPU: the single-tensor loop)
     against AdamW(foreach=True): median ms per step and the median of the per-round ratios;
  3. the time of one ditlab.probe (both weights are probed at each evaluation, so twice this per probe step)
     against a training step.

    python -m benchmarks.toy_step                 # about a minute on an idle 2-core machine
    python -m benchmarks.toy_step --rounds 31 --normalization none
"""

import argparse
import logging
import statistics
import time

import torch

from diffusion import create_diffusion
from ditlab.cli import COUNT
from ditlab.distributed import setup_distributed
from ditlab.probe import probe
from ditlab.toy.task import PRESETS, TOY_MODEL, zero_batches
from ditlab.trainer import Trainer
from models import build_model


def make_trainer(normalization, foreach=None):
    """A Trainer on the cpu preset's model; foreach=True swaps in AdamW(foreach=True)."""
    p = PRESETS["cpu"]
    torch.manual_seed(0)
    model = build_model(p["model"], depth=p["depth"], hidden_size=p["hidden_size"], num_heads=p["num_heads"],
                        normalization=normalization, **TOY_MODEL)
    trainer = Trainer(model, create_diffusion(""), dist_info=setup_distributed("cpu"), run_dir=None,
                      logger=logging.getLogger("toy_step"), config={}, lr=p["lr"], ema_decay=p["ema_decay"])
    if foreach:
        params = [q for q in trainer.raw.parameters() if q.requires_grad]
        trainer.opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=0.0, foreach=True)
    return trainer


def timed(fn, repeat):
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000


def iqr(values):
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--normalization", default="layer-norm")
    ap.add_argument("--rounds", type=COUNT, default=15)
    ap.add_argument("--steps-per-round", type=COUNT, default=20)
    ap.add_argument("--profile-steps", type=COUNT, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x, y = next(zero_batches(PRESETS["cpu"]["global_batch_size"], torch.device("cpu")))
    trainers = {"default": make_trainer(args.normalization), "foreach": make_trainer(args.normalization, True)}
    for trainer in trainers.values():
        timed(lambda: trainer.train_step(x, y), 20)  # warm-up
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            trainers["default"].train_step(x, y)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=45))
    times = {k: [] for k in trainers}
    for _ in range(args.rounds):
        for k, trainer in trainers.items():
            times[k].append(timed(lambda: trainer.train_step(x, y), args.steps_per_round))
    for k, v in times.items():
        print(f"AdamW {k}: {statistics.median(v):.2f} ms per step (IQR {iqr(v):.2f}, {args.rounds} rounds)")
    ratios = [a / b for a, b in zip(times["foreach"], times["default"])]
    print(f"foreach / default: {statistics.median(ratios):.3f} (IQR {iqr(ratios):.3f})")
    model, diffusion = trainers["default"].raw, trainers["default"].diffusion
    probe_ms = [timed(lambda: probe(model, diffusion, 256), 1) for _ in range(5)]
    step_ms = statistics.median(times["default"])
    print(f"ditlab.probe (256 draws x 11 timesteps, one set of weights): {statistics.median(probe_ms):.0f} ms "
          f"= {statistics.median(probe_ms) / step_ms:.1f} training steps")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.normalization}")


if __name__ == "__main__":
    main()
