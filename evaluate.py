"""Score generated samples against a reference set with ADM's metrics (FID, sFID, Inception Score,
precision, recall), in PyTorch; or, on a CPU, in the features of a digits classifier.

    python evaluate.py results/samples/DiT-XL-2-....npz VIRTUAL_imagenet256_labeled.npz --inception-weights w.pth
    python evaluate.py results/samples/DiT-S-4-....npz data/digits --features digits     # the digits demo
    python evaluate.py my_samples/ /data/imagenet/val --image-size 256 --save-stats ref_stats.npz

SAMPLES and REF are ADM .npz files (arr_0: uint8 N x H x W x 3) or folders of PNG/JPEG images. A REF
holding `mu`, `sigma`, `mu_s`, `sigma_s` (ADM's reference batches) gives FID/sFID statistics as they are;
precision and recall always use its images. With --features digits the metrics are the Frechet distance
in the digits classifier's penultimate features (FD-digits), precision/recall there, and, when SAMPLES
has class labels (arr_1, as sample_ddp.py writes), the classifier's accuracy on them. Definitions and
the Inception layer mapping: ditlab/evaluation.py.
"""

import argparse
import os
import sys
import time

import torch

from ditlab.cli import COUNT, command
from ditlab.errors import InputError
from ditlab.evaluation import Evaluator, open_inputs, summary_line
from ditlab.features import add_network_args
from ditlab.files import check_output_file, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="generated images: an .npz (arr_0) or a folder of images")
    p.add_argument("ref", help="reference images (.npz or folder); an .npz may hold precomputed mu/sigma/mu_s/sigma_s")
    add_network_args(p)
    p.add_argument("--batch-size", type=COUNT, default=64)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--image-size", type=COUNT, default=None,
                   help="ADM-center-crop folder images to N x N (needed when a folder's images differ in size)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    p.add_argument("--save-stats", default=None, metavar="PATH",
                   help="write REF's images and statistics as an .npz in the layout of ADM's reference batches")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return args


@command
def main(argv=None):
    """Score SAMPLES against REF, print the summary line and write --out / --save-stats; returns the metrics."""
    args = parse_args(argv)
    if args.features == "digits" and not os.path.exists(args.ref):
        raise InputError(f"{args.ref}: no such file or folder; the digits demo's reference folder "
                         f"data/digits is written by `python train.py` (the demo) on its first run")
    if args.out:
        check_output_file(args.out, "--out")  # before the features, not after them
    if args.save_stats:
        check_output_file(args.save_stats, "--save-stats", (".npz",))
    start = time.time()
    samples, ref = open_inputs(args.samples, args.ref, args.image_size, args.features)  # both, before any features
    evaluator = Evaluator(ref, features=args.features, inception_weights=args.inception_weights,
                          digits_classifier=args.digits_classifier, batch_size=args.batch_size,
                          device=args.device, image_size=args.image_size)
    if args.save_stats:
        print(f"saved reference statistics to {evaluator.save_stats(args.save_stats)}", file=sys.stderr)
    metrics = evaluator(samples)
    metrics.update(samples=os.path.abspath(args.samples), reference=os.path.abspath(args.ref),
                   seconds=round(time.time() - start, 2))
    print(summary_line(metrics))
    if metrics.get("warning"):
        print(f"warning: {metrics['warning']}", file=sys.stderr)
    if args.out:
        write_json(args.out, metrics)
        print(f"wrote {args.out}", file=sys.stderr)
    return metrics


if __name__ == "__main__":
    main()
