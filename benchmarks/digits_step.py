"""What the digits study's time goes to, per normalization variant, on one CPU thread.

The study's slowest part is training the digits demo's DiT (4 blocks, width 128, 16 tokens, batch 64) with
every variant; the next is sampling (each FD-digits point: 500 samples x 50 DDPM steps; each scored set:
1,000 x 100). This times, in alternating rounds so that machine noise hits every variant alike, a training
step of ditlab.trainer.Trainer and one model forward on a sampling batch of 250, and prints the medians with
the study's projected cost. It also times a batch of the demo's data as the run's loader worker makes it,
decoded from the PNGs and from the in-memory cache of a small data set (ditlab.data.FlipImageFolder): with
two runs on two cores the worker's time is not free, so a step costs the step plus its batch.
--record adds the table to docs/benchmarks.md.

    python -m benchmarks.digits_step                  # about 2 minutes on an idle core
    python -m benchmarks.digits_step --rounds 9 --record docs/benchmarks.md
"""

import argparse
import logging
import os
import statistics
import tempfile
import time

import torch
from torch.utils.data import default_collate

from benchmarks.records import device_name, git_commit, record, versions
from diffusion import create_diffusion
from ditlab.cli import COUNT
from ditlab.data import FlipImageFolder, write_digits_folder
from ditlab.distributed import setup_distributed
from ditlab.trainer import Trainer
from models import build_model_from_config

VARIANTS = ("layer-norm", "none", "rms-norm", "dyt", "derf")
DEMO_MODEL = dict(model="DiT-S/4", depth=4, hidden_size=128, num_heads=4, input_size=16, in_channels=3, num_classes=10)


def make_trainer(normalization):
    torch.manual_seed(0)
    model = build_model_from_config(dict(DEMO_MODEL, normalization=normalization))
    return Trainer(model, create_diffusion(""), dist_info=setup_distributed("cpu"), run_dir=None,
                   logger=logging.getLogger("digits_step"), config={}, lr=2e-3, ema_decay=0.995)


def time_steps(trainer, batch, steps):
    x, y = batch
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y)
    return (time.perf_counter() - start) / steps * 1000


@torch.no_grad()
def time_forward(model, batch_size, repeat):
    x = torch.randn(batch_size, 3, 16, 16)
    t = torch.randint(0, 1000, (batch_size,))
    y = torch.randint(0, 10, (batch_size,))
    model.eval()
    start = time.perf_counter()
    for _ in range(repeat):
        model(x, t, y)
    return (time.perf_counter() - start) / repeat * 1000


def time_batches(dataset, batch_size, batches):
    """ms per batch of `batch_size` (image, label) items collated as the DataLoader does, in a fixed
    shuffled order (the loader worker's work for one step)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    for b in range(batches):
        keys = [(order[(b * batch_size + j) % len(order)], 0) for j in range(batch_size)]
        default_collate([dataset[k] for k in keys])
    return (time.perf_counter() - start) / batches * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=COUNT, default=7)
    ap.add_argument("--steps", type=COUNT, default=20, help="training steps per variant and round")
    ap.add_argument("--forwards", type=COUNT, default=5, help="sampling forwards (batch 250) per variant and round")
    ap.add_argument("--batches", type=COUNT, default=10, help="data batches (64 images) per kind and round")
    ap.add_argument("--record", default="", metavar="PATH", help="add the table to PATH (docs/benchmarks.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    digits = write_digits_folder(os.path.join(tmp.name, "digits"))
    folders = {"decoded": FlipImageFolder(digits, 16, cache_bytes=0), "cached": FlipImageFolder(digits, 16)}
    time_batches(folders["cached"], 64, -(-len(folders["cached"]) // 64))  # one epoch fills the cache
    trainers = {v: make_trainer(v) for v in VARIANTS}
    gen = torch.Generator().manual_seed(0)
    batch = (torch.rand(64, 3, 16, 16, generator=gen) * 2 - 1, torch.randint(0, 10, (64,), generator=gen))
    for trainer in trainers.values():
        time_steps(trainer, batch, 3)  # warm-up
    step_ms, fwd_ms = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
    data_ms = {k: [] for k in folders}
    for r in range(args.rounds):
        for k in (folders if r % 2 == 0 else reversed(folders)):
            data_ms[k].append(time_batches(folders[k], 64, args.batches))
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for v in order:
            step_ms[v].append(time_steps(trainers[v], batch, args.steps))
            fwd_ms[v].append(time_forward(trainers[v].ema, 250, args.forwards))
    tmp.cleanup()
    decoded, cached = statistics.median(data_ms["decoded"]), statistics.median(data_ms["cached"])
    rows = []
    for v in VARIANTS:
        step, fwd = statistics.median(step_ms[v]), statistics.median(fwd_ms[v])
        curve_point = 500 / 250 * 50 * fwd / 1000  # seconds per FD-digits point: 2 batches x 50 steps
        scored = 1000 / 250 * 100 * fwd / 1000 * 3  # unguided + guided (a doubled batch): 3 units
        rows.append((v, step, 1000 / step, 1000 / (step + decoded), 1000 / (step + cached), fwd, curve_point,
                     scored))
    head = ["| variant | train step (ms) | steps/s | steps/s with its batch, decoded / cached | "
            "forward, batch 250 (ms) | FD-digits point (s) | scored sets, unguided + guided (s) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    lines = head + [f"| {v} | {s:.1f} | {r:.2f} | {rd:.2f} / {rc:.2f} | {f:.1f} | {c:.0f} | {g:.0f} |"
                    for v, s, r, rd, rc, f, c, g in rows]
    data_line = (f"A batch of 64 digits for the loader worker: {decoded:.1f} ms decoded from the PNGs, {cached:.2f} ms "
                 f"from the cache (medians of {args.rounds} rounds of {args.batches} batches).")
    print("\n".join(lines + ["", data_line]))
    if args.record:
        section = "\n".join([
            f"## Digits study: time per variant ({time.strftime('%Y-%m-%d')}, {device_name(torch.device('cpu'))}, "
            "one thread)", "",
            f"`python -m benchmarks.digits_step --rounds {args.rounds}`, commit {git_commit()}, {versions()}. Medians "
            f"over {args.rounds} alternating rounds of {args.steps} training steps (batch 64) and {args.forwards} "
            "forwards. Sampling time is projected from the forward (DDPM's own arithmetic is negligible beside it). "
            "One process per core: with two jobs at a time on 2 cores each runs about 20-30% slower than this "
            "(shared caches and memory bandwidth; the study's logs give the rates it actually saw). "
            "\"With its batch\": the step plus the loader worker's batch, which a busy machine serves from the same "
            "cores.", "", *lines, "", data_line, ""])
        record(args.record, section)
        print(f"recorded in {args.record}")
    return rows, (decoded, cached)


if __name__ == "__main__":
    main()
