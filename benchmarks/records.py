"""The header facts and the results file shared by the benchmark scripts (bench.py, gpu_check.py):
device name, library versions, commit, and newest-first insertion into docs/benchmarks.md."""

import os
import platform
import subprocess

import torch

from ditlab.files import atomic_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "<!-- new results go below this line, newest first -->"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model} ({os.cpu_count()} cores)"


def versions():
    try:
        import diffusers
        peer = diffusers.__version__
    except ImportError:
        peer = "not installed"
    return f"Python {platform.python_version()}, torch {torch.__version__}, diffusers {peer}"


def git_commit():
    """Short hash of the checked-out commit, '+dirty' when Python files or requirements differ from it
    ('unknown' outside git)."""
    def git(*cmd):
        return subprocess.run(["git", "-C", REPO, *cmd], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "requirements.txt")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def record(path, section):
    """Insert `section` at the top of the results in `path` (newest first), atomically."""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    else:
        text = "# Benchmarks\n\nWritten by `make bench` (benchmarks/bench.py).\n\n"
    if MARKER not in text:
        text = text.rstrip("\n") + "\n\n" + MARKER + "\n"
    head, tail = text.split(MARKER, 1)
    # One blank line between sections, so every heading stays a heading whatever the section ends with.
    text = head + MARKER + "\n\n" + section.rstrip("\n") + "\n\n" + tail.lstrip("\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(text.encode()))
