"""Training data: ImageFolder images with the ADM crop, flips, unreadable-image handling, latent shards, the
VAE, the digits demo data set, and the batch stream a run reads from.

Layer: above checkpoint_io (latent shards are read through load_checkpoint); below everything that loads
models. A bad flag or unusable data raises UsageError or InputError with the line to show the user."""

import bisect
import json
import os
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler
from torchvision.datasets import ImageFolder

from ditlab.checkpoint_io import load_checkpoint
from ditlab.constants import LATENT_SCALE  # noqa: F401  (moved to ditlab.constants; still importable from here)
from ditlab.errors import InputError, UsageError

#################################################################################
#                               Images                                          #
#################################################################################


def center_crop_arr(pil_image, image_size):
    """ADM center crop: halve with BOX while the short side is at least twice the target, then a
    BICUBIC resize to a short side of exactly `image_size`, then crop the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def to_tensor(arr):
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


# Data sets whose decoded images fit in this many bytes are cached in memory, each loader process its own copy
# (CIFAR-10's 50,000 32px images take 150 MB; ImageNet at 256px is never cached).
CACHE_BYTES = 256 * 2 ** 20


class FlipImageFolder(ImageFolder):
    """An ImageFolder indexed by (index, flip) keys: returns the ADM-center-cropped image scaled to
    [-1, 1], mirrored left-right when flip is 1, and its class label.

    Mirroring the tensor is exactly mirroring the picture (a permutation of pixels), so
    `dataset[i, 1][0] == dataset[i, 0][0].flip(-1)`. A data set of at most `cache_bytes` decoded is
    kept in memory after its first read (the same values, without decoding every epoch again).
    """

    def __init__(self, root, image_size, cache_bytes=CACHE_BYTES):
        super().__init__(root)
        self.image_size = image_size
        self.bad_images_file = None  # where unreadable images are reported (set before the workers start)
        # Kept decoded (uint8) after the first read: a small model's step is short beside decoding its batch
        # (the digits demo: about a tenth of a step; benchmarks/digits_step.py).
        self.cache = {} if len(self.samples) * 3 * image_size ** 2 <= cache_bytes else None

    def image(self, index):
        """The unflipped (3, H, W) image `index` and its label; an unreadable image is reported and
        replaced by the next readable one (index + 1, + 2, ... wrapping around)."""
        if self.cache is not None and index in self.cache:
            arr, label = self.cache[index]
            return to_tensor(arr), label
        for i in range(index, index + len(self.samples)):
            path, label = self.samples[i % len(self.samples)]
            try:
                arr = center_crop_arr(self.loader(path), self.image_size)
            except UNREADABLE as e:
                report_bad_image(self.bad_images_file, path, e)
                continue
            if self.cache is not None:
                self.cache[index] = np.ascontiguousarray(arr), label  # not a view of the resized picture
            return to_tensor(arr), label
        raise InputError(f"no image in {self.root} can be read")

    def __getitem__(self, key):
        index, flip = key
        x, label = self.image(index)
        return (x.flip(-1) if flip else x), label


# What PIL raises for a truncated, corrupt or non-image file (UnidentifiedImageError is an OSError).
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def report_bad_image(report_file, path, error):
    """Append "path<TAB>reason" to the report file (one short O_APPEND write: safe from many workers),
    once per image: an image already listed (it fails again every epoch) is not added again."""
    line = f"{path}\t{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
    if report_file is None:
        print(f"unreadable image skipped: {line.strip()}", flush=True)
        return
    try:
        with open(report_file) as f:
            if any(known.partition("\t")[0] == path for known in f):
                return
    except FileNotFoundError:
        pass
    with open(report_file, "a") as f:
        f.write(line)


class BadImages:
    """The main process's view of the unreadable-image reports in `report_file`: `check()` logs every
    newly reported image once (with its reason) and stops with a clear message when more than `limit`
    distinct images are unreadable. Earlier reports in the file (a resumed run) count too, silently."""

    def __init__(self, report_file, limit, log, flag="--max-bad-images"):
        self.report_file, self.limit, self.log, self.flag = report_file, limit, log, flag
        self.seen, self._offset = set(), 0
        self.check(quiet=True)

    def check(self, quiet=False):
        """Read the reports added since the last call, log each new image (unless `quiet`) and raise
        InputError once more than `limit` distinct images are unreadable."""
        try:
            if os.path.getsize(self.report_file) == self._offset:
                return
            with open(self.report_file) as f:
                f.seek(self._offset)
                text = f.read()
        except FileNotFoundError:
            return
        complete = text[:text.rfind("\n") + 1]  # a line still being written is read next time
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            path, _, reason = line.partition("\t")
            if path not in self.seen:
                self.seen.add(path)
                if not quiet:
                    self.log(f"unreadable image skipped (replaced by the next readable one): {path} ({reason})")
        if len(self.seen) > self.limit:
            n = len(self.seen)
            raise InputError(f"{n} unreadable image{'s' * (n != 1)}, more than {self.flag} {self.limit} (list in "
                             f"{self.report_file}): repair or remove them, or raise {self.flag}")


def open_image_folder(path, image_size, num_classes):
    """FlipImageFolder at `path`; UsageError when no path is given or it holds too many classes, InputError
    for a missing folder or one that is not an ImageFolder tree."""
    if not path:
        raise UsageError("no data: pass --data-path DIR (an ImageFolder tree: DIR/<class>/<image>) or --latents-dir, "
                         "or --demo for the built-in digits demo (what `python train.py` with no flags runs)")
    if not os.path.isdir(path):
        raise InputError(f"--data-path {path}: no such directory (expected an ImageFolder tree DIR/<class>/<image>)")
    try:
        dataset = FlipImageFolder(path, image_size)
    except (FileNotFoundError, RuntimeError) as e:  # torchvision: no class folders / no images
        raise InputError(f"--data-path {path}: not a usable ImageFolder tree (DIR/<class>/<image>): {e}")
    check_num_classes(len(dataset.classes), num_classes, f"--data-path {path}")
    return dataset


def check_num_classes(found, num_classes, where):
    """UsageError when the data at `where` has more classes than the model's label table holds."""
    if found > num_classes:
        raise UsageError(f"{where} has {found} classes but --num-classes is {num_classes}; "
                         f"pass --num-classes {found} (or more)")


#################################################################################
#                          The deterministic sampler                            #
#################################################################################


class FlipSampler(DistributedSampler):
    """DistributedSampler (shuffled, drop_last, seeded by --global-seed) that yields (index, flip)
    keys and can start part-way into an epoch.

    The permutation is the DistributedSampler's (seed + epoch); the flip of every data set index is
    drawn from its own generator seeded by (seed, epoch), so an image's flip in an epoch does not
    depend on the world size either. `start` skips that many of this rank's keys without loading
    them (set it for the first epoch of a resumed run, back to 0 afterwards). flip=False turns the
    augmentation off (the digits demo: a mirrored digit is not a digit).
    """

    FLIP_SEED_OFFSET = 1_000_003  # keeps the flip stream apart from the permutation stream

    def __init__(self, dataset, num_replicas, rank, seed, flip=True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.flip = flip  # False: every key has flip 0 (no augmentation)
        self.start = 0

    def flips(self):
        """One 0/1 flip per data set index for the current epoch."""
        if not self.flip:
            return [0] * len(self.dataset)
        g = torch.Generator().manual_seed(self.FLIP_SEED_OFFSET * (self.seed + 1) + self.epoch)
        return torch.randint(0, 2, (len(self.dataset),), generator=g).tolist()

    def __iter__(self):
        flips = self.flips()
        indices = list(super().__iter__())[self.start:]
        return iter([(i, flips[i]) for i in indices])

    def __len__(self):
        return self.num_samples - self.start


#################################################################################
#                             Pre-extracted latents                             #
#################################################################################

INDEX_FILE = "index.json"
LATENTS_FORMAT = 1


def read_latents_index(latents_dir):
    """The index.json extract_latents.py writes; InputError when there is none or its format is another."""
    path = os.path.join(latents_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise InputError(f"--latents-dir {latents_dir}: no {INDEX_FILE} (make one with extract_latents.py, "
                         f"and let it finish: the index is written last)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != LATENTS_FORMAT:
        raise InputError(f"{path}: latents format {index.get('format')!r}, this code reads {LATENTS_FORMAT}")
    return index


class LatentShards(Dataset):
    """The shards of extract_latents.py, indexed by (index, flip) keys like FlipImageFolder: returns
    the float32 latent of image `index` (mirrored before encoding when flip is 1) and its label.

    Shards are memory-mapped (opened lazily in each worker), so a data set larger than memory is fine.
    """

    def __init__(self, latents_dir):
        self.dir = latents_dir
        self.index = read_latents_index(latents_dir)
        self.shards = self.index["shards"]
        self.starts = [s["start"] for s in self.shards]
        self.classes = self.index["classes"]
        self._open = {}

    def __len__(self):
        return self.index["num_images"]

    def shard(self, k):
        """Shard k's {"latents", "labels", "start"}, memory-mapped on first use."""
        if k not in self._open:
            path = os.path.join(self.dir, self.shards[k]["file"])
            self._open[k] = load_checkpoint(path, mmap=True)
        return self._open[k]

    def __getitem__(self, key):
        index, flip = key
        k = bisect.bisect_right(self.starts, index) - 1
        shard = self.shard(k)
        i = index - self.starts[k]
        return shard["latents"][i, int(flip)].float(), int(shard["labels"][i])

    def __getstate__(self):  # workers re-open the memory maps themselves
        return {**self.__dict__, "_open": {}}


#################################################################################
#                                   The VAE                                     #
#################################################################################

VAE_HELP = "ema | mse (stabilityai/sd-vae-ft-<ema|mse>) | none (pixel space) | PATH (a local AutoencoderKL folder)"


def vae_source(vae):
    """What AutoencoderKL.from_pretrained loads for a --vae value."""
    if vae in ("ema", "mse"):
        return f"stabilityai/sd-vae-ft-{vae}"
    if os.path.isdir(vae):
        return vae
    raise InputError(f"--vae {vae!r}: expected {VAE_HELP}; {vae!r} is not a directory")


def vae_geometry(vae):
    """(downsampling factor, latent channels) of a --vae value, read without loading any weights:
    8 and 4 for the Stable Diffusion VAEs, from config.json for a local folder, 1 and 3 for none."""
    if vae == "none":
        return 1, 3
    source = vae_source(vae)
    if source.startswith("stabilityai/"):
        return 8, 4
    config_path = os.path.join(source, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"--vae {vae}: no config.json there (save the VAE with AutoencoderKL.save_pretrained)")
    with open(config_path) as f:
        config = json.load(f)
    return 2 ** (len(config["block_out_channels"]) - 1), config["latent_channels"]


def load_vae(vae, device):
    """The frozen diffusers AutoencoderKL for a --vae value, in eval mode on `device` (training, latent
    extraction, sampling and analysis all load it here); None for "none" (a pixel-space model). InputError
    when it cannot be loaded (offline and not cached, a folder of something else)."""
    if vae == "none":
        return None
    from diffusers.models import AutoencoderKL  # lazily: diffusers takes seconds to import

    source = vae_source(vae)
    try:
        model = AutoencoderKL.from_pretrained(source)
    except Exception as e:  # offline hub, missing files, a folder of something else
        raise InputError(f"could not load the VAE {source!r}: {e}\n"
                         f"Offline? Pass --vae PATH to a local copy (AutoencoderKL.save_pretrained), or use a "
                         f"Hugging Face cache with HF_HUB_OFFLINE=1")
    model.requires_grad_(False)
    return model.eval().to(device)


#################################################################################
#                                 Digits demo                                   #
#################################################################################


def digits_images(size=32):
    """(PIL images, labels): scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as grayscale
    images upscaled (bicubic) to size x size, values 0..16 mapped to 0..255."""
    from sklearn.datasets import load_digits  # lazily: only the digits demo needs scikit-learn

    digits = load_digits()
    images = [Image.fromarray((image * (255.0 / 16.0)).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
              for image in digits.images]
    return images, [int(t) for t in digits.target]


def write_digits_folder(root, size=32):
    """The digits (digits_images) as an ImageFolder of PNGs, root/<digit>/<i>.png. Written once: a
    complete folder is left alone; the folder appears atomically (written next to it, then renamed)."""
    if os.path.isdir(root):
        return root
    images, labels = digits_images(size)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-digits-")
    try:
        for i, (image, label) in enumerate(zip(images, labels)):
            os.makedirs(os.path.join(tmp, str(label)), exist_ok=True)
            image.save(os.path.join(tmp, str(label), f"{i:04d}.png"))
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(root):
            raise
    return root


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
        """Stop the loader's worker processes now. Needed on every way out, a failure above all: the
        workers ignore SIGTERM (so that a signal to the process group reaches only the main process, which
        saves first), and persistent workers stay referenced from the failure's traceback, so at
        interpreter exit multiprocessing would wait for them forever (a run that failed would hang)."""
        stop_workers(self._batches)
        stop_workers(getattr(self.loader, "_iterator", None))
        self.loader._iterator = self._batches = None


def stop_workers(batches):
    """Shut down the worker processes of a DataLoader iterator (None or a single-process one: nothing to
    do). torch has no public call for this; its iterator's own __del__ uses _shutdown_workers, which is
    what this calls, so that a failure never leaves the process waiting for its workers at exit."""
    if batches is not None and hasattr(batches, "_shutdown_workers"):
        batches._shutdown_workers()


def vae_encoder(vae, latent_scale):
    """x in [-1, 1] -> a posterior sample of the VAE * latent_scale (draws from the global RNG, which
    checkpoints save, so resumed runs draw the same noise)."""

    @torch.no_grad()
    def encode(x):
        return vae.encode(x).latent_dist.sample().mul_(latent_scale)

    return encode
