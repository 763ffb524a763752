"""Checkpoint files: the one place that opens them (torch.load with weights_only=True) and the one
place that writes them (atomically). Training, resuming, sampling, analysis, latent shards and the
feature networks all read through load_checkpoint, so a file that pickles code is refused everywhere.

This module sits just above the bottom of the package (errors, files): it knows nothing of models."""

import argparse
import contextlib
import os
import pickle
import re
import zipfile

import torch

from ditlab.errors import CheckpointError
from ditlab.files import atomic_write

CHECKPOINT_HINT = "pass a .pt checkpoint file or a run directory containing checkpoints/latest.pt"


def checkpoint_file(path):
    """A run directory means its checkpoints/latest.pt; anything else is the file itself."""
    return os.path.join(path, "checkpoints", "latest.pt") if os.path.isdir(path) else path


def run_checkpoints(run_dir):
    """A run directory's checkpoint files, newest first: checkpoints/latest.pt when it is there, then the
    numbered <step>.pt by step. A resume tries them in this order, so a damaged latest.pt is not the end."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    numbered = sorted((name for name in names if re.fullmatch(r"\d+\.pt", name)), key=lambda n: int(n[:-3]),
                      reverse=True)
    return [os.path.join(folder, name) for name in (["latest.pt"] if "latest.pt" in names else []) + numbered]


def missing_checkpoint(path, hint=CHECKPOINT_HINT):
    """The CheckpointError for a checkpoint that is not there, saying what could be passed instead."""
    return CheckpointError(f"no checkpoint at {checkpoint_file(path)!r}; {hint}")


def load_checkpoint(path, map_location="cpu", mmap=False):
    """The one function that opens checkpoint files: torch.load(weights_only=True), with argparse.Namespace
    allowed (the reference repo's training checkpoints hold their args). A run directory means its
    checkpoints/latest.pt. `mmap` memory-maps a zip-format file, so entries nobody uses (optimizer
    states) are never read.

    CheckpointError naming the file when it is missing, corrupt, truncated or unsafe (a file that pickles
    code is refused, never executed)."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise missing_checkpoint(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            # Only the name of what it pickles: torch's own text advises retrying with weights_only=False,
            # which on a file like this one would run its code.
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            detail = f" (it references {found.group(1)})" if found else ""
            raise CheckpointError(f"refusing to load {path!r}: it pickles objects other than tensors and plain "
                                  f"Python types, which could run arbitrary code{detail}. Only weights_only "
                                  f"checkpoints are loaded; re-save trusted weights as a plain state dict.") from None
        raise CheckpointError(f"could not load {path!r}: not a PyTorch checkpoint, or corrupt ({e})") from e
    except Exception as e:  # truncated zip, garbage
        raise CheckpointError(f"could not load {path!r}: the file is corrupt, truncated or not a PyTorch "
                              f"checkpoint ({type(e).__name__}: {first_sentence(e)})") from e


def first_sentence(error):
    """The first sentence of an exception's message: torch's reasons go on to paragraphs of advice, and a
    resume that skips damaged checkpoints names each one's reason on a single line."""
    text = str(error).splitlines()[0] if str(error) else ""
    return text.split(". ")[0]


def save_checkpoint(obj, path):
    """torch.save `obj` (tensors and plain Python types only) atomically to `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def link_latest(path, latest):
    """Point `latest` at the checkpoint `path` atomically (hard link, or a copy where links fail)."""
    tmp = latest + ".tmp-link"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(path, tmp)
        os.replace(tmp, latest)
    except OSError:
        with open(path, "rb") as src:
            atomic_write(latest, lambda f: f.write(src.read()))
