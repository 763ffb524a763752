"""The benchmarks' measuring tools: model FLOPs (one multiply-add = 2 FLOPs, the FlopCounterMode convention),
interleaved timing rounds with medians and paired ratios, and the machine's matmul peak (the MFU
denominator when no --peak-tflops is given)."""

import contextlib
import statistics
import time

import torch


def forward_flops(config):
    """Matmul FLOPs of one image's forward pass, from the architecture alone (2 per multiply-add).

    Counts every Linear/Conv and the two attention matmuls (Q K^T and A V); elementwise work (norms,
    GELU, softmax, modulation) is left out, as FlopCounterMode leaves it out.
    """
    p, d, depth = config["patch_size"], config["hidden_size"], config["depth"]
    c_in = config["in_channels"]
    c_out = 2 * c_in if config["learn_sigma"] else c_in
    tokens = (config["input_size"] // p) ** 2
    mlp = int(d * config["mlp_ratio"])
    macs = tokens * c_in * p * p * d  # patch embedding
    macs += 256 * d + d * d  # timestep MLP (256 sinusoidal frequencies)
    per_block = (
        d * 6 * d  # adaLN modulation (per image)
        + tokens * d * 3 * d  # qkv
        + 2 * tokens * tokens * d  # Q K^T and attention x V, all heads
        + tokens * d * d  # attention output projection
        + 2 * tokens * d * mlp  # MLP
    )
    macs += depth * per_block
    macs += d * 2 * d + tokens * d * p * p * c_out  # final adaLN + projection
    return 2 * macs


def train_flops(config):
    """Model FLOPs of one image's training step: forward + backward (2x forward). Recomputation by
    gradient checkpointing is not counted (MFU counts useful work only)."""
    return 3 * forward_flops(config)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times):
    """Median and interquartile range of a list of seconds."""
    if len(times) >= 4:
        q1, _, q3 = statistics.quantiles(times, n=4)
    else:
        q1, q3 = min(times), max(times)
    return {"median": statistics.median(times), "iqr": q3 - q1, "n": len(times)}


def paired_ratio(times):
    """ours / peer as the median of the per-round ratios: the two runs of a round are adjacent in time,
    so a slow spell of the machine cancels out of each ratio (more stable than a ratio of medians)."""
    ratios = [ours / peer for ours, peer in zip(times["ours"], times["peer"])]
    s = summarize(ratios)
    return {"ratio": s["median"], "ratio_iqr": s["iqr"]}


def interleaved(runs, rounds, device):
    """Time each callable of `runs` ({name: fn}) once per round, the names alternating within every
    round (and their order reversed every other round). Returns {name: [seconds per round]}."""
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def precision_mode(precision, device):
    """TF32 matmuls for 'tf32' and bf16 autocast for 'bf16' (as the Trainer sets them), restored after."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    try:
        with autocast:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def matmul_tflops(precision, device, n=None, reps=20, budget_s=3.0):
    """Measured dense matmul rate (TFLOP/s) in the precision's dtype: the MFU denominator when
    --peak-tflops is not given. The fastest of up to `reps` runs (stopping after `budget_s`), since a
    peak is what the machine can do (a median would let a noisy machine push MFU above 100%)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with precision_mode(precision, device):
        a @ b
        times, start = [], time.perf_counter()
        while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
            times += interleaved({"mm": lambda: a @ b}, 1, device)["mm"]
    return 2 * n**3 / min(times) / 1e12


def peak_tflops(precision, device):
    """MFU denominator for a setting: the faster of its own matmul and fp32's (a CPU without bf16 units
    runs bf16 matmuls slower than fp32 ones, and autocast could always have stayed in fp32)."""
    rate = matmul_tflops(precision, device)
    return rate if precision == "fp32" else max(rate, matmul_tflops("fp32", device))
