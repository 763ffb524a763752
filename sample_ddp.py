"""Draw many samples in parallel (for FID): PNGs plus the .npz that ADM's evaluation suite reads.

    torchrun --nnodes=1 --nproc_per_node=8 sample_ddp.py --num-fid-samples 50000      # official DiT-XL/2
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt results/000-DiT-XL-2-none --cfg-scale 1.5
    python sample_ddp.py --ckpt results/000-DiT-S-2-none --num-fid-samples 1000          # one process

Writes `<sample-dir>/<folder>/<index:06d>.png` (--sample-dir: results/samples by default) and then `<sample-dir>/<folder>.npz` (uint8 N x H x W x 3
under `arr_0`, the class labels under `arr_1`, as ADM's class-conditional sampler stores them); the folder
name records everything that determines the images. `--eval-ref REF` then scores the .npz against REF
(ditlab/evaluation.py: FID, sFID, IS, precision, recall; or --eval-features digits for the digits demo) and writes
the metrics to `<sample-dir>/<folder>.metrics.json`:

    torchrun --nproc_per_node=8 sample_ddp.py --eval-ref VIRTUAL_imagenet256_labeled.npz --inception-weights w.pth
    python sample_ddp.py --ckpt results/000-DiT-S-4-layer-norm --num-fid-samples 1000 --eval-ref data/digits \
        --eval-features digits

Image i depends only on i, --global-seed and the flags: its label, starting noise and every DDPM step's
noise come from its own generator (sample.image_generators), and images are drawn in fixed batches
[k * B, (k + 1) * B) with B = --per-proc-batch-size that are dealt out to the processes. So the same
images come out for any number of processes (bit for bit, for the same B). PNGs are written
atomically; a rerun of the same command skips the images already written (an interrupted run resumes).
SIGTERM, SIGINT or SIGUSR1 (a cluster's pre-emption) stops after the batch in progress, its images saved,
with exit code 75.
The reference guides the first 3 latent channels only (--cfg-channels 3 reproduces that); the default
here guides every noise channel.
"""

import argparse
import glob
import os
import sys
from types import SimpleNamespace
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from diffusion import create_diffusion
from ditlab.cli import COUNT, INDEX, NON_NEGATIVE, command
from ditlab.constants import LATENT_SCALE
from ditlab.data import load_vae
from ditlab.distributed import barrier, broadcast_object, cleanup_distributed, setup_distributed
from ditlab.errors import PREEMPTED_EXIT, InputError, Preempted
from ditlab.evaluation import Evaluator, given_stats, open_images, summary_line
from ditlab.features import EvaluationError, add_network_args
from ditlab.files import atomic_write, check_output_dir, write_json
from ditlab.preemption import StopFlag
from ditlab.sampling import (
    add_model_args,
    check_vae,
    draw_images,
    image_generators,
    image_labels,
    load_for_sampling,
    prepare_guidance,
    progress_bar,
)


SAMPLE_DIR = os.path.join("results", "samples")  # results/ is git-ignored: no stray folder in the repository


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--sample-dir", default=SAMPLE_DIR, help="where the PNG folders and .npz files go (created)")
    p.add_argument("--per-proc-batch-size", type=COUNT, default=32)
    p.add_argument("--num-fid-samples", type=COUNT, default=50_000)
    p.add_argument("--cfg-scale", type=NON_NEGATIVE, default=1.5, help="1.5 for the paper's FID-50K")
    p.add_argument("--global-seed", type=INDEX, default=0)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on Ampere+ GPUs (faster, as the reference; --no-tf32 for full fp32)")
    g = p.add_argument_group("evaluation (rank 0, once the .npz is written)")
    g.add_argument("--eval-ref", default=None, metavar="REF",
                   help="score the samples against REF (an ADM reference batch .npz or a folder of images)")
    add_network_args(g, "--eval-features")
    g.add_argument("--eval-batch-size", type=COUNT, default=64)
    args = p.parse_args(argv)
    if args.eval_ref is not None and not os.path.exists(args.eval_ref):
        p.error(f"--eval-ref {args.eval_ref}: no such file or folder")  # before hours of sampling
    if args.per_proc_batch_size < 1 or args.num_fid_samples < 1:
        p.error("--per-proc-batch-size and --num-fid-samples must be positive")
    return args


def checkpoint_tag(ckpt, config):
    """Short name of the weights: 'pretrained', or '<run dir>-<checkpoint>' (latest.pt is named by its
    training step, so that a resumed sampling run never mixes two checkpoints)."""
    if ckpt is None:
        return "pretrained"
    path = os.path.abspath(ckpt)
    if os.path.isdir(path):
        run, name = os.path.basename(path), "latest"
    else:
        name = os.path.splitext(os.path.basename(path))[0]
        parent = os.path.dirname(path)
        run = os.path.basename(os.path.dirname(parent)) if os.path.basename(parent) == "checkpoints" else ""
    if name == "latest" and config.get("ckpt_step") is not None:
        name = f"{config['ckpt_step']:07d}"  # the name the Trainer gives the numbered checkpoint
    return "-".join(part for part in (run, name) if part)


def folder_name(args, config, cfg_scale):
    """Every setting that changes the images, as a folder name."""
    vae = os.path.basename(os.path.normpath(str(config["vae"])))
    cfg = f"cfg-{cfg_scale}" + (f"-ch{args.cfg_channels}" if args.cfg_channels is not None and cfg_scale > 1 else "")
    return (f"{config['model'].replace('/', '-')}-{checkpoint_tag(args.ckpt, config)}-{args.weights}-"
            f"{config.get('normalization', 'layer-norm')}-size-{config['image_size']}-vae-{vae}-{cfg}-"
            f"{args.sampler}-{args.num_sampling_steps}-seed-{args.global_seed}")


def png_path(folder, index):
    return os.path.join(folder, f"{index:06d}.png")


def missing_indices(folder, num):
    """Indices in [0, num) without a PNG (PNGs are renamed into place only once complete)."""
    return [i for i in range(num) if not os.path.isfile(png_path(folder, i)) or os.path.getsize(png_path(folder, i)) == 0]


def batches_to_draw(missing, num, batch_size):
    """The fixed batches [k*B, (k+1)*B) that contain a missing image. A batch is always drawn whole, so
    every image is computed in the same batch whatever the number of processes or interruptions."""
    starts = sorted({i // batch_size * batch_size for i in missing})
    return [range(s, min(s + batch_size, num)) for s in starts]


def save_png(path, array):
    """Write a PNG through a temp file and a rename: a PNG under its final name is always complete."""
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def create_npz(folder, num, path, labels=None):
    """Stream PNGs 0..num-1 into `path` as an .npz with the uint8 array `arr_0` (num, H, W, 3), without
    holding them all in memory, and `labels` (int64, num) as `arr_1` when given; written atomically.
    InputError naming a PNG that cannot be read or is of another size (delete it and rerun to redraw it)."""

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                shape = None
                for i in progress_bar(range(num), "building .npz", unit="img", mininterval=5):
                    try:
                        with Image.open(png_path(folder, i)) as im:
                            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
                    except Exception as e:
                        raise InputError(f"cannot read {png_path(folder, i)} ({e}): delete it and rerun to redraw it")
                    if shape is None:
                        shape = array.shape
                        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                                  "shape": (num, *shape)}
                        np.lib.format.write_array_header_1_0(out, header)
                    elif array.shape != shape:
                        raise InputError(f"{png_path(folder, i)} is {array.shape}, expected {shape}: delete it and rerun")
                    out.write(array.tobytes())
            if labels is not None:
                with zf.open("arr_1.npy", "w") as out:
                    np.lib.format.write_array(out, np.asarray(labels, dtype=np.int64), allow_pickle=False)

    atomic_write(path, write)
    return path


def draw_batches(mine, todo, folder, sampler, args):
    """Draw this process's batches and save the images still missing (`todo`); `sampler` holds the model,
    its diffusion, VAE, config, guidance scale and the process's DistInfo. Returns how many images were
    written. A stop signal ends it after the batch in progress, its images saved: Preempted (exit code
    PREEMPTED_EXIT). Rank 0 shows its images/s and ETA once the batches run long (sampling.progress_bar)."""
    written, d = 0, sampler.dist
    desc = "sampling" + (f" (rank 0 of {d.world_size})" if d.world_size > 1 else "")
    with StopFlag() as stop, progress_bar(desc=desc, total=sum(map(len, mine)), unit="img",
                                          disable=not d.is_main) as bar:
        for indices in mine:
            images, _ = draw_images(sampler.model, sampler.diffusion, indices, args.global_seed, sampler.vae,
                                    sampler.config.get("latent_scale", LATENT_SCALE), sampler.cfg_scale,
                                    args.cfg_channels, args.sampler)
            for index, image in zip(indices, images):
                if index in todo:
                    save_png(png_path(folder, index), image)
                    written += 1
            bar.update(len(indices))
            if stop:
                raise Preempted(f"[rank {d.rank}] {stop.name} received: stopped after {written} new images, all "
                                f"saved; rerun the same command to draw the rest (exit code {PREEMPTED_EXIT})")
    return written


def evaluate_npz(path, out, args, device):
    """Score the .npz against --eval-ref and write the metrics as JSON to `out`. EvaluationError saying
    that the samples are kept and how to score them once the problem is fixed."""
    start = time.time()
    try:
        evaluator = Evaluator(args.eval_ref, features=args.eval_features, inception_weights=args.inception_weights,
                              digits_classifier=args.digits_classifier, batch_size=args.eval_batch_size,
                              device=device)
        metrics = evaluator(path)
    except EvaluationError as e:
        raise EvaluationError(f"the samples are saved in {path}, but scoring them failed: {e}\n"
                              f"fix that and score them with: python evaluate.py {path} {args.eval_ref}") from None
    metrics.update(samples=os.path.abspath(path), reference=os.path.abspath(args.eval_ref),
                   seconds=round(time.time() - start, 2))
    write_json(out, metrics)
    print(f"{summary_line(metrics)}\nwrote {out}", file=sys.stderr, flush=True)
    return metrics


@command
def main(argv=None):
    """Draw the missing images of the folder the flags name, build its .npz and score it; returns the folder."""
    args = parse_args(argv)
    check_output_dir(args.sample_dir, "--sample-dir")  # before the model loads
    if args.eval_ref is not None:  # a bad reference is refused now, not after hours of sampling
        given_stats(open_images(args.eval_ref), args.eval_features)
    d = setup_distributed(args.device)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    # Rank 0 first, so that an official file is downloaded once.
    if d.is_main:
        model, config = load_for_sampling(args)
    barrier()
    if not d.is_main:
        model, config = load_for_sampling(args)
    model.to(d.device)
    model.check_labels = False  # labels are drawn in range below; skip the per-call host sync
    cfg_scale = prepare_guidance(model, args.cfg_scale, args.cfg_channels)
    vae = load_vae(config["vae"], d.device)
    check_vae(vae, model, config)
    diffusion = create_diffusion(str(args.num_sampling_steps), learn_sigma=config.get("learn_sigma", True))
    num, batch_size = args.num_fid_samples, args.per_proc_batch_size
    folder = os.path.join(args.sample_dir, folder_name(args, config, cfg_scale))

    missing = None
    if d.is_main:
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(os.path.join(folder, ".tmp-*")):  # left by an interrupted run
            os.unlink(stale)
        missing = missing_indices(folder, num)
        print(f"{folder}: {num - len(missing)} of {num} images already there, drawing {len(missing)} with "
              f"{d.world_size} process(es) x batch {batch_size} ({config['model']}, {args.sampler} "
              f"{args.num_sampling_steps} steps, cfg {cfg_scale})", file=sys.stderr, flush=True)
    missing = broadcast_object(missing)
    todo = set(missing)
    mine = batches_to_draw(missing, num, batch_size)[d.rank::d.world_size]

    start = time.time()
    sampler = SimpleNamespace(model=model, diffusion=diffusion, vae=vae, config=config, cfg_scale=cfg_scale, dist=d)
    written = draw_batches(mine, todo, folder, sampler, args)
    total = torch.tensor([written], dtype=torch.long, device=d.device)
    if dist.is_initialized():
        dist.all_reduce(total)
    elapsed = time.time() - start
    if d.is_main:
        print(f"drew {int(total)} images in {elapsed:.1f}s: {int(total) / max(elapsed, 1e-9):.2f} images/s "
              f"({d.world_size} process(es))", file=sys.stderr, flush=True)
    barrier()
    if d.is_main:
        labels = image_labels(image_generators(args.global_seed, range(num)), model.num_classes)
        path = create_npz(folder, num, folder + ".npz", labels)
        print(f"saved {path} ({num} images, labels as arr_1)", file=sys.stderr, flush=True)
        if args.eval_ref is not None:
            evaluate_npz(path, folder + ".metrics.json", args, d.device)
    barrier()
    cleanup_distributed()
    return folder


if __name__ == "__main__":
    main()
