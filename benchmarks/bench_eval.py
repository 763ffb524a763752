"""How long evaluate.py takes and how much memory it needs (`python -m benchmarks.bench_eval`).

    python -m benchmarks.bench_eval                                  # 1,000 images at 32 and 256 px + 50k stats
    python -m benchmarks.bench_eval --sizes 256 --num-images 5000 --device cuda --record

1. For each --sizes S: --num-images random uint8 images of S x S in an .npz, scored as `evaluate.py SAMPLES
   REF` scores them (evaluation.evaluate) with REF = the same file (so Inception runs over 2 x N images), in a fresh process: wall seconds,
   Inception images/s and peak resident memory. Inception resizes every input to 299 x 299, so its cost
   hardly depends on S; reading and resizing do.
2. The part that grows with the number of samples, at --memory-samples (default 50,000, ADM's protocol)
   against --memory-reference (10,000, the size of ADM's reference batches): the metrics from stored
   features (FID, sFID, IS, precision/recall) in a fresh process, with synthetic features of the real
   sizes (2048 / 2023 / 1008): peak memory and seconds. Feature extraction itself streams batches and adds
   only the Inception network and one batch.

Without --inception-weights (and no cached torch-fidelity file) the network gets random weights written
here: the same layers, so the same cost; the scores themselves mean nothing then.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.records import device_name, git_commit, record, versions
from ditlab import evaluation
from ditlab.features import INCEPTION_URL


def peak_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child_eval(args):
    """In a fresh process: what evaluate.py does (ditlab.evaluation.Evaluator), the .npz against itself."""
    start_rss, t0 = peak_rss_mib(), time.time()
    metrics = evaluation.evaluate(args.npz, args.npz, inception_weights=args.weights, batch_size=args.batch_size,
                                  device=args.device)
    print(json.dumps({"seconds": time.time() - t0, "peak_mib": peak_rss_mib(), "start_mib": start_rss,
                      "images": 2 * metrics["num_samples"]}))


def child_stats(args):
    """In a fresh process: the metrics from synthetic features of ADM's sizes."""
    start_rss = peak_rss_mib()
    rng = np.random.default_rng(0)

    def feats(n):
        return {"pool": rng.random((n, 2048), dtype=np.float32), "spatial": rng.random((n, 2023), dtype=np.float32),
                "logits": rng.standard_normal((n, 1008), dtype=np.float32)}

    samples, ref = feats(args.memory_samples), feats(args.memory_reference)
    ref_stats, _ = evaluation.reference_stats(evaluation.ArrayImages(np.zeros((2, 1, 1, 3), np.uint8)), ref, "inception")
    t0 = time.time()
    evaluation.score(samples, ref, ref_stats, device=args.device or "cpu")
    print(json.dumps({"seconds": time.time() - t0, "peak_mib": peak_rss_mib(), "start_mib": start_rss}))


def run_child(kind, extra):
    cmd = [sys.executable, "-m", "benchmarks.bench_eval", "--child", kind, *extra]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=7200)
    if out.returncode:
        raise SystemExit(f"{kind} benchmark failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 256])
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--memory-samples", type=int, default=50_000)
    p.add_argument("--memory-reference", type=int, default=10_000)
    p.add_argument("--record", action="store_true", help="add the figures to docs/benchmarks.md")
    p.add_argument("--child", choices=["eval", "stats"], help=argparse.SUPPRESS)
    p.add_argument("--npz", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "eval":
        return child_eval(args)
    if args.child == "stats":
        return child_stats(args)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
    weights = args.inception_weights or (cached if os.path.isfile(cached) else None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        label = "real" if weights else "random (same network and cost)"
        weights = weights or write_random_inception_weights(os.path.join(tmp, "inception.pth"))
        common = ["--weights", weights, "--batch-size", str(args.batch_size), "--device", device.type]
        for size in args.sizes:
            npz = os.path.join(tmp, f"images{size}.npz")
            np.savez(npz, np.random.default_rng(size).integers(0, 256, (args.num_images, size, size, 3), dtype=np.uint8))
            r = run_child("eval", ["--npz", npz, *common])
            rows.append(f"| evaluate.py, {args.num_images:,} samples + {args.num_images:,} reference, {size} x {size} | "
                        f"{r['seconds']:.1f} s | {r['images'] / r['seconds']:.1f} images/s | {r['peak_mib'] / 1024:.2f} GiB |")
            print(rows[-1], flush=True)
        r = run_child("stats", ["--memory-samples", str(args.memory_samples), "--memory-reference",
                                str(args.memory_reference), "--device", device.type])
        rows.append(f"| metrics from features, {args.memory_samples:,} samples vs {args.memory_reference:,} reference "
                    f"| {r['seconds']:.1f} s | - | {r['peak_mib'] / 1024:.2f} GiB |")
        print(rows[-1], flush=True)
    header = (f"### evaluate.py: time and memory ({time.strftime('%Y-%m-%d')}, {device_name(device)})\n\n"
              f"{versions()}, commit {git_commit()}; Inception weights: {label}; batch {args.batch_size}; command: "
              f"`python -m benchmarks.bench_eval {' '.join(argv if argv is not None else sys.argv[1:])}`. Peak memory "
              f"is the peak resident set of a fresh process (torch itself takes about 0.4 GiB).\n\n"
              f"| what | wall time | Inception throughput | peak memory |\n|---|---:|---:|---:|\n")
    section = header + "\n".join(rows) + "\n\n"
    print(section)
    if args.record:
        record(os.path.join(REPO, "docs", "benchmarks.md"), section)


if __name__ == "__main__":
    main()



def write_random_inception_weights(path, seed=0):
    """torch-fidelity's InceptionV3 layout with random weights (He-initialised convolutions, so activations
    keep a usable scale through its 40 layers), saved as a plain state dict: for tests and benchmarks on
    machines without the real weights. Same network and cost; its scores mean nothing."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tfi  # lazily: only the Inception route needs it

    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            torch.random.fork_rng():
        net = tfi.FeatureExtractorInceptionV3("random-inception", ["2048"])
        torch.manual_seed(seed)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.normal_(net.fc.weight, std=0.05)
        nn.init.normal_(net.fc.bias, std=1.0)
    torch.save(net.state_dict(), path)
    return path
