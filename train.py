"""Train a class-conditional latent DiT (Peebles & Xie, 2023), on one process or many (torchrun).

    python train.py                                             # the digits demo: ~10 min on 2 CPU cores
    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-XL/2 --data-path /data/imagenet/train
    torchrun --nproc_per_node=8 train.py --model DiT-XL/2 --latents-dir latents/in256 --precision bf16 --compile
    python train.py --resume results/000-DiT-XL-2-layer-norm    # continue a run exactly where it stopped

Demo: `python train.py` alone writes scikit-learn's 8x8 digits once as an ImageFolder (data/digits/),
trains a small pixel-space DiT on them through the same code path as ImageNet (settings: DEMO below) and
ends with an EMA sample grid, one column per digit, at results/<run>/samples/0008000.png (about 9.5
minutes on 2 idle CPU cores). `--demo` with other flags changes its settings.

Data: --data-path is an ImageFolder tree (DIR/<class>/<image>). Images are ADM-center-cropped to
--image-size, mirrored at random (unless --no-flip), scaled to [-1, 1] and encoded by the Stable Diffusion VAE (--vae ema |
mse | a local AutoencoderKL folder), latent = sample of the posterior * --latent-scale. --vae none trains
in pixel space. --latents-dir trains from latents extract_latents.py wrote once (both flips of every
image), without loading the VAE for training. Both paths see the same images with the same flips at
every step (data.FlipSampler); "same results" means the same data order and the same latent
distribution, not the same bits, because the posterior sample's noise differs between the two.

Recipe (defaults): AdamW lr 1e-4, no weight decay, global batch 256, EMA 0.9999, 1000-step linear
diffusion with learned sigma, class dropout 0.1. Attention goes through scaled_dot_product_attention
(flash / memory-efficient kernels on GPU, best with --precision bf16).

Runs: <--results-dir>/<index>-<model>-<normalization>/ with log.txt, config.json, checkpoints/<step>.pt
and checkpoints/latest.pt (every --ckpt-every steps and at the end), samples/<step>.png (EMA sample grid
every --sample-every steps), metrics.jsonl (FID of the EMA model every --fid-every steps) and, with
--tensorboard, TensorBoard events.

FID during training: `--fid-every N --fid-ref REF` draws --fid-num-samples images from the EMA model
(--fid-sampling-steps DDPM steps, guidance --fid-cfg-scale), sharded over the processes, and scores them
against REF with evaluation.py (ADM's FID, sFID, IS, precision, recall; `--fid-features digits` for the
demo). Image i depends only on i and --global-seed (as in sample_ddp.py), so the scores do not depend
on the number of processes, and the training RNG is untouched (resume stays exact). The loop is train_utils.Trainer:
exact resume (on CPU an interrupted run resumed with --resume ends with bitwise the weights of an
uninterrupted one), and a clear stop on a NaN/inf loss that leaves the last good checkpoint alone.

Pre-emption: SIGTERM, SIGINT or SIGUSR1, sent to the process, to its whole process group (as SLURM and
`timeout` do) or to torchrun, saves a checkpoint at the next step boundary on every rank and exits with
code 75; `--resume auto` continues the newest run with the same settings, so a requeued job script needs
no change (README, "Running on a cluster"). Sample scripts rebuild the model from a checkpoint's config alone.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from cli import COUNT, DROPOUT, FRACTION, INDEX, NON_NEGATIVE, POSITIVE
from data import (
    LATENT_SCALE, VAE_HELP, BadImages, FlipSampler, LatentShards, check_num_classes, load_vae, open_image_folder,
    read_latents_index, vae_geometry, write_digits_folder,
)
from diffusion import create_diffusion
from evaluation import (
    ArrayImages, EvaluationError, Evaluator, add_network_args, extract_features, feature_network, score, summary_line,
)
from models import NORM_LAYERS, DiT_models, build_model_from_config
from sampling import SAMPLER_HELP, SAMPLERS, check_solver_steps, denoise, draw_images
from train_utils import (
    PREEMPTED_EXIT, PRECISIONS, StopTraining, Trainer, add_compile_arg, apply_preset, auto_resume, barrier,
    broadcast_object, check_checkpoint_belongs, check_global_batch, cleanup_distributed, compile_mode,
    configure_threads, create_logger, gather_objects, ignore_stop_signals, load_checkpoint, log_failures,
    merge_resume_config, new_run_dir, parse_with_explicit, resolve_resume, setup_distributed, truncate_jsonl,
    write_json,
)

DEFAULT_IMAGE_SIZE, DEFAULT_VAE = 256, "ema"

# `python train.py` with no arguments (or --demo): sklearn's 8x8 digits, written once as a 32x32 ImageFolder
# and ADM-cropped to 16x16, in pixel space, with a DiT-S/4 shrunk to 4 blocks of width 128 (16 tokens).
# Tuned on 2 CPU cores: the small model with many steps beats a larger one with fewer; no flips (a mirrored
# digit is not a digit); EMA 0.995 because the run is short (0.9999 would still hold the zero-output start).
DEMO = dict(
    data_path=os.path.join("data", "digits"), image_size=16, vae="none", num_classes=10, no_flip=True,
    model="DiT-S/4", depth=4, hidden_size=128, num_heads=4, global_batch_size=64, lr=2e-3, ema_decay=0.995,
    max_steps=8000, epochs=10_000, log_every=500, ckpt_every=2000, sample_every=2000, sample_steps=250,
    sample_images=40, cfg_scale=4.0, num_workers=1, precision="fp32",
)

# Flags a resumed run may change (to extend it, move its data, or tune the step); every other flag
# comes from the checkpoint's config and may not contradict it.
RESUME_OVERRIDES = (
    "max_steps", "epochs", "ckpt_every", "log_every", "sample_every", "sample_steps", "sample_images", "cfg_scale",
    "num_workers", "max_bad_images", "tensorboard", "compile", "grad_checkpointing", "precision", "lr",
    "weight_decay", "grad_clip", "ema_decay", "data_path", "latents_dir", "results_dir", "fid_every", "fid_ref",
    "fid_num_samples", "fid_cfg_scale", "fid_sampling_steps", "fid_features", "fid_batch_size", "inception_weights",
    "digits_classifier", "sample_sampler", "fid_sampler",
)
# Flags that only steer this process; never saved in the config.
RUNTIME_ONLY = ("resume", "device", "demo", "debug_save_rank_weights", "no_layernorm", "threads")


def add_fid_args(p):
    """The flags of FID during training (make_fid_hook)."""
    g = p.add_argument_group("FID during training (EMA weights; metrics to log.txt, TensorBoard, <run>/metrics.jsonl)")
    g.add_argument("--fid-every", type=INDEX, default=0, help="evaluate every N steps and at the end (0: never)")
    g.add_argument("--fid-ref", default=None, metavar="REF",
                   help="reference images: an ADM reference batch .npz or a folder of images")
    g.add_argument("--fid-num-samples", type=COUNT, default=5000)
    g.add_argument("--fid-cfg-scale", type=NON_NEGATIVE, default=1.5, help="1.5: the paper's FID protocol")
    g.add_argument("--fid-sampling-steps", type=COUNT, default=250, help="sampling steps (the paper: 250 DDPM)")
    g.add_argument("--fid-sampler", choices=SAMPLERS, default="ddpm", help=SAMPLER_HELP)
    g.add_argument("--fid-batch-size", type=COUNT, default=32, help="images per process per sampling batch")
    add_network_args(g, "--fid-features")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="ImageFolder tree: DIR/<class>/<image>")
    g.add_argument("--latents-dir", default=None, help="train from latents written by extract_latents.py")
    g.add_argument("--image-size", type=COUNT, default=None,
                   help=f"pixels (default {DEFAULT_IMAGE_SIZE}, or the latents' size); a multiple of VAE factor x patch")
    g.add_argument("--num-classes", type=COUNT, default=1000)
    g.add_argument("--vae", default=None, help=f"{VAE_HELP}; default {DEFAULT_VAE}")
    g.add_argument("--latent-scale", type=POSITIVE, default=None, help=f"default {LATENT_SCALE}")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips (the DiT recipe flips)")
    g.add_argument("--num-workers", type=INDEX, default=4)
    g.add_argument("--max-bad-images", type=INDEX, default=10,
                   help="unreadable images (each logged once, replaced by the next readable one) tolerated "
                        "before the run stops")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(DiT_models), default="DiT-XL/2")
    g.add_argument("--depth", type=COUNT, default=None, help="override the model's depth")
    g.add_argument("--hidden-size", type=COUNT, default=None, help="override the model's width")
    g.add_argument("--num-heads", type=COUNT, default=None, help="override the model's attention heads")
    g.add_argument("--normalization", choices=sorted(NORM_LAYERS), default="layer-norm")
    g.add_argument("--no-layernorm", action="store_true", help="same as --normalization none")
    g.add_argument("--class-dropout-prob", type=DROPOUT, default=0.1, help="label dropout for classifier-free guidance")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=COUNT, default=1400)
    g.add_argument("--max-steps", type=COUNT, default=None, help="stop after this many steps (default: --epochs)")
    g.add_argument("--global-batch-size", type=COUNT, default=256)
    g.add_argument("--global-seed", type=INDEX, default=0)
    g.add_argument("--lr", type=POSITIVE, default=1e-4)
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0)
    g.add_argument("--ema-decay", type=FRACTION, default=0.9999)
    g.add_argument("--grad-clip", type=POSITIVE, default=None, help="clip the global grad norm (default: off)")
    g.add_argument("--precision", choices=PRECISIONS, default="tf32", help="tf32: fp32 with TF32 matmuls on GPU")
    add_compile_arg(g)
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations to save memory")
    g = p.add_argument_group("run")
    g.add_argument("--results-dir", default="results")
    g.add_argument("--resume", default=None,
                   help="run directory (its latest checkpoint) or checkpoint file; 'auto': the newest run in "
                        "--results-dir with these settings, or a new run if there is none (for requeued jobs)")
    g.add_argument("--log-every", type=COUNT, default=100)
    g.add_argument("--ckpt-every", type=COUNT, default=50_000)
    g.add_argument("--sample-every", type=INDEX, default=10_000, help="EMA sample grid every N steps (0: never)")
    g.add_argument("--sample-steps", type=COUNT, default=250, help="sampling steps for the sample grid")
    g.add_argument("--sample-sampler", choices=SAMPLERS, default="ddpm", help=f"sampler of the grid; {SAMPLER_HELP}")
    g.add_argument("--sample-images", type=COUNT, default=16, help="images in the sample grid")
    g.add_argument("--cfg-scale", type=NON_NEGATIVE, default=4.0, help="classifier-free guidance of the grid (1: none)")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard events to <run>/tensorboard")
    g.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    g.add_argument("--threads", type=COUNT, default=None,
                   help="torch CPU threads per process (default: OMP_NUM_THREADS, else 1 for models under 10M "
                        "parameters, else all cores)")
    g.add_argument("--demo", action="store_true", help="the digits demo (what `python train.py` alone runs); "
                                                       "other flags override its settings")
    add_fid_args(p)
    g.add_argument("--debug-save-rank-weights", action="store_true",
                   help="at the end, every rank saves its own weights to <run>/rank<r>-weights.pt (DDP checks)")
    return p


def parse_args(argv=None):
    """(args, explicit): the parsed flags (the demo's settings filled in where asked for) and the
    names of the flags given on the command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, explicit = parse_with_explicit(build_parser(), argv)
    if not argv:
        args.demo = True
    if args.demo and (not args.resume or args.resume == "auto"):
        apply_preset(args, DEMO, explicit)
    if args.no_layernorm:
        args.normalization = "none"
        explicit.add("normalization")
    if args.fid_every and not args.fid_ref:
        raise SystemExit("--fid-every needs --fid-ref REF (an ADM reference batch .npz or a folder of images)")
    if args.fid_ref and not os.path.exists(args.fid_ref):
        raise SystemExit(f"--fid-ref {args.fid_ref}: no such file or folder")
    check_sampling_flags(args)
    return args, explicit


def check_sampling_flags(args):
    """The grid's and the FID's sampler can take their step counts (again after a resume merges flags)."""
    check_solver_steps(args.sample_sampler, args.sample_steps, "--sample-steps")
    check_solver_steps(args.fid_sampler, args.fid_sampling_steps, "--fid-sampling-steps")


def resolve_data(args):
    """Fill in image size, VAE and latent scale (from the latents' index when training from latents;
    a flag that contradicts it is an error) and check the sizes before any work. Returns
    (VAE downsampling factor, model input channels)."""
    index = None
    if args.latents_dir:
        index = read_latents_index(args.latents_dir)
        for key in ("image_size", "latent_scale", "vae"):  # an explicit --vae says where to load it from
            flag = getattr(args, key)
            if key != "vae" and flag is not None and flag != index[key]:
                raise SystemExit(f"--{key.replace('_', '-')} {flag} contradicts the latents in {args.latents_dir} "
                                 f"({key}={index[key]}); drop the flag")
            if flag is None:
                setattr(args, key, index[key])
        check_num_classes(len(index["classes"]), args.num_classes, f"--latents-dir {args.latents_dir}")
    args.image_size = args.image_size or DEFAULT_IMAGE_SIZE
    args.vae = args.vae or DEFAULT_VAE
    args.latent_scale = args.latent_scale or LATENT_SCALE
    if index is not None and args.vae == "none":
        raise SystemExit("--vae none cannot be used with --latents-dir (latents come from a VAE)")
    if index is not None:  # the VAE is not needed to train (only to decode sample grids)
        factor, channels = args.image_size // index["latent_size"], index["latent_channels"]
    else:
        factor, channels = vae_geometry(args.vae)
    patch = int(args.model.split("/")[1])
    if args.image_size <= 0 or args.image_size % (factor * patch):
        what = (f"the patch size {patch} of {args.model}" if factor == 1 else
                f"{factor * patch} (VAE downsampling {factor} x patch size {patch} of {args.model})")
        raise SystemExit(f"--image-size {args.image_size} is not a multiple of {what}; "
                         f"pick e.g. {max(1, round(args.image_size / (factor * patch))) * factor * patch}")
    return factor, channels


def make_config(args, factor, channels, steps_per_epoch):
    """The run's config (plain types): every training flag plus what build_model_from_config reads
    and what sample scripts need (image_size, vae, latent_scale)."""
    config = {k: v for k, v in vars(args).items() if k not in RUNTIME_ONLY}
    config.update(input_size=args.image_size // factor, in_channels=channels, learn_sigma=True,
                  steps_per_epoch=steps_per_epoch, script="train.py")
    return config


#################################################################################
#                                 Batches                                       #
#################################################################################


class BatchStream:
    """Endless iterator of (x, y) device batches, epoch after epoch, from (epoch, position).

    Every step takes exactly one batch and an epoch has a fixed number of steps (drop_last), so
    (epoch, position) says exactly where the data stands; a resumed run starts its sampler there
    without loading the skipped images. `encode` maps the pixel batch to the model's input (the VAE).
    """

    def __init__(self, loader, steps_per_epoch, device, encode=None, epoch=0, position=0, check=None):
        self.loader, self.sampler = loader, loader.sampler
        self.steps_per_epoch, self.device, self.encode = steps_per_epoch, device, encode
        self.check = check  # called after every batch (the unreadable-image reports)
        self.epoch, self.position = epoch, position
        self._batches = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self.sampler.set_epoch(self.epoch)
            self.sampler.start = self.position * self.loader.batch_size
            self._batches = iter(self.loader)
        x, y = next(self._batches)
        if self.check is not None:
            self.check()
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.encode is not None:
            x = self.encode(x)
        return x, y

    def state(self):
        return {"epoch": self.epoch, "position": self.position}

    def close(self):
        self._batches = None  # lets the loader's workers go


def vae_encoder(vae, latent_scale):
    """x in [-1, 1] -> a posterior sample of the VAE * latent_scale (draws from the global RNG, which
    checkpoints save, so resumed runs draw the same noise)."""

    @torch.no_grad()
    def encode(x):
        return vae.encode(x).latent_dist.sample().mul_(latent_scale)

    return encode


#################################################################################
#                                 Sample grids                                  #
#################################################################################


@torch.no_grad()
def sample_grid(model, diffusion, labels, noise, cfg_scale, null_class, clip_denoised, autocast, sampler="ddpm"):
    """Samples of `model` from fixed `noise` for `labels` (sampling.denoise: classifier-free guidance
    with the null class, the model's last label row, when cfg_scale > 1). DDPM uses (and must run inside
    a fork of) the global RNG."""
    if cfg_scale > 1 and null_class != model.num_classes:
        raise ValueError(f"the null class of this model is {model.num_classes}, not {null_class}")
    with autocast:
        out = denoise(model, diffusion, noise, labels, sampler, cfg_scale, clip_denoised=clip_denoised)
    return out.float()


def make_sample_hook(trainer, args, vae, tensorboard):
    """Trainer hook: on rank 0, the EMA model samples a grid from fixed noise and labels (the same
    every time, so grids over a run are comparable) into <run>/samples/<step>.png. It runs inside
    torch.random.fork_rng, so the training RNG stream, and hence exact resume, is untouched."""
    ema, device = trainer.ema, trainer.dist.device
    diffusion = create_diffusion(str(args.sample_steps))
    n, num_classes = args.sample_images, args.num_classes
    cfg_scale = args.cfg_scale if args.class_dropout_prob > 0 else 1.0
    nrow = num_classes if num_classes <= 16 else math.ceil(math.sqrt(n))
    os.makedirs(os.path.join(trainer.run_dir, "samples"), exist_ok=True)

    def hook(step):
        if trainer.dist.is_main:
            from torchvision.utils import save_image

            t0 = time.time()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(args.global_seed)
                noise = torch.randn(n, ema.in_channels, ema.input_size, ema.input_size, device=device)
                labels = torch.arange(n, device=device) % num_classes
                x = sample_grid(ema, diffusion, labels, noise, cfg_scale, num_classes, vae is None, trainer.autocast(),
                                args.sample_sampler)
                if vae is not None:
                    with torch.no_grad():
                        x = vae.decode(x / args.latent_scale).sample.float()
            x = ((x.clamp(-1, 1) + 1) / 2).cpu()
            if x.shape[-1] < 64:  # tiny images: enlarge (nearest) so the grid is readable
                x = torch.nn.functional.interpolate(x, scale_factor=math.ceil(64 / x.shape[-1]), mode="nearest")
            path = os.path.join(trainer.run_dir, "samples", f"{step:07d}.png")
            save_image(x, path, nrow=nrow, padding=2, pad_value=1.0)
            hook.last_path = path
            if tensorboard is not None:
                from torchvision.utils import make_grid

                tensorboard.add_image("samples/ema", make_grid(x, nrow=nrow), step)
            trainer.logger.info(f"saved EMA sample grid {path} ({args.sample_sampler} {args.sample_steps} steps, "
                                f"cfg {cfg_scale}, {time.time() - t0:.1f}s)")
        barrier()

    hook.last_path = None
    return hook


def draw_fid_samples(ema, diffusion, args, vae, d, autocast):
    """This process's share of the FID images: the fixed batches [k*B, (k+1)*B) of the --fid-num-samples
    indices, dealt out to the ranks; image i from its own generator (sampling.image_generators), so the
    set of images is the same for any number of processes. Returns (indices, uint8 images, labels)."""
    n, b = args.fid_num_samples, args.fid_batch_size
    mine = [range(s, min(s + b, n)) for s in range(0, n, b)][d.rank::d.world_size]
    cfg_scale = args.fid_cfg_scale if args.class_dropout_prob > 0 else 1.0
    indices, images, labels = [], [], []
    for batch in mine:
        x, y = draw_images(ema, diffusion, batch, args.global_seed, vae, args.latent_scale, cfg_scale,
                           sampler=args.fid_sampler, autocast=autocast())
        images.append(x)
        indices += list(batch)
        labels += y
    return indices, (np.concatenate(images) if images else None), labels


def make_fid_hook(trainer, args, vae, tensorboard):
    """Trainer hook: the EMA model's FID (and the other metrics of evaluation.py) on every rank's share of
    --fid-num-samples images; rank 0 scores them against --fid-ref (its features computed once, here)
    and writes log.txt, TensorBoard and <run>/metrics.jsonl. Runs inside torch.random.fork_rng."""
    d = trainer.dist
    try:
        evaluator = (Evaluator(args.fid_ref, features=args.fid_features, inception_weights=args.inception_weights,
                               digits_classifier=args.digits_classifier, device=d.device, progress=False)
                     if d.is_main else None)
    except EvaluationError as e:
        raise SystemExit(f"--fid-ref: {e}")
    barrier()  # rank 0 may have written the digits classifier or downloaded the Inception weights
    net = evaluator.net if d.is_main else feature_network(args.fid_features, args.inception_weights,
                                                          args.digits_classifier).to(d.device)
    diffusion = create_diffusion(str(args.fid_sampling_steps))
    path = os.path.join(trainer.run_dir, "metrics.jsonl")

    def hook(step):
        t0 = time.time()
        with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []):
            indices, images, labels = draw_fid_samples(trainer.ema, diffusion, args, vae, d, trainer.autocast)
            feats = extract_features(ArrayImages(images), net, device=d.device, progress=False) if indices else None
        shares = gather_objects((indices, feats, labels))
        if d.is_main:
            order = np.argsort(np.concatenate([s[0] for s in shares if s[0]]))
            parts = [s for s in shares if s[0]]
            merged = {k: None if parts[0][1][k] is None else np.concatenate([p[1][k] for p in parts])[order]
                      for k in parts[0][1]}
            y = np.concatenate([p[2] for p in parts])[order]
            metrics = score(merged, evaluator.ref_feats, evaluator.ref_stats, y, args.fid_features, d.device)
            row = {"kind": "fid", "step": step, "weights": "ema", **metrics, "sampler": args.fid_sampler,
                   "sampling_steps": args.fid_sampling_steps, "cfg_scale": args.fid_cfg_scale,
                   "seconds": round(time.time() - t0, 2)}
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if tensorboard is not None:
                for key, value in metrics.items():
                    if isinstance(value, float):
                        tensorboard.add_scalar(f"eval/{key}", value, step)
            trainer.logger.info(f"eval at step {step} (EMA, {args.fid_sampling_steps} {args.fid_sampler} steps, cfg "
                                f"{args.fid_cfg_scale}, {time.time() - t0:.1f}s): {summary_line(metrics)}")
        barrier()

    return hook


#################################################################################
#                                   Main                                        #
#################################################################################


def main(argv=None):
    args, explicit = parse_args(argv)
    ckpt = run_dir = None
    if args.resume == "auto":
        args.resume = auto_resume(args, (*RESUME_OVERRIDES, *RUNTIME_ONLY))
    if args.resume:
        run_dir, ckpt_path = resolve_resume(args.resume)
        try:
            ckpt = load_checkpoint(ckpt_path)
        except ValueError as e:
            raise SystemExit(f"--resume {args.resume}: {e}")
        check_checkpoint_belongs(run_dir, ckpt_path, ckpt["config"])
        args = merge_resume_config(args, explicit, ckpt["config"], RESUME_OVERRIDES)
        check_sampling_flags(args)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_batch = check_global_batch(args.global_batch_size, world_size)  # before any work
    factor, channels = resolve_data(args)
    d = setup_distributed(args.device)
    try:
        return train(args, d, local_batch, factor, channels, ckpt, run_dir)
    finally:
        cleanup_distributed()


def make_loader(args, d, local_batch):
    """(data set, loader, steps per epoch). Images or their pre-extracted latents, read through the
    same (index, flip) keys of a FlipSampler; the demo writes its digits folder first (rank 0)."""
    if args.demo and not args.latents_dir and not os.path.isdir(args.data_path):
        if d.is_main:
            print(f"writing the digits demo data set to {args.data_path}/ (once)")
            write_digits_folder(args.data_path)
        barrier()
    if args.latents_dir:
        dataset = LatentShards(args.latents_dir)
    else:
        dataset = open_image_folder(args.data_path, args.image_size, args.num_classes)
    sampler = FlipSampler(dataset, num_replicas=d.world_size, rank=d.rank, seed=args.global_seed, flip=not args.no_flip)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"the data set has {len(dataset)} images, fewer than one global batch of "
                         f"{args.global_batch_size}; lower --global-batch-size")
    # The loader's own generator: creating its iterators must not draw from the global RNG.
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=d.device.type == "cuda", drop_last=True, worker_init_fn=ignore_stop_signals,
                        persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(0))
    return dataset, loader, steps_per_epoch


def make_vae(args, d, channels):
    """The VAE that encodes batches on the fly, or (training from latents) only decodes the sample
    grids on rank 0; None when there is nothing for it to do."""
    decodes = (args.sample_every > 0 and d.is_main) or args.fid_every > 0  # grids on rank 0, FID on every rank
    if args.vae == "none" or (args.latents_dir and not decodes):
        return None
    try:
        vae = load_vae(args.vae, d.device)
    except SystemExit as e:
        if not args.latents_dir:
            raise
        raise SystemExit(f"{e}\nTraining from latents needs the VAE only to decode the sample grids and FID "
                         f"samples: pass --vae PATH (a local copy), or --sample-every 0 and --fid-every 0")
    if vae.config.latent_channels != channels:
        raise SystemExit(f"the VAE {args.vae} has {vae.config.latent_channels} latent channels; "
                         f"the latents have {channels}")
    return vae


def open_run(args, d, ckpt, run_dir, factor, channels, steps_per_epoch):
    """(run_dir, config): a new run directory and its config.json, or the resumed run's config with the
    flags a resumed run may change (config.json rewritten to say what the run does now)."""
    if ckpt is None:
        run_dir = new_run_dir(args.results_dir, args.model, args.normalization) if d.is_main else None
        run_dir = broadcast_object(run_dir)
        config = make_config(args, factor, channels, steps_per_epoch)
    else:
        config = {**ckpt["config"], **{k: getattr(args, k) for k in RESUME_OVERRIDES}}
        if d.is_main:  # FID rows newer than the checkpoint are redone identically
            truncate_jsonl([os.path.join(run_dir, "metrics.jsonl")], ckpt["step"])
    if d.is_main:
        write_json(os.path.join(run_dir, "config.json"), config)
    return run_dir, config


def make_trainer(args, d, config, ckpt, run_dir, logger, steps_per_epoch):
    """(trainer, epoch, position): the model with the same initial weights on every rank (then one RNG
    stream per rank), its Trainer, and where the data stands (restored from `ckpt` when resuming)."""
    torch.manual_seed(args.global_seed)
    model = build_model_from_config(config)
    model.check_labels = False  # labels are < num_classes: checked on the data set
    model.grad_checkpointing = args.grad_checkpointing
    torch.manual_seed(args.global_seed * d.world_size + d.rank)
    trainer = Trainer(model, create_diffusion(timestep_respacing=""), dist_info=d, run_dir=run_dir, logger=logger,
                      config=config, lr=args.lr, weight_decay=args.weight_decay, ema_decay=args.ema_decay,
                      grad_clip=args.grad_clip, precision=args.precision, compile=args.compile)
    epoch = position = 0
    if ckpt is not None:
        trainer.load(ckpt)
        for group in trainer.opt.param_groups:  # --lr / --weight-decay may change on resume
            group["lr"], group["weight_decay"] = args.lr, args.weight_decay
        epoch, position = ckpt.get("epoch", 0), ckpt.get("position", 0)
        if position >= steps_per_epoch:
            epoch, position = epoch + 1, 0
        logger.info(f"resumed {run_dir} at step {trainer.step} (epoch {epoch}, batch {position})")
    return trainer, epoch, position


def log_start(args, d, logger, run_dir, model, dataset, config, channels, steps_per_epoch, max_steps):
    """The run's opening lines: threads, model, data and schedule."""
    params = sum(p.numel() for p in model.parameters())
    logger.info(configure_threads(args.threads, params))
    source = f"latents {args.latents_dir}" if args.latents_dir else f"images {args.data_path}"
    logger.info(f"run {run_dir}: {args.model} ({params:,} parameters, depth {len(model.blocks)}, width "
                f"{model.pos_embed.shape[-1]}, normalization {args.normalization}), {source}: {len(dataset):,} "
                f"images, {len(dataset.classes)} classes, {args.image_size}px, vae {args.vae}, input "
                f"{channels}x{config['input_size']}x{config['input_size']}")
    logger.info(f"{d.world_size} process(es) on {d.device.type}, global batch {args.global_batch_size}, "
                f"{steps_per_epoch} steps per epoch, training to step {max_steps}, precision {args.precision}"
                + (f", compiled ({compile_mode(args.compile)})" if compile_mode(args.compile) else "")
                + (", grad checkpointing" if args.grad_checkpointing else ""))


def train(args, d, local_batch, factor, channels, ckpt, run_dir):
    dataset, loader, steps_per_epoch = make_loader(args, d, local_batch)
    vae = make_vae(args, d, channels)  # before the run directory: a VAE that fails to load leaves no run
    run_dir, config = open_run(args, d, ckpt, run_dir, factor, channels, steps_per_epoch)
    logger = create_logger(run_dir, d.is_main)
    with log_failures(logger):
        tensorboard = None
        if args.tensorboard and d.is_main:
            from torch.utils.tensorboard import SummaryWriter

            tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        trainer, epoch, position = make_trainer(args, d, config, ckpt, run_dir, logger, steps_per_epoch)
        encode = vae_encoder(vae, args.latent_scale) if vae is not None and not args.latents_dir else None
        check = None
        if not args.latents_dir:  # unreadable images: reported by the loader workers, logged and counted here
            dataset.bad_images_file = os.path.join(run_dir, "bad_images.txt")
            check = BadImages(dataset.bad_images_file, args.max_bad_images, logger.warning).check
        stream = BatchStream(loader, steps_per_epoch, d.device, encode, epoch, position, check)
        max_steps = args.epochs * steps_per_epoch
        if args.max_steps is not None:
            max_steps = min(max_steps, args.max_steps)
        log_start(args, d, logger, run_dir, trainer.raw, dataset, config, channels, steps_per_epoch, max_steps)
        hooks = []
        if args.sample_every > 0:
            hooks = [(args.sample_every, make_sample_hook(trainer, args, vae, tensorboard))]
        if args.fid_every > 0:
            hooks.append((args.fid_every, make_fid_hook(trainer, args, vae, tensorboard)))
        try:
            finished = trainer.fit(stream, max_steps, log_every=args.log_every, ckpt_every=args.ckpt_every,
                                   hooks=hooks, tensorboard=tensorboard, extra_state=stream.state)
        except StopTraining as e:
            raise SystemExit(f"error: {e}")
        finally:
            stream.close()
            if tensorboard is not None:
                tensorboard.close()
        if args.debug_save_rank_weights:
            torch.save(trainer.raw.state_dict(), os.path.join(run_dir, f"rank{d.rank}-weights.pt"))
        if not finished:
            raise SystemExit(PREEMPTED_EXIT)  # stopped by a signal after saving: a requeue script continues it
        if d.is_main:
            logger.info(f"done: step {trainer.step}, checkpoint {os.path.join(run_dir, 'checkpoints', 'latest.pt')}")
            if args.sample_every > 0 and hooks[0][1].last_path:
                logger.info(f"EMA sample grid: {hooks[0][1].last_path}")
        return run_dir


if __name__ == "__main__":
    main()
