"""Train a class-conditional latent DiT (Peebles & Xie, 2023), on one process or many (torchrun).

    python train.py                                             # the digits demo: ~23 min on one idle core
    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-XL/2 --data-path /data/imagenet/train
    torchrun --nproc_per_node=8 train.py --model DiT-XL/2 --latents-dir latents/in256 --precision bf16 --compile
    python train.py --resume results/000-DiT-XL-2-layer-norm    # continue a run exactly where it stopped

Demo: `python train.py` alone writes scikit-learn's 8x8 digits once as an ImageFolder (data/digits/),
trains a small pixel-space DiT on them through the same code path as ImageNet (settings: DEMO below) and
ends with an EMA sample grid, one column per digit, at results/<run>/samples/0008000.png (about 23
minutes: 8,000 steps at ~5.8 steps/s on one thread of an idle core). `--demo` with other flags changes its settings.

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
against REF with ditlab/evaluation.py (ADM's FID, sFID, IS, precision, recall; `--fid-features digits` for the
demo). Image i depends only on i and --global-seed (as in sample_ddp.py), so the scores do not depend
on the number of processes, and the training RNG is untouched (resume stays exact). The loop is ditlab.trainer.Trainer:
exact resume (on CPU an interrupted run resumed with --resume ends with bitwise the weights of an
uninterrupted one), and a clear stop on a NaN/inf loss that leaves the last good checkpoint alone.

Pre-emption: SIGTERM, SIGINT or SIGUSR1, sent to the process, to its whole process group (as SLURM and
`timeout` do) or to torchrun, saves a checkpoint at the next step boundary on every rank and exits with
code 75; `--resume auto` continues the newest run with the same settings, so a requeued job script needs
no change (README, "Running on a cluster"). Sample scripts rebuild the model from a checkpoint's config alone.

Settings: the flags, the demo's settings and a resumed run's config resolve into one TrainConfig
(ditlab.config); its fields marked resumable are what a resume may change. `--dry-run` prints it and exits.
"""

import argparse
import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ditlab.cli import COUNT, DROPOUT, INDEX, NON_NEGATIVE, POSITIVE, command
from ditlab.config import RunConfig, RunSpec, interval_warnings, parse_flags, resolve, resumable, runtime
from ditlab.data import (
    LATENT_SCALE, VAE_HELP, BadImages, BatchStream, FlipSampler, LatentShards, check_num_classes, load_vae,
    open_image_folder, read_latents_index, vae_encoder, vae_geometry, write_digits_folder,
)
from ditlab.distributed import barrier, check_global_batch, cleanup_distributed, setup_distributed
from ditlab.errors import InputError, UsageError
from ditlab.features import add_network_args
from ditlab.monitoring import make_fid_hook, make_probe_hook, make_sample_hook, probe_images
from ditlab.preemption import ignore_stop_signals
from ditlab.run import (
    add_model_args, add_optimisation_args, add_run_args, build_trainer, configure_threads, log_failures, open_run,
    seed_ranks,
)
from ditlab.sampling import SAMPLER_HELP, SAMPLERS, check_solver_steps
from ditlab.trainer import compile_mode
from models import NORM_LAYERS, DiT_models, build_model_from_config

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


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """A train.py run's settings: the shared ones plus data, sample grids and FID. A resume may extend the
    run, move its data, tune the step and change what happens between steps; the model and data are fixed."""

    # data
    data_path: str | None = resumable()
    latents_dir: str | None = resumable()
    image_size: int | None
    num_classes: int
    vae: str | None
    latent_scale: float | None
    no_flip: bool
    num_workers: int = resumable()
    max_bad_images: int = resumable()
    # model
    class_dropout_prob: float
    # optimisation: a resume may tune the step
    epochs: int = resumable()
    grad_checkpointing: bool = resumable()
    lr: float = resumable()
    weight_decay: float = resumable()
    ema_decay: float = resumable()
    grad_clip: float | None = resumable()
    precision: str = resumable()
    # run
    results_dir: str = resumable()
    sample_every: int = resumable()
    sample_steps: int = resumable()
    sample_sampler: str = resumable()
    sample_images: int = resumable()
    cfg_scale: float = resumable()
    tensorboard: bool = resumable()
    probe_every: int = resumable()
    probe_samples: int = resumable()
    demo: bool = runtime()
    # FID during training
    fid_every: int = resumable()
    fid_ref: str | None = resumable()
    fid_num_samples: int = resumable()
    fid_cfg_scale: float = resumable()
    fid_sampling_steps: int = resumable()
    fid_sampler: str = resumable()
    fid_batch_size: int = resumable()
    fid_features: str = resumable()
    inception_weights: str | None = resumable()
    digits_classifier: str = resumable()


def add_fid_args(p):
    """The flags of FID during training (make_fid_hook)."""
    g = p.add_argument_group("FID during training (EMA weights; metrics to log.txt, TensorBoard, <run>/metrics.jsonl)")
    g.add_argument("--fid-every", "--eval-every", dest="fid_every", type=INDEX, default=0, help="evaluate every N steps and at the end (0: never)")
    g.add_argument("--fid-ref", default=None, metavar="REF",
                   help="reference images: an ADM reference batch .npz or a folder of images")
    g.add_argument("--fid-num-samples", type=COUNT, default=5000)
    g.add_argument("--fid-cfg-scale", type=NON_NEGATIVE, default=1.5, help="1.5: the paper's FID protocol")
    g.add_argument("--fid-sampling-steps", type=COUNT, default=250, help="sampling steps (the paper: 250 DDPM)")
    g.add_argument("--fid-sampler", choices=SAMPLERS, default="ddpm", help=SAMPLER_HELP)
    g.add_argument("--fid-batch-size", type=COUNT, default=32, help="images per process per sampling batch")
    add_network_args(g, "--fid-features")


def build_parser():
    """train.py's flags, with the reference recipe's defaults (the demo's replace those not given)."""
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
    add_model_args(g, list(DiT_models), sorted(NORM_LAYERS), model_default="DiT-XL/2")
    g.add_argument("--class-dropout-prob", type=DROPOUT, default=0.1, help="label dropout for classifier-free guidance")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=COUNT, default=1400)
    add_optimisation_args(g, global_batch_size=256, lr=1e-4, lr_schedule="constant", warmup_steps=0,
                          ema_decay=0.9999, precision="tf32")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations to save memory")
    g = p.add_argument_group("run")
    add_run_args(g, results_dir="results", log_every=100, ckpt_every=50_000)
    g.add_argument("--sample-every", type=INDEX, default=10_000, help="EMA sample grid every N steps (0: never)")
    g.add_argument("--sample-steps", type=COUNT, default=250, help="sampling steps for the sample grid")
    g.add_argument("--sample-sampler", choices=SAMPLERS, default="ddpm", help=f"sampler of the grid; {SAMPLER_HELP}")
    g.add_argument("--sample-images", type=COUNT, default=16, help="images in the sample grid")
    g.add_argument("--cfg-scale", type=NON_NEGATIVE, default=4.0, help="classifier-free guidance of the grid (1: none)")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard events to <run>/tensorboard")
    g.add_argument("--probe-every", type=INDEX, default=0,
                   help="the per-timestep probe of the EMA model every N steps (eps and x0 error on fixed training "
                        "images and noise, norm-input statistics; ditlab/probe.py) to metrics.jsonl (0: never; "
                        "the demo: 1000)")
    g.add_argument("--probe-samples", type=COUNT, default=64, help="training images the probe denoises")
    g.add_argument("--demo", action="store_true", help="the digits demo (what `python train.py` alone runs); "
                                                       "other flags override its settings")
    add_fid_args(p)
    return p


def demo_preset(args, explicit):
    """DEMO when asked for with --demo, or when no flag but --dry-run is given (`python train.py` alone)."""
    if not explicit - {"dry_run"}:
        args.demo = True
    return DEMO if args.demo else None


def check_sampling_flags(args):
    """The FID's reference exists where an FID is asked for, and the grid's and the FID's sampler can take
    their step counts (checked again after a resume merges the run's flags: a resume with --fid-every
    alone keeps the run's --fid-ref)."""
    if args.fid_every and not args.fid_ref and not args.resume:
        raise UsageError("--fid-every needs --fid-ref REF (an ADM reference batch .npz or a folder of images)")
    demo_writes_it = args.demo and args.fid_ref and os.path.normpath(args.fid_ref) == os.path.normpath(args.data_path)
    if args.fid_ref and not os.path.exists(args.fid_ref) and not demo_writes_it:  # the demo's digits come first
        raise InputError(f"--fid-ref {args.fid_ref}: no such file or folder")
    check_solver_steps(args.sample_sampler, args.sample_steps, "--sample-steps")
    check_solver_steps(args.fid_sampler, args.fid_sampling_steps, "--fid-sampling-steps")


def complete_data(args):
    """Fill in image size, VAE and latent scale: from the latents' index when training from latents (a flag
    that contradicts it is an error; an explicit --vae says where to load it from), else the defaults. Then
    the sizes are checked (data_geometry), before any work."""
    if args.latents_dir:
        index = read_latents_index(args.latents_dir)
        for key in ("image_size", "latent_scale", "vae"):
            flag = getattr(args, key)
            if key != "vae" and flag is not None and flag != index[key]:
                raise UsageError(f"--{key.replace('_', '-')} {flag} contradicts the latents in {args.latents_dir} "
                                 f"({key}={index[key]}); drop the flag")
            if flag is None:
                setattr(args, key, index[key])
        check_num_classes(len(index["classes"]), args.num_classes, f"--latents-dir {args.latents_dir}")
    args.image_size = args.image_size or DEFAULT_IMAGE_SIZE
    args.vae = args.vae or DEFAULT_VAE
    args.latent_scale = args.latent_scale or LATENT_SCALE
    data_geometry(args)


def interval_notes(args, explicit):
    """A typed --fid-every or --sample-every longer than the run (--max-steps) still fires at the last step:
    a warning says the run gets that one only (the checkpoint interval is ditlab.config's)."""
    return interval_warnings(args, explicit, {"fid_every": "the FID is computed only at its last step",
                                              "sample_every": "a sample grid is drawn only at its last step",
                                              "probe_every": "the probe runs only at its last step"})


SPEC = RunSpec(script="train.py", settings=TrainConfig, parser=build_parser, preset=demo_preset,
               check=check_sampling_flags, complete=complete_data, warn=interval_notes,
               logs=("metrics.jsonl", "embeddings.jsonl"))


def parse_args(argv=None):
    """(args, explicit): the flags with the demo's settings filled in where asked for, checked, and the names
    of the flags given on the command line (the first stage of resolve, before any resume)."""
    return parse_flags(SPEC, argv)


@dataclass
class Geometry:
    """The model's input: VAE downsampling factor (1 in pixel space), channels and size in tokens' units."""

    factor: int
    channels: int
    input_size: int


def data_geometry(config):
    """The Geometry of the model's input, read from the latents' index or the VAE's config (no weights
    loaded); UsageError when the image size does not divide into patches."""
    if config.latents_dir:
        if config.vae == "none":
            raise UsageError("--vae none cannot be used with --latents-dir (latents come from a VAE)")
        index = read_latents_index(config.latents_dir)  # the VAE is not needed to train (only to decode grids)
        factor, channels = config.image_size // index["latent_size"], index["latent_channels"]
    else:
        factor, channels = vae_geometry(config.vae)
    patch = int(config.model.split("/")[1])
    if config.image_size <= 0 or config.image_size % (factor * patch):
        what = (f"the patch size {patch} of {config.model}" if factor == 1 else
                f"{factor * patch} (VAE downsampling {factor} x patch size {patch} of {config.model})")
        raise UsageError(f"--image-size {config.image_size} is not a multiple of {what}; "
                         f"pick e.g. {max(1, round(config.image_size / (factor * patch))) * factor * patch}")
    return Geometry(factor, channels, config.image_size // factor)


def new_record(config, geometry, steps_per_epoch):
    """A new run's config.json: every saved setting plus what build_model_from_config reads and what
    sample scripts need (image_size, vae, latent_scale)."""
    return {**config.saved(), "input_size": geometry.input_size, "in_channels": geometry.channels,
            "learn_sigma": True, "steps_per_epoch": steps_per_epoch}


#################################################################################
#                                   Main                                        #
#################################################################################


@command
def main(argv=None):
    """Train one run (or, with --dry-run, print its settings); returns its run directory."""
    # Setup: the settings (flags, demo preset, resumed config), checked before any work; the processes.
    config, ckpt, run_dir, notes = resolve(SPEC, argv)
    if config.dry_run:
        print(config.describe())
        return None
    d = setup_distributed(config.device)
    try:
        # Data: images or latents, and the VAE (before the run directory: a failure here leaves no run behind).
        local_batch = check_global_batch(config.global_batch_size, d.world_size)
        geometry = data_geometry(config)
        dataset, loader, steps_per_epoch = make_loader(config, d, local_batch)
        vae = make_vae(config, d, geometry)
        run = open_run(config, d, SPEC, new_record(config, geometry, steps_per_epoch), ckpt, run_dir, notes)
        logger = run.logger
        with log_failures(logger):
            # Model: the same initial weights on every rank, then one RNG stream per rank.
            torch.manual_seed(config.global_seed)
            model = build_model_from_config(run.record)
            model.check_labels = False  # labels are < num_classes: checked on the data set
            model.grad_checkpointing = config.grad_checkpointing
            seed_ranks(config.global_seed, d)

            # Optimiser: AdamW, EMA and precision (the Trainer), continued from the checkpoint on resume.
            max_steps = config.epochs * steps_per_epoch
            if config.max_steps is not None:
                max_steps = min(max_steps, config.max_steps)
            trainer = build_trainer(run, model, d, max_steps)
            epoch, position = data_position(run, trainer, steps_per_epoch)
            log_start(run, d, model, dataset, steps_per_epoch)

            # Batches: images through the VAE on the fly, or pre-extracted latents, from (epoch, position).
            encode = vae_encoder(vae, config.latent_scale) if vae is not None and not config.latents_dir else None
            check = None
            if not config.latents_dir:  # unreadable images: reported by the loader workers, logged and counted here
                dataset.bad_images_file = os.path.join(run.run_dir, "bad_images.txt")
                check = BadImages(dataset.bad_images_file, config.max_bad_images, logger.warning).check
            stream = BatchStream(loader, steps_per_epoch, d.device, encode, epoch, position, check)

            # Monitoring between steps: EMA sample grids, FID of the EMA model (the training RNG untouched).
            tensorboard = open_tensorboard(run, d)
            hooks = make_hooks(trainer, config, vae, tensorboard)
            if config.probe_every > 0 and d.is_main:
                data = probe_images(dataset, config.probe_samples, config.global_seed, encode, d.device)
                hooks.append((config.probe_every, make_probe_hook(trainer, data)))

            # Training loop: a stop signal saves at the next step boundary and raises Preempted (exit 75).
            logger.info(f"training to step {max_steps}")
            trainer.start(max_steps, log_every=config.log_every, ckpt_every=config.ckpt_every, hooks=hooks,
                          tensorboard=tensorboard, extra_state=stream.state)
            try:
                with trainer.stop:
                    while trainer.step < max_steps:
                        x, y = next(stream)
                        loss, grad_norm = trainer.train_step(x, y)
                        trainer.end_step(loss, grad_norm, len(x))  # log, hooks, checkpoint
            finally:
                stream.close()
                if tensorboard is not None:
                    tensorboard.close()

            # Done: where the run's checkpoint and last grid are.
            if d.is_main:
                logger.info(f"done: step {trainer.step}, checkpoint "
                            f"{os.path.join(run.run_dir, 'checkpoints', 'latest.pt')}")
                if config.sample_every > 0 and hooks[0][1].last_path:
                    logger.info(f"EMA sample grid: {hooks[0][1].last_path}")
            return run.run_dir
    finally:
        cleanup_distributed()


#################################################################################
#                                   Helpers                                     #
#################################################################################


def make_loader(config, d, local_batch):
    """(data set, loader, steps per epoch). Images or their pre-extracted latents, read through the
    same (index, flip) keys of a FlipSampler; the demo writes its digits folder first (rank 0)."""
    if config.demo and not config.latents_dir and not os.path.isdir(config.data_path):
        # Written only into a folder named like the demo's own (data/digits, or .../digits elsewhere): a
        # mistyped path to one's own images must not silently become the digits.
        if os.path.basename(os.path.normpath(config.data_path)) != os.path.basename(DEMO["data_path"]):
            raise InputError(f"--data-path {config.data_path}: no such folder; the demo writes its digits only into "
                             f"a folder named 'digits' (drop --data-path for {DEMO['data_path']}, or give an existing "
                             f"image folder)")
        if d.is_main:
            print(f"writing the digits demo data set to {config.data_path}/ (once)")
            write_digits_folder(config.data_path)
        barrier()
    if config.latents_dir:
        dataset = LatentShards(config.latents_dir)
    else:
        dataset = open_image_folder(config.data_path, config.image_size, config.num_classes)
    sampler = FlipSampler(dataset, num_replicas=d.world_size, rank=d.rank, seed=config.global_seed,
                          flip=not config.no_flip)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise UsageError(f"the data set has {len(dataset)} images, fewer than one global batch of "
                         f"{config.global_batch_size}; lower --global-batch-size")
    # The loader's own generator: creating its iterators must not draw from the global RNG.
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=config.num_workers,
                        pin_memory=d.device.type == "cuda", drop_last=True, worker_init_fn=ignore_stop_signals,
                        persistent_workers=config.num_workers > 0, generator=torch.Generator().manual_seed(0))
    return dataset, loader, steps_per_epoch


def make_vae(config, d, geometry):
    """The VAE that encodes batches on the fly, or (training from latents) only decodes the sample
    grids on rank 0; None when there is nothing for it to do."""
    decodes = (config.sample_every > 0 and d.is_main) or config.fid_every > 0  # grids on rank 0, FID on every rank
    if config.vae == "none" or (config.latents_dir and not decodes):
        return None
    try:
        vae = load_vae(config.vae, d.device)
    except InputError as e:
        if not config.latents_dir:
            raise
        raise InputError(f"{e}\nTraining from latents needs the VAE only to decode the sample grids and FID "
                         f"samples: pass --vae PATH (a local copy), or --sample-every 0 and --fid-every 0") from None
    if vae.config.latent_channels != geometry.channels:
        raise InputError(f"the VAE {config.vae} has {vae.config.latent_channels} latent channels; "
                         f"the latents have {geometry.channels}")
    return vae


def data_position(run, trainer, steps_per_epoch):
    """(epoch, batch) at which the data resumes: (0, 0) for a new run, else the checkpoint's (the next
    epoch's start after its last batch); a resumed run logs where it continues."""
    if not run.resumed:
        return 0, 0
    epoch, position = run.ckpt.get("epoch", 0), run.ckpt.get("position", 0)
    if position >= steps_per_epoch:
        epoch, position = epoch + 1, 0
    run.logger.info(f"resumed {run.run_dir} at step {trainer.step} (epoch {epoch}, batch {position})")
    return epoch, position


def open_tensorboard(run, d):
    """A TensorBoard writer into <run>/tensorboard on rank 0 with --tensorboard, else None."""
    if not (run.config.tensorboard and d.is_main):
        return None
    from torch.utils.tensorboard import SummaryWriter  # lazily: it imports TensorBoard, seconds

    return SummaryWriter(os.path.join(run.run_dir, "tensorboard"))


def make_hooks(trainer, config, vae, tensorboard):
    """The Trainer's hooks: the EMA sample grid every --sample-every steps (first, when on), the FID every
    --fid-every steps."""
    hooks = []
    if config.sample_every > 0:
        hooks.append((config.sample_every, make_sample_hook(trainer, config, vae, tensorboard)))
    if config.fid_every > 0:
        hooks.append((config.fid_every, make_fid_hook(trainer, config, vae, tensorboard)))
    return hooks


def log_start(run, d, model, dataset, steps_per_epoch):
    """The run's opening lines: threads, model, data and schedule."""
    config, record = run.config, run.record
    params = sum(p.numel() for p in model.parameters())
    run.logger.info(configure_threads(config.threads, params))
    source = f"latents {config.latents_dir}" if config.latents_dir else f"images {config.data_path}"
    run.logger.info(f"run {run.run_dir}: {config.model} ({params:,} parameters, depth {len(model.blocks)}, width "
                    f"{model.pos_embed.shape[-1]}, normalization {config.normalization}), {source}: "
                    f"{len(dataset):,} images, {len(dataset.classes)} classes, {config.image_size}px, vae "
                    f"{config.vae}, input {record['in_channels']}x{record['input_size']}x{record['input_size']}")
    run.logger.info(f"{d.world_size} process(es) on {d.device.type}, global batch {config.global_batch_size}, "
                    f"{steps_per_epoch} steps per epoch, lr {config.lr} ({config.lr_schedule}"
                    + (f", {config.warmup_steps} warm-up steps" if config.warmup_steps else "")
                    + f"), precision {config.precision}"
                    + (f", compiled ({compile_mode(config.compile)})" if compile_mode(config.compile) else "")
                    + (", grad checkpointing" if config.grad_checkpointing else ""))


if __name__ == "__main__":
    main()
