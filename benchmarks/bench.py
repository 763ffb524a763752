"""Speed benchmark: our DiT against diffusers' DiTTransformer2DModel, side by side in one run.

Measures, for each setting asked (a precision, optionally +compile or +cudagraphs, and/or +ckpt):
  * training step = forward + backward + AdamW + EMA through the real `ditlab.trainer.Trainer`, with the
    same Gaussian-diffusion loss (MSE + learned-variance VB term) for both models;
  * DDPM sampling, N respaced steps, with and without classifier-free guidance;
and, once per run, the toy study's training steps/s (both variants of its preset).

Ours and the peer run in alternating rounds (ours, peer, ours, peer, ...) so that a machine that
speeds up or slows down during the run affects both alike; each figure is the median over rounds,
with the interquartile range as the spread. GPU timings synchronize before and after each round.

    python -m benchmarks.bench                                    # CPU: DiT-S/2, 32x32 latents, batch 8, fp32
    python -m benchmarks.bench --settings bf16 bf16+compile       # GPU default model: DiT-XL/2, batch 32
    python -m benchmarks.bench --model DiT-B/2 --batch-size 64 --settings tf32 bf16+ckpt --peak-tflops 989

Results are printed and inserted at the top of docs/benchmarks.md (`--record ''` to skip).
FLOPs: one multiply-add = 2 FLOPs (the FlopCounterMode convention). The DiT paper's "Gflops" count
multiply-adds, so its 118.6 for DiT-XL/2 is 237 GFLOPs here; a training step is 3x the forward.
"""

import argparse
import datetime
import inspect
import json
import logging
import os
import resource
import shlex
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn as nn

from benchmarks.records import bench_section, device_name, git_commit, record, versions
from benchmarks.timing import (
    forward_flops,
    interleaved,
    paired_ratio,
    peak_tflops,
    precision_mode,
    summarize,
    synchronize,
)
from diffusion import create_diffusion
from ditlab.cli import COUNT, INDEX, NON_NEGATIVE, POSITIVE
from ditlab.distributed import DistInfo
from ditlab.files import atomic_write
from ditlab.sampling import denoise
from ditlab.toy.task import PRESETS, TOY_MODEL, zero_batches
from ditlab.trainer import COMPILE_MODES, PRECISIONS, Trainer
from models import DIT_SIZES, DiT, DiT_models, build_model

IMPLS = ("ours", "peer")

#################################################################################
#                                   Models                                      #
#################################################################################


class PeerDiT(nn.Module):
    """diffusers' DiTTransformer2DModel (the peer) behind our forward(x, t, y) signature, so that the
    same diffusion loss, Trainer and samplers drive both models."""

    forward_with_cfg = DiT.forward_with_cfg  # the same guidance arithmetic as ours

    def __init__(self, config):
        super().__init__()
        from diffusers import DiTTransformer2DModel  # lazily: the peer is optional and slow to import

        d, heads = config["hidden_size"], config["num_heads"]
        self.in_channels, self.num_classes = config["in_channels"], config["num_classes"]
        self.net = DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=d // heads, in_channels=self.in_channels,
            out_channels=2 * self.in_channels if config["learn_sigma"] else self.in_channels,
            num_layers=config["depth"], sample_size=config["input_size"], patch_size=config["patch_size"],
            num_embeds_ada_norm=config["num_classes"], norm_eps=1e-6,
        )

    def forward(self, x, t, y):
        return self.net(x, timestep=t, class_labels=y, return_dict=False)[0]


def size_overrides(args):
    return {k: getattr(args, k) for k in ("depth", "hidden_size", "num_heads") if getattr(args, k)}


def model_config(args):
    """The DiT config `build_impl` builds, without building it (DiT-XL/2 is 2.7 GB in fp32)."""
    # DiT.config leaves out the options this repo adds while they are off (it stays the reference's)
    config = {k: v.default for k, v in inspect.signature(DiT).parameters.items()
              if k not in ("final_normalization", "dropout")}
    size, patch = args.model[len("DiT-"):].split("/")
    depth, hidden_size, num_heads = DIT_SIZES[size]
    config.update(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=int(patch),
                  input_size=args.input_size)
    config.update(size_overrides(args))
    return config


def build_impl(impl, args):
    """A freshly initialised model of `args.model` (with the size overrides) for `impl`."""
    if impl == "peer":
        return PeerDiT(model_config(args))
    ours = build_model(args.model, input_size=args.input_size, **size_overrides(args))
    ours.check_labels = False  # as in train.py: labels come from a checked data set, no host sync
    return ours


def parse_setting(setting):
    """'bf16+compile+ckpt' -> ('bf16', compile mode "default", ckpt=True); '+cudagraphs' compiles in the
    "reduce-overhead" mode (CUDA graphs on a GPU). A clear error on a typo."""
    precision, *flags = setting.split("+")
    unknown = [f for f in flags if f not in ("compile", "cudagraphs", "ckpt")]
    if precision not in PRECISIONS or unknown:
        raise SystemExit(f"unknown setting {setting!r}: write a precision {PRECISIONS} optionally followed by "
                         f"'+compile' (or '+cudagraphs': compiled with CUDA graphs) and/or '+ckpt' (gradient "
                         f"checkpointing), e.g. bf16+compile")
    mode = "reduce-overhead" if "cudagraphs" in flags else "default" if "compile" in flags else None
    return precision, mode, "ckpt" in flags


def make_trainer(model, precision, compile, ckpt, device, lr=1e-4, ema_decay=0.9999):
    """The production Trainer (AdamW, EMA, grad-norm, autocast) on one device."""
    if ckpt:
        if isinstance(model, PeerDiT):
            model.net.enable_gradient_checkpointing()
        else:
            model.grad_checkpointing = True
    logger = logging.getLogger("bench")  # silent: the Trainer logs only inside fit(), which is not used here
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return Trainer(model, create_diffusion(timestep_respacing=""), dist_info=DistInfo(0, 1, 0, device),
                   run_dir=None, logger=logger, config={}, lr=lr, ema_decay=ema_decay, precision=precision,
                   compile=compile)


#################################################################################
#                                   Timing                                      #
#################################################################################


def say(row):
    """One measured row, printed as soon as it exists (a run cut short by a time limit keeps what it
    measured in its log)."""
    print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
          flush=True)


def peak_memory_probe(args, impl, setting):
    """Peak memory of a few training steps. GPU: measured in-process by the caller. CPU: a fresh
    subprocess reports its peak RSS above its RSS after start-up, so earlier work does not count."""
    cmd = [sys.executable, "-m", "benchmarks.bench", "--probe", f"{impl}:{setting}", "--model", args.model,
           "--input-size", str(args.input_size), "--batch-size", str(args.batch_size), "--device", "cpu"]
    for key in ("depth", "hidden_size", "num_heads", "threads"):
        if getattr(args, key):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def rss_mib():
    """Peak resident set size of this process so far, in MiB. Linux: VmHWM, which starts afresh at
    exec (ru_maxrss would keep the forking parent's peak); elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        scale = 2**20 if sys.platform == "darwin" else 2**10  # macOS reports bytes, Linux KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def run_probe(args):
    impl, setting = args.probe.split(":", 1)
    precision, compile, ckpt = parse_setting(setting)
    device = torch.device(args.device)
    base = rss_mib()
    x, y = random_batch(args, device)
    trainer = make_trainer(build_impl(impl, args), precision, compile, ckpt, device)
    for _ in range(2):
        trainer.train_step(x, y)
    print(json.dumps({"peak_mib": rss_mib() - base}))


def random_batch(args, device, n=None):
    n = n or args.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, args.input_size, args.input_size, generator=g).to(device)
    y = torch.randint(0, 1000, (n,), generator=g).to(device)
    return x, y


#################################################################################
#                                  Benchmarks                                   #
#################################################################################


def bench_training(args, device, setting, flops_per_image, peak_tflops):
    """Training-step rows for ours and the peer (unless --no-peer) in one setting."""
    precision, compile, ckpt = parse_setting(setting)
    x, y = random_batch(args, device)
    trainers, mem = {}, {}
    for impl in args.impls:
        torch.manual_seed(0)
        trainers[impl] = make_trainer(build_impl(impl, args), precision, compile, ckpt, device)
    for impl, trainer in trainers.items():  # warm-up (and compilation)
        for _ in range(args.warmup):
            trainer.train_step(x, y)
    synchronize(device)

    def steps(impl):
        def run():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.steps_per_round):
                trainers[impl].train_step(x, y)
            if device.type == "cuda":
                synchronize(device)
                mem[impl] = max(mem.get(impl, 0), torch.cuda.max_memory_allocated(device) / 2**20)
        return run

    times = interleaved({impl: steps(impl) for impl in args.impls}, args.rounds, device)
    if device.type != "cuda" and not args.no_memory:
        mem = {impl: peak_memory_probe(args, impl, setting) for impl in args.impls}
    rows = []
    for impl in args.impls:
        s = summarize([t / args.steps_per_round for t in times[impl]])
        ips = args.batch_size / s["median"]
        tflops = ips * flops_per_image / 1e12
        rows.append(dict(impl=impl, setting=setting, step_ms=1e3 * s["median"], iqr_ms=1e3 * s["iqr"], n=s["n"],
                         images_per_s=ips, peak_mib=mem.get(impl), tflops=tflops, mfu=tflops / peak_tflops))
    if "peer" in times:
        rows[0].update(paired_ratio(times))
    for row in rows:
        say(row)
    del trainers
    return rows


def bench_sampling(args, device, precision, forward_flops_per_image, peak_tflops):
    """Images/s of N-step DDPM sampling through sampling.denoise (what sample.py runs), without and/or with guidance (--sample-guidance), for ours and
    the peer. Model FLOPs per image: steps x forward, twice that with guidance (the batch is doubled)."""
    diffusion = create_diffusion(timestep_respacing=str(args.sample_steps))
    models = {}
    for impl in args.impls:
        torch.manual_seed(0)
        models[impl] = build_impl(impl, args).to(device).eval()
    n = args.sample_batch_size
    x, y = random_batch(args, device, n)

    def loop(impl, cfg):
        def run():  # the loop sample.py runs (sampling.denoise: the reference's p_sample_loop, doubled for cfg)
            denoise(models[impl], diffusion, x, y, "ddpm", cfg_scale=args.cfg_scale if cfg else 1.0)
        return run

    rows = []
    with torch.inference_mode(), precision_mode(precision, device):
        for cfg in {"both": (False, True), "none": (False,), "cfg": (True,)}[args.sample_guidance]:
            runs = {impl: loop(impl, cfg) for impl in args.impls}
            for impl in args.impls:  # warm-up: one guided / unguided model call
                t = torch.full((2 * n if cfg else n,), 999, device=device)
                if cfg:
                    models[impl].forward_with_cfg(torch.cat([x, x]), t, torch.cat([y, y]), args.cfg_scale)
                else:
                    models[impl](x, t, y)
            times = interleaved(runs, args.sample_rounds, device)
            new = []
            for impl in args.impls:
                s = summarize(times[impl])
                tflops = n / s["median"] * args.sample_steps * (2 if cfg else 1) * forward_flops_per_image / 1e12
                new.append(dict(impl=impl, guidance=f"cfg {args.cfg_scale}" if cfg else "none",
                                seconds=s["median"], iqr_s=s["iqr"], n=s["n"], images_per_s=n / s["median"],
                                tflops=tflops, mfu=tflops / peak_tflops))
            if "peer" in times:
                new[0].update(paired_ratio(times))
            for row in new:
                say(row)
            rows += new
    return rows


def toy_setting(args):
    """The toy rows' setting name: fp32, fp32+compile, fp32+cudagraphs (reduce-overhead) or fp32+compile:MODE."""
    names = {None: "", "default": "+compile", "reduce-overhead": "+cudagraphs"}
    return args.toy_precision + names.get(args.toy_compile, f"+compile:{args.toy_compile}")


def bench_toy(args, device):
    """Training steps/s of the toy study's preset (paper on a GPU, cpu otherwise), both variants."""
    name = args.toy_preset or ("paper" if device.type == "cuda" else "cpu")
    preset = PRESETS[name]
    sizes = {k: preset[k] for k in ("depth", "hidden_size", "num_heads") if preset[k] is not None}
    trainers = {}
    for norm in args.toy_variants:
        torch.manual_seed(0)
        model = build_model(preset["model"], normalization=norm, **TOY_MODEL, **sizes)
        trainers[norm] = make_trainer(model, args.toy_precision, args.toy_compile, False, device,
                                      lr=preset["lr"], ema_decay=preset["ema_decay"])
    x, y = next(zero_batches(preset["global_batch_size"], device))

    def steps(norm):
        def run():
            for _ in range(args.toy_steps):
                trainers[norm].train_step(x, y)
        return run

    for norm in trainers:
        steps(norm)()  # warm-up
    times = interleaved({norm: steps(norm) for norm in trainers}, 3, device)
    rows = []
    for norm in trainers:
        rate = args.toy_steps / statistics.median(times[norm])
        rows.append(dict(preset=name, normalization=norm, batch=preset["global_batch_size"],
                         setting=toy_setting(args),
                         steps=preset["max_steps"], steps_per_s=rate, preset_minutes=preset["max_steps"] / rate / 60))
        say(rows[-1])
    return rows


#################################################################################
#                                     Main                                      #
#################################################################################


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(DiT_models), help="default: DiT-XL/2 on a GPU, DiT-S/2 on a CPU")
    p.add_argument("--image-size", type=COUNT, default=256, help="image size; latents are 8x smaller")
    p.add_argument("--input-size", type=COUNT, help="latent size (overrides --image-size)")
    p.add_argument("--depth", type=COUNT, help="override the model's depth (tests use tiny models)")
    p.add_argument("--hidden-size", type=COUNT)
    p.add_argument("--num-heads", type=COUNT)
    p.add_argument("--batch-size", type=COUNT, help="per-device batch; default 32 on a GPU, 8 on a CPU")
    p.add_argument("--settings", nargs="+",
                   help="precision[+compile][+ckpt] each, e.g. fp32 tf32 bf16 bf16+compile bf16+compile+ckpt; "
                        "default: fp32 on a CPU, tf32 bf16 bf16+compile on a GPU")
    p.add_argument("--compile", action="store_true", help="add +compile to every setting")
    p.add_argument("--grad-checkpointing", action="store_true", help="add +ckpt to every setting")
    p.add_argument("--warmup", type=INDEX, help="untimed steps per model and setting (default 2 CPU, 10 GPU)")
    p.add_argument("--rounds", type=COUNT, help="timed rounds per model (default 7 CPU, 10 GPU)")
    p.add_argument("--steps-per-round", type=COUNT, help="training steps per round (default 1 CPU, 10 GPU)")
    p.add_argument("--peak-tflops", type=POSITIVE, help="MFU denominator; default: a measured large-matmul rate")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    p.add_argument("--sample-steps", type=COUNT, help="DDPM steps (default 5 CPU, 250 GPU)")
    p.add_argument("--sample-batch-size", type=COUNT, help="default: --batch-size")
    p.add_argument("--sample-rounds", type=COUNT, default=3)
    p.add_argument("--sample-guidance", choices=["both", "none", "cfg"], default="both",
                   help="time sampling without guidance, with it (--cfg-scale), or both")
    p.add_argument("--no-peer", action="store_true", help="time our model only (also when diffusers is missing)")
    p.add_argument("--cfg-scale", type=NON_NEGATIVE, default=4.0)
    p.add_argument("--toy-preset", choices=["paper", "cpu"], help="default: paper on a GPU, cpu otherwise")
    p.add_argument("--toy-steps", type=COUNT, help="toy steps per round (default 50 CPU, 200 GPU)")
    p.add_argument("--toy-precision", choices=PRECISIONS, help="default: fp32 CPU, bf16 GPU")
    p.add_argument("--toy-compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the toy training steps; MODE: " + ", ".join(COMPILE_MODES)
                        + " (default when bare)")
    p.add_argument("--toy-variants", nargs="+", choices=["layer-norm", "none"], default=["layer-norm", "none"],
                   help="toy variants to time in this process (gpu_check.py runs one per process, concurrently, "
                        "as make toy trains them)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "sample", "toy"], help="parts to leave out")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: CUDA when available")
    p.add_argument("--threads", type=COUNT, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--record", default=os.path.join(REPO, "docs", "benchmarks.md"),
                   help="markdown file to insert the results into ('' = print only)")
    p.add_argument("--json", help="also write the raw rows to this JSON file")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one memory probe "impl:setting"
    return fill_defaults(p.parse_args(argv))


def fill_defaults(args):
    """The device's defaults (a GPU: DiT-XL/2 at batch 32 in tf32/bf16/bf16+compile, 250 sampling steps;
    a CPU: a small, quick setting) for every flag not given, and the derived sizes and settings."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is available; use --device cpu")
    gpu = args.device == "cuda"
    defaults = dict(model="DiT-XL/2" if gpu else "DiT-S/2", batch_size=32 if gpu else 8,
                    settings=["tf32", "bf16", "bf16+compile"] if gpu else ["fp32"], warmup=10 if gpu else 2,
                    rounds=10 if gpu else 7, steps_per_round=10 if gpu else 1, sample_steps=250 if gpu else 5,
                    toy_steps=200 if gpu else 50, toy_precision="bf16" if gpu else "fp32")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.image_size % 8 and args.input_size is None:
        raise SystemExit(f"--image-size {args.image_size} is not a multiple of 8 (the VAE's downsampling)")
    args.input_size = args.input_size or args.image_size // 8
    args.sample_batch_size = args.sample_batch_size or args.batch_size
    args.settings = [s + ("+compile" if args.compile and "compile" not in s else "")
                     + ("+ckpt" if args.grad_checkpointing and "ckpt" not in s else "") for s in args.settings]
    for s in args.settings:
        parse_setting(s)
    args.impls = IMPLS[:1] if args.no_peer else IMPLS
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        return run_probe(args)
    if "peer" in args.impls:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print("diffusers is not installed: timing our model only (the peer needs `pip install diffusers`, or "
                  "wheels carried to a machine without internet: see docs/benchmarks.md)", flush=True)
            args.impls = IMPLS[:1]
    device = torch.device(args.device)
    fwd = forward_flops(model_config(args))
    precisions = sorted({parse_setting(s)[0] for s in args.settings}, key=PRECISIONS.index)
    peaks = {p: (args.peak_tflops, "--peak-tflops") if args.peak_tflops else
             (peak_tflops(p, device), "measured matmul") for p in precisions}
    header = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), device=device_name(device),
                  versions=versions(), threads=torch.get_num_threads(), gflops=fwd / 1e9, commit=git_commit(),
                  command="python -m benchmarks.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                  sample_precision=precisions[-1], impls=list(args.impls),
                  peak_tflops={p: v for p, (v, _) in peaks.items()})
    print(f"{header['device']} | {header['versions']} | {args.model} {args.input_size}x{args.input_size} "
          f"batch {args.batch_size}", flush=True)
    train_rows, sample_rows, toy_rows = [], [], []

    def dump():  # after every part, so that a run stopped by a time limit keeps what it measured
        if args.json:
            atomic_write(args.json, lambda f: f.write(json.dumps(
                dict(header=header, training=train_rows, sampling=sample_rows, toy=toy_rows), indent=1).encode()))

    if "train" not in args.skip:
        for setting in args.settings:
            print(f"training step: {setting} ...", flush=True)
            try:
                train_rows += bench_training(args, device, setting, 3 * fwd, peaks[parse_setting(setting)[0]][0])
            except torch.OutOfMemoryError:
                raise SystemExit(f"out of memory in setting {setting} (both models, their AdamW states and EMAs "
                                 f"live on the device at once): use a smaller --batch-size or add +ckpt")
            dump()
    if "sample" not in args.skip:
        print(f"sampling: {args.sample_steps} steps ...", flush=True)
        precision = header["sample_precision"]
        sample_rows = bench_sampling(args, device, precision, fwd, peaks[precision][0])
        dump()
    if "toy" not in args.skip:
        print("toy preset ...", flush=True)
        toy_rows = bench_toy(args, device)
        dump()
    section = bench_section(args, device, header, dict(train=train_rows, sample=sample_rows, toy=toy_rows), peaks,
                            toy_setting(args))
    print("\n" + section)
    if args.record:
        record(args.record, section)
        print(f"recorded in {args.record}")
    return dict(training=train_rows, sampling=sample_rows, toy=toy_rows)


if __name__ == "__main__":
    main()
