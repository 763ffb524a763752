"""Does a generative model copy its training images? Distances of samples to their nearest training image,
set against the distances of the training images to each other (what a fresh draw from the data shows)."""

import math

import numpy as np
import torch

from ditlab.features import digits_rgb, to_gray


def nearest_distances(samples, train, chunk=1024):
    """Euclidean distance of every row of `samples` to its nearest row of `train` (float64), and of every
    training row to its nearest other training row (leave-one-out): the second is what a sample that is
    as novel as a fresh draw from the data would show, the first is zero for a copy."""
    samples = torch.as_tensor(samples, dtype=torch.float64).flatten(1)
    train = torch.as_tensor(train, dtype=torch.float64).flatten(1)

    def nearest(x, exclude_self):
        out = []
        for i in range(0, len(x), chunk):
            d = torch.cdist(x[i:i + chunk], train, compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros
            if exclude_self:
                d[torch.arange(d.shape[0]), torch.arange(i, i + d.shape[0])] = math.inf
            out.append(d.min(1).values)
        return torch.cat(out).numpy()

    return nearest(samples, False), nearest(train, True)


def memorisation(npz_path, train=None):
    """Nearest-training-digit distances of a sample set in the demo's pixels (grey, [-1, 1], 16 x 16):
    the median, its ratio to the training digits' own median, and the share of samples closer to a
    training digit than 95% of training digits are to their nearest neighbour ("near-copies")."""
    if train is None:
        train = to_gray(torch.from_numpy(digits_rgb()[0]).permute(0, 3, 1, 2))
    with np.load(npz_path) as f:
        images = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2)
    to_sample, train_nn = nearest_distances(to_gray(images), train)
    threshold = np.quantile(train_nn, 0.05)
    return dict(median=float(np.median(to_sample)), train_median=float(np.median(train_nn)),
                ratio=float(np.median(to_sample) / np.median(train_nn)),
                near_copies=float((to_sample < threshold).mean()), threshold=float(threshold))
