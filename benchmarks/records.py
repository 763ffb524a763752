"""The header facts and the results file shared by the benchmark scripts (bench.py, gpu_check.py):
device name, library versions, commit, bench.py's markdown section, and newest-first insertion into
docs/benchmarks.md."""

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


def fmt(value, spec):
    """A number in `spec`, or "-" where it was not measured."""
    return "-" if value is None else format(value, spec)


def ratio_cell(row):
    """ours / peer with its spread, or "-" without a peer."""
    return f"{row['ratio']:.2f} (IQR {row['ratio_iqr']:.2f})" if "ratio" in row else "-"


def bench_section(args, device, header, rows, peaks, toy_setting):
    """A bench.py run as a markdown section of docs/benchmarks.md: header lines and one table per benchmark
    (rows: train, sample, toy; `toy_setting` says how the toy rows were run)."""
    train_rows, sample_rows, toy_rows = rows["train"], rows["sample"], rows["toy"]
    lines = [f"## {header['date']} | {header['device']}", "",
             f"- versions: {header['versions']}; torch threads: {header['threads']}; commit: {header['commit']}",
             f"- command: `{header['command']}`",
             f"- model: {args.model}, {args.input_size}x{args.input_size} latents, batch {args.batch_size}; "
             f"model FLOPs per image: {header['gflops']:.2f} GFLOPs forward, {3 * header['gflops']:.2f} training",
             "- MFU against: " + ", ".join(f"{p} {v:.3g} TFLOP/s ({src})" for p, (v, src) in peaks.items()), ""]
    if train_rows:
        mem = "peak GPU memory (MiB)" if device.type == "cuda" else "peak RSS increase (MiB)"
        lines += ["Training step (forward + backward + AdamW + EMA), median over rounds; ours / peer = median of the per-round ratios:", "",
                  f"| model | setting | step ms | IQR ms | images/s | {mem} | TFLOP/s | MFU | ours / peer |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in train_rows:
            lines.append(f"| {r['impl']} | {r['setting']} | {r['step_ms']:.1f} | {r['iqr_ms']:.1f} | "
                         f"{r['images_per_s']:.1f} | {fmt(r['peak_mib'], '.0f')} | {r['tflops']:.3f} | "
                         f"{100 * r['mfu']:.1f}% | {ratio_cell(r)} |")
        lines.append("")
    if sample_rows:
        lines += [f"Sampling: {args.sample_steps}-step DDPM, batch {args.sample_batch_size}, "
                  f"{header['sample_precision']}:", "",
                  "| model | guidance | seconds per batch | IQR s | images/s | TFLOP/s | MFU | ours / peer |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sample_rows:
            lines.append(f"| {r['impl']} | {r['guidance']} | {r['seconds']:.3f} | {r['iqr_s']:.3f} | "
                         f"{r['images_per_s']:.2f} | {r['tflops']:.3f} | {100 * r['mfu']:.1f}% | {ratio_cell(r)} |")
        lines.append("")
    if toy_rows:
        lines += [f"Toy study training ({toy_setting}, "
                  "training steps only, no evaluations):", "",
                  "| preset | normalization | batch | steps/s | minutes for the preset's steps |", "|---|---|---|---|---|"]
        for r in toy_rows:
            lines.append(f"| {r['preset']} | {r['normalization']} | {r['batch']} | {r['steps_per_s']:.1f} | "
                         f"{r['preset_minutes']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"
