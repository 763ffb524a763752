"""Encode an ImageFolder data set with the VAE once, so train.py --latents-dir can skip the VAE.

    python extract_latents.py --data-path /data/imagenet/train --latents-dir latents/in256 --image-size 256
    torchrun --nproc_per_node=8 extract_latents.py --data-path /data/imagenet/train --latents-dir latents/in256

Every image is ADM-center-cropped exactly as train.py does it and encoded twice, as is and mirrored, so
training can pick the flip that data.FlipSampler chooses for each step. Output in --latents-dir:

    shard-00000.pt ...  {"latents": (n, 2, C, h, w) [unflipped, flipped] * latent_scale, "labels": (n,),
                         "start": index of the first image}; shard k holds images k*S ... k*S + n - 1
    index.json          sizes, classes, VAE, latent scale and the list of shards (written last)

Shard k is encoded by rank k % world_size, with the posterior noise drawn from a generator seeded by
(--global-seed, k): the output is the same for any number of processes. The latents follow the same
distribution as train.py's on-the-fly encoding but not the same bits (other noise draws). Shards are
written atomically; a rerun with the same settings keeps the shards that are already there. SIGTERM,
SIGINT or SIGUSR1 (a cluster's pre-emption) stops between two batches with exit code 75: rerun the same
command to finish.
"""

import argparse
import json
import math
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset

from ditlab.checkpoint_io import save_checkpoint
from ditlab.cli import COUNT, INDEX, POSITIVE, command
from ditlab.constants import LATENT_SCALE
from ditlab.data import (
    INDEX_FILE,
    LATENTS_FORMAT,
    VAE_HELP,
    BadImages,
    load_vae,
    open_image_folder,
    stop_workers,
    vae_geometry,
)
from ditlab.distributed import barrier, cleanup_distributed, setup_distributed
from ditlab.errors import PREEMPTED_EXIT, InputError, Preempted, UsageError
from ditlab.files import write_json
from ditlab.preemption import StopFlag, ignore_stop_signals

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SETTINGS_FILE = "settings.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="ImageFolder tree: DIR/<class>/<image>")
    p.add_argument("--latents-dir", required=True, help="output directory")
    p.add_argument("--image-size", type=COUNT, default=256)
    p.add_argument("--num-classes", type=COUNT, default=1000, help="error if the folder has more classes")
    p.add_argument("--vae", default="ema", help=VAE_HELP.replace(" | none (pixel space)", ""))
    p.add_argument("--latent-scale", type=POSITIVE, default=LATENT_SCALE)
    p.add_argument("--batch-size", type=COUNT, default=32, help="images per VAE call per process (x2 with flips)")
    p.add_argument("--shard-size", type=COUNT, default=10_000, help="images per shard file")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="storage type of the latents")
    p.add_argument("--num-workers", type=INDEX, default=4)
    p.add_argument("--max-bad-images", type=INDEX, default=10,
                   help="unreadable images (each reported once, replaced by the next readable one) tolerated")
    p.add_argument("--global-seed", type=INDEX, default=0)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    return p.parse_args(argv)


class BothFlips(Dataset):
    """Images start..end-1 of a FlipImageFolder as (2, 3, H, W) [image, mirrored image] and labels."""

    def __init__(self, folder, start, end):
        self.folder, self.start, self.end = folder, start, end

    def __len__(self):
        return self.end - self.start

    def __getitem__(self, i):
        x, label = self.folder.image(self.start + i)
        return torch.stack([x, x.flip(-1)]), label


def shard_seed(global_seed, k):
    """Seed of shard k's posterior noise: the same whichever process encodes it."""
    return (global_seed << 32) + k


@torch.no_grad()
def encode_shard(vae, folder, span, args, device, stop=()):
    """Latents (n, 2, C, h, w) and labels (n,) of images span = (start, end): start..end-1; None when `stop` turned true
    between two batches (a stop signal: the shard is redone by the next run)."""
    start, end = span
    loader = DataLoader(BothFlips(folder, start, end), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)
    generator = torch.Generator().manual_seed(shard_seed(args.global_seed, start // args.shard_size))
    latents, labels = [], []
    batches = iter(loader)
    try:
        for x, y in batches:
            if stop:
                return None
            x = x.to(device, non_blocking=True).flatten(0, 1)  # (2B, 3, H, W): image, mirror, image, mirror, ...
            z = vae.encode(x).latent_dist.sample(generator=generator).mul_(args.latent_scale)
            latents.append(z.unflatten(0, (-1, 2)).to("cpu", DTYPES[args.dtype]))
            labels.append(y)
    finally:
        stop_workers(batches)  # also on a failure: they ignore SIGTERM, exit would wait for them
    return torch.cat(latents), torch.cat(labels).long()


def shard_entry(k, shard_size, n):
    """The index entry of shard k: its file name, first image and image count."""
    start, end = k * shard_size, min((k + 1) * shard_size, n)
    return dict(file=f"shard-{k:05d}.pt", start=start, count=end - start)


def encode_my_shards(vae, folder, shards, args, d, *, stop=(), t0=None, check_bad_images=lambda: None):
    """Encode and save this rank's shards that are not on disk yet (every world_size-th). Returns False
    when a stop signal came first (the shard in progress is dropped and redone by the next run)."""
    for k, shard in enumerate(shards):
        path = os.path.join(args.latents_dir, shard["file"])
        if k % d.world_size != d.rank or os.path.isfile(path):
            continue
        start, end = shard["start"], shard["start"] + shard["count"]
        encoded = encode_shard(vae, folder, (start, end), args, d.device, stop)
        if encoded is None:
            return False
        latents, labels = encoded
        check_bad_images()  # before saving: a shard past the limit is not written
        save_checkpoint({"latents": latents, "labels": labels, "start": start}, path)
        print(f"[rank {d.rank}] wrote {path} ({end - start} images, {time.time() - t0:.0f}s)", flush=True)
        if stop:
            return False
    return True


def check_settings(path, settings):
    """A rerun must have the same settings as the shards already there (then they are kept); UsageError
    naming the settings that differ otherwise."""
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise UsageError(f"{os.path.dirname(path)} holds latents made with other settings ({', '.join(changed)} "
                             f"differ); use a new --latents-dir or delete that one")


@command
def main(argv=None):
    """Encode the shards of --data-path this rank owns, then (rank 0) write the index."""
    args = parse_args(argv)
    factor, channels = vae_geometry(args.vae) if args.vae != "none" else (None, None)
    if factor is None:
        raise UsageError("--vae none: there is nothing to extract (train.py --vae none trains on pixels)")
    if args.image_size <= 0 or args.image_size % factor:
        raise UsageError(f"--image-size {args.image_size} is not a multiple of the VAE's downsampling factor {factor}")
    d = setup_distributed(args.device)
    try:
        folder = open_image_folder(args.data_path, args.image_size, args.num_classes)
        n = len(folder)
        num_shards = math.ceil(n / args.shard_size)
        settings = dict(format=LATENTS_FORMAT, num_images=n, classes=folder.classes, image_size=args.image_size,
                        vae=args.vae, latent_scale=args.latent_scale, latent_size=args.image_size // factor,
                        latent_channels=channels, shard_size=args.shard_size, dtype=args.dtype,
                        global_seed=args.global_seed, data_path=os.path.abspath(args.data_path))
        os.makedirs(args.latents_dir, exist_ok=True)
        settings_path = os.path.join(args.latents_dir, SETTINGS_FILE)
        check_settings(settings_path, settings)
        barrier()
        if d.is_main:
            write_json(settings_path, settings)
        vae = load_vae(args.vae, d.device)
        if vae.config.latent_channels != channels:
            raise InputError(f"the VAE {args.vae} config says {channels} latent channels, the model has "
                             f"{vae.config.latent_channels}")
        if d.is_main:
            print(f"encoding {n:,} images ({len(folder.classes)} classes) at {args.image_size}px, both flips, with "
                  f"{args.vae} into {num_shards} shards of {args.shard_size} in {args.latents_dir} "
                  f"({d.world_size} process(es) on {d.device.type})", flush=True)
        t0 = time.time()
        shards = [shard_entry(k, args.shard_size, n) for k in range(num_shards)]
        folder.bad_images_file = os.path.join(args.latents_dir, "bad_images.txt")
        bad = BadImages(folder.bad_images_file, args.max_bad_images, print)
        with StopFlag() as stop:
            finished = encode_my_shards(vae, folder, shards, args, d, stop=stop, t0=t0, check_bad_images=bad.check)
        if not finished:  # said in the progress log (stdout) too, beside the shards it wrote
            print(f"[rank {d.rank}] {stop.name} received: stopped between batches; the shards written so far are "
                  f"kept, rerun the same command to finish (exit code {PREEMPTED_EXIT})", flush=True)
            raise Preempted(f"stopped by {stop.name}; rerun the same command to finish the extraction")
        barrier()
        if d.is_main:
            missing = [s["file"] for s in shards if not os.path.isfile(os.path.join(args.latents_dir, s["file"]))]
            if missing:
                raise InputError(f"shards missing after extraction: {missing[:5]}")
            write_json(os.path.join(args.latents_dir, INDEX_FILE), {**settings, "shards": shards})
            print(f"done: {n:,} images in {time.time() - t0:.0f}s; train with --latents-dir {args.latents_dir}")
        barrier()
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
