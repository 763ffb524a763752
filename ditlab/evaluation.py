"""Evaluation: ADM's metrics (FID, sFID, IS, precision, recall) and FD-digits on images from .npz
files, folders or arrays.

Layer: above features (the networks), sampling (the progress bar) and data (the ADM crop); below monitoring, the studies and the
commands. Bad input raises EvaluationError naming the file and what to do."""

import glob
import os
import warnings
import zipfile

import numpy as np
import torch
from PIL import Image

from ditlab.data import center_crop_arr
from ditlab.features import DIGITS_CLASSES, DIGITS_CLASSIFIER, SPATIAL_CHANNELS, EvaluationError, feature_network
from ditlab.files import atomic_write
from ditlab.sampling import progress_bar

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IS_SPLIT = 5000  # ADM's split size for the Inception Score
PR_K = 3  # ADM's neighbourhood size for precision and recall
STAT_SIZES = {"inception": {"mu": 2048, "mu_s": SPATIAL_CHANNELS * 17 * 17}, "digits": {"mu": 128}}


#################################################################################
#                                 Image sources                                 #
#################################################################################


def _read_npy_header(f, path, key):
    """(shape, dtype) of an .npy stream positioned at its start; refuses object arrays."""
    try:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
    except ValueError as e:
        raise EvaluationError(f"{path}: {key} is not a valid .npy array ({e})") from None
    if dtype.hasobject:
        raise EvaluationError(f"{path}: {key} holds Python objects (a pickle); only plain numeric arrays are read")
    if fortran and len(shape) > 1:
        raise EvaluationError(f"{path}: {key} is stored in Fortran order; save it with np.savez(np.ascontiguousarray(a))")
    return shape, dtype


def check_images(images, where, shape=None, values=True):
    """Validate a batch (N, H, W, 3) of uint8 images, or floats within [0, 255] (rounded, as ADM's
    evaluator would read them); returns uint8. `shape`: the whole array's, for the messages (a file's
    first batch stands for it); values=False checks only the layout and dtype. Floats that all lie in
    [0, 1] are refused: read as [0, 255] they would round to black and one grey level."""
    shape = tuple(shape or images.shape)
    if images.ndim != 4:
        raise EvaluationError(f"{where}: images must be N x H x W x 3, got an array of shape {shape}")
    if images.shape[-1] != 3:
        hint = ("; it looks like N x 3 x H x W: transpose it with a.transpose(0, 2, 3, 1)"
                if images.shape[1] == 3 else "; convert grayscale or RGBA images to RGB")
        raise EvaluationError(f"{where}: images must have 3 channels last (N x H x W x 3), got shape "
                              f"{shape}{hint}")
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        if not values:
            return images
        if not np.isfinite(images).all() or images.min(initial=0) < 0 or images.max(initial=0) > 255:
            raise EvaluationError(f"{where}: float images must lie in [0, 255] (found {np.nanmin(images):.3g} .. "
                                  f"{np.nanmax(images):.3g}); scale images in [-1, 1] with 127.5 * (x + 1)")
        if images.size and images.max() <= 1.0:
            raise EvaluationError(f"{where}: float images all within [0, 1]; the evaluator reads floats as 0-255 "
                                  f"levels (ADM's convention), so multiply them by 255 first")
        return np.round(images).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer):
        if images.min(initial=0) < 0 or images.max(initial=0) > 255:
            raise EvaluationError(f"{where}: integer images must lie in [0, 255]")
        return images.astype(np.uint8)
    raise EvaluationError(f"{where}: images must be uint8 (or floats in [0, 255]), got dtype {images.dtype}")


class NpzImages:
    """An ADM .npz: `arr_0` read batch by batch straight from the zip (never all at once), `arr_1`
    labels and precomputed statistics (`mu`, `sigma`, `mu_s`, `sigma_s`) when present."""

    def __init__(self, path):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise EvaluationError(f"{path}: not a readable .npz file ({e}); pass an .npz written by np.savez "
                                  f"or sample_ddp.py, or a folder of images") from None
        names = {os.path.splitext(n)[0] for n in self._zip.namelist()}
        if "arr_0" not in names:
            raise EvaluationError(f"{path}: no 'arr_0' array (found {sorted(names)}); ADM's format stores the images "
                                  f"as arr_0, e.g. np.savez(path, images)")
        with self._zip.open("arr_0.npy") as f:
            self.shape, self.dtype = _read_npy_header(f, path, "arr_0")
            header = f.tell()
        if len(self.shape) != 4:
            raise EvaluationError(f"{path}: arr_0 must be N x H x W x 3, got shape {self.shape}")
        check_images(np.zeros((1, *self.shape[1:]), dtype=self.dtype), f"{path} (arr_0)", self.shape, values=False)
        self.num = self.shape[0]
        self._check_length(header)
        self._small = {n for n in names if n != "arr_0"}
        self.labels = self._array("arr_1") if "arr_1" in self._small else None
        if self.labels is not None and self.labels.shape != (self.num,):
            raise EvaluationError(f"{path}: arr_1 (labels) has shape {self.labels.shape}, expected ({self.num},)")

    def _check_length(self, header):
        """A truncated arr_0 is refused now, from the zip's directory, not halfway through the features."""
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        stored = self._zip.getinfo("arr_0.npy").file_size - header
        if row and stored < self.num * row:
            raise EvaluationError(f"{self.path}: arr_0 is truncated (it holds {stored // row} of {self.num} images); "
                                  f"rewrite the file")

    def _array(self, key):
        with self._zip.open(key + ".npy") as f:
            shape, dtype = _read_npy_header(f, self.path, key)
            return np.frombuffer(f.read(), dtype=dtype).reshape(shape).copy()

    def stats(self):
        """The precomputed statistics it holds, {} when none; a 'features' entry says which network made them
        (absent: Inception, as in ADM's files)."""
        out = {key: self._array(key) for key in ("mu", "sigma", "mu_s", "sigma_s") if key in self._small}
        if out and "features" in self._small:
            out["features"] = str(self._array("features"))
        return out

    def batches(self, batch_size):
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with self._zip.open("arr_0.npy") as f:
            _read_npy_header(f, self.path, "arr_0")
            for start in range(0, self.num, batch_size):
                n = min(batch_size, self.num - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise EvaluationError(f"{self.path}: arr_0 is truncated (image {start + len(data) // row} of "
                                          f"{self.num}); rewrite the file")
                batch = np.frombuffer(data, dtype=self.dtype).reshape(n, *self.shape[1:])
                yield check_images(batch, f"{self.path} (arr_0, images {start}..{start + n - 1})", self.shape)


class FolderImages:
    """A folder of PNG/JPEG images (searched recursively, sorted by path). All must share one size,
    unless `image_size` is given: then each is ADM-center-cropped to it (data.center_crop_arr)."""

    def __init__(self, path, image_size=None):
        self.path, self.image_size, self.labels = path, image_size, None
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(f).startswith("."))
        if not files:
            raise EvaluationError(f"{path}: the folder holds no .png/.jpg/.jpeg images")
        self.files, self.num = files, len(files)
        self._check_headers()

    def _check_headers(self):
        """Every file opens as an image and, without image_size, all share one size; only the headers are
        read, so a bad folder is refused before any feature is computed."""
        first = None
        for file in self.files:
            try:
                with Image.open(file) as im:
                    size = im.size
            except OSError as e:
                raise EvaluationError(f"{file}: cannot read this image ({e}); delete or replace it") from None
            first = first or (file, size)
            if self.image_size is None and size != first[1]:
                raise EvaluationError(f"{file} is {size[0]} x {size[1]} but {first[0]} is {first[1][0]} x "
                                      f"{first[1][1]}: pass --image-size N to center-crop every image to N x N")

    def _load(self, file):
        try:
            with Image.open(file) as im:
                im = im.convert("RGB")
                return center_crop_arr(im, self.image_size) if self.image_size else np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise EvaluationError(f"{file}: cannot read this image ({e}); delete or replace it") from None

    def stats(self):
        return {}

    def batches(self, batch_size):
        shape = None
        for start in range(0, self.num, batch_size):
            arrays = [self._load(f) for f in self.files[start:start + batch_size]]
            for file, a in zip(self.files[start:start + batch_size], arrays):
                shape = shape or a.shape
                if a.shape != shape:
                    raise EvaluationError(f"{file} is {a.shape[1]} x {a.shape[0]} but earlier images are {shape[1]} x "
                                          f"{shape[0]}: pass --image-size N to center-crop every image to N x N")
            yield np.stack(arrays)


def open_images(path, image_size=None):
    """An image source for `path`: an .npz file or a folder of images; a clear error otherwise."""
    if not os.path.exists(path):
        raise EvaluationError(f"{path}: no such file or folder; pass an ADM .npz (arr_0) or a folder of images")
    source = FolderImages(path, image_size) if os.path.isdir(path) else NpzImages(path)
    if source.num < 2:
        raise EvaluationError(f"{path}: {source.num} image(s); the metrics need at least 2 (FID needs a covariance)")
    return source


def check_labels(labels, classes, where="labels"):
    """EvaluationError for labels outside the classifier's classes 0..classes-1 (the accuracy would be
    meaningless)."""
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise EvaluationError(f"{where} {labels.min()}..{labels.max()} lie outside the classifier's classes "
                              f"0..{classes - 1}: the accuracy would be meaningless; check arr_1")


def open_inputs(samples, ref, image_size=None, features="inception"):
    """(samples, reference) image sources, each checked before any feature is computed: the path exists
    and is of the right kind, the arrays' shapes and dtypes, the samples' labels and the reference's
    statistics. A bad input is refused in a second, not after the other set's features."""
    sources = open_images(samples, image_size), open_images(ref, image_size)
    if features == "digits" and sources[0].labels is not None:
        check_labels(sources[0].labels, DIGITS_CLASSES, f"{samples}: labels")
    given_stats(sources[1], features)
    return sources


@torch.no_grad()
def extract_features(source, net, batch_size=64, device="cpu", progress=True, desc=None):
    """Run `net` over every image of `source`: {'pool', 'spatial', 'logits'} as float32 numpy arrays
    (None where the network has no such output), and 'image_size', the (H, W) of its images. With
    `progress`, a bar with images/s and ETA appears once the extraction runs long (sampling.progress_bar)."""
    out, size = {}, None
    with progress_bar(desc=desc or os.path.basename(source.path), total=source.num, unit="img",
                      disable=not progress) as bar:
        for batch in source.batches(batch_size):
            size = size or tuple(batch.shape[1:3])
            x = torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).to(device)  # a writable copy
            for key, value in net(x).items():
                out.setdefault(key, []).append(None if value is None else value.float().cpu().numpy())
            bar.update(len(batch))
    return {**{k: None if v[0] is None else np.concatenate(v) for k, v in out.items()}, "image_size": size}


#################################################################################
#                                    Metrics                                    #
#################################################################################


def feature_stats(acts):
    """(mu, sigma) of (N, D) activations in float64: the mean and np.cov(rowvar=False), as ADM."""
    acts = np.asarray(acts, dtype=np.float64)
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM's Frechet distance |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), with scipy's sqrtm; when
    that is not finite, eps is added to both diagonals; a negligible imaginary part is dropped (an error
    when the diagonal's imaginary part exceeds 1e-3)."""
    from scipy import linalg  # lazily: scipy is slow to import and only the distance needs it

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise EvaluationError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm(S1 S2) is singular; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise EvaluationError(f"FID: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(S1 S2)")
        covmean = covmean.real
    # A distance is not negative: rounding can leave a set against itself at -1e-5 (ADM prints that).
    return max(float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)), 0.0)


def inception_score(logits, split_size=IS_SPLIT):
    """ADM's Inception Score: p(y|x) = softmax(logits); per chunk of `split_size` images,
    exp(mean_x KL(p(y|x) || mean_x p(y|x))); the mean over chunks."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    probs = torch.softmax(logits, dim=1)
    scores = []
    for part in probs.split(split_size):
        marginal = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part) - torch.log(marginal))).sum(1).mean()
        scores.append(torch.exp(kl).item())
    return float(np.mean(scores))


def squared_distances(u, v, dtype=torch.float16):
    """Pairwise squared Euclidean distances |u|^2 - 2 u.v + |v|^2, clamped at 0, computed in `dtype`
    (ADM: float16, recomputed in float32 when that overflows)."""
    a, b = u.to(dtype), v.to(dtype)
    d = ((a * a).sum(1)[:, None] - 2 * (a @ b.T) + (b * b).sum(1)[None, :]).clamp_min(0)
    if dtype != torch.float32 and not torch.isfinite(d).all():
        return squared_distances(u, v, torch.float32)
    return d.float()


def manifold_radii(feats, k=PR_K, block=10_000, dtype=torch.float16):
    """Each point's squared distance to its k-th nearest neighbour in its own set (itself excluded): the
    (k+1)-th smallest distance of its row (the smallest is the point itself), kept as a running top-(k+1)
    over column blocks so that memory stays at one block x block matrix."""
    radii = []
    for rows in feats.split(block):
        best = None
        for cols in feats.split(block):
            d = squared_distances(rows, cols, dtype)
            if best is not None:
                d = torch.cat([best, d], dim=1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def precision_recall(ref, samples, k=PR_K, block=10_000, dtype=torch.float16, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them: precision is the
    fraction of samples within the k-NN radius of at least one reference point, recall the fraction of
    reference points within the radius of at least one sample."""
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float32, device=device)
    samples = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    if len(ref) <= k or len(samples) <= k:
        return None, None
    r_ref, r_smp = manifold_radii(ref, k, block, dtype), manifold_radii(samples, k, block, dtype)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    smp_in = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for i, rows in zip(range(0, len(ref), block), ref.split(block)):
        for j, cols in zip(range(0, len(samples), block), samples.split(block)):
            d = squared_distances(rows, cols, dtype)
            ref_in[i:i + len(rows)] |= (d <= r_smp[None, j:j + len(cols)]).any(1)
            smp_in[j:j + len(cols)] |= (d <= r_ref[i:i + len(rows), None]).any(0)
    return smp_in.double().mean().item(), ref_in.double().mean().item()


#################################################################################
#                                   Evaluation                                  #
#################################################################################


def resolution_warning(size, ref_size, input_size=None):
    """A warning when samples of `size` (H, W) and references of `ref_size` reach the feature network at
    different resolutions, else None. The network resizes both to `input_size`: sizes that differ only
    above it reach it alike (the digits route crops 32 x 32 references to its 16 x 16 input)."""
    seen = [tuple(min(s, input_size or s) for s in pair) for pair in (size, ref_size)]
    if seen[0] == seen[1]:
        return None
    (h, w), (rh, rw) = size, ref_size
    to = f" to {input_size} x {input_size}" if input_size else ""
    return (f"the samples are {h} x {w} but the reference images {rh} x {rw}: the feature network resizes both{to}, "
            f"so the scores compare different resolutions")


def given_stats(source, features):
    """The FID statistics the reference file holds for this feature network (`mu`, `sigma`, `mu_s`,
    `sigma_s`), checked for size; {} when it holds none for it."""
    given = source.stats()
    if not given or given.pop("features", "inception") != features:
        return {}
    for key, size in STAT_SIZES[features].items():
        cov = key.replace("mu", "sigma")
        if key not in given or cov not in given:
            raise EvaluationError(f"{source.path}: holds statistics but not {key!r} and {cov!r}")
        if given[key].shape != (size,) or given[cov].shape != (size, size):
            raise EvaluationError(f"{source.path}: {key}/{cov} have shapes {given[key].shape}/{given[cov].shape}, "
                                  f"expected ({size},)/({size}, {size}) for {features} features; recompute them "
                                  f"with evaluate.py --save-stats")
    return {k: given[k] for k in given if k in ("mu", "sigma", "mu_s", "sigma_s")}


def reference_stats(source, feats, features, given=None):
    """FID statistics of the reference: `given` (default: given_stats of the file) when there are any;
    else computed from its features. Returns (stats, "given" or "computed")."""
    given = given_stats(source, features) if given is None else given
    if given:
        return given, "given"
    stats = dict(zip(("mu", "sigma"), feature_stats(feats["pool"])))
    if feats.get("spatial") is not None:
        stats.update(zip(("mu_s", "sigma_s"), feature_stats(feats["spatial"])))
    return stats, "computed"


def score(sample_feats, ref_feats, ref_stats, labels=None, features="inception", device="cpu"):
    """The metrics dict from extracted features: {fid, sfid, inception_score} (Inception) or {fd_digits,
    accuracy} (digits), plus precision, recall and the image counts."""
    if len(sample_feats["pool"]) < 2:
        raise EvaluationError(f"{len(sample_feats['pool'])} sample image(s); the metrics need at least 2")
    mu, sigma = feature_stats(sample_feats["pool"])
    fd = frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"])
    precision, recall = precision_recall(ref_feats["pool"], sample_feats["pool"], device=device)
    out = {"features": features}
    if features == "inception":
        mu_s, sigma_s = feature_stats(sample_feats["spatial"])
        out.update(fid=fd, sfid=frechet_distance(mu_s, sigma_s, ref_stats["mu_s"], ref_stats["sigma_s"]),
                   inception_score=inception_score(sample_feats["logits"]))
    else:
        accuracy = None
        if labels is not None:
            labels = np.asarray(labels)
            check_labels(labels, sample_feats["logits"].shape[1])
            accuracy = float((sample_feats["logits"].argmax(1) == labels).mean())
        out.update(fd_digits=fd, accuracy=accuracy)
    out.update(precision=precision, recall=recall, num_samples=len(sample_feats["pool"]),
               num_reference=len(ref_feats["pool"]))
    return out


class Evaluator:
    """A feature network and a reference set (a path or an image source), whose features and statistics
    are computed once; call it with sample images (a path, an image source, or a uint8 array N x H x W x 3)
    for the metrics. The reference is opened and checked before the network is built."""

    def __init__(self, ref, features="inception", inception_weights=None, digits_classifier=DIGITS_CLASSIFIER,
                 batch_size=64, device=None, image_size=None, progress=True):
        self.features, self.batch_size, self.progress, self.image_size = features, batch_size, progress, image_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.ref = ref if hasattr(ref, "batches") else open_images(ref, image_size)
        given = given_stats(self.ref, features)
        self.net = feature_network(features, inception_weights, digits_classifier).to(self.device)
        self.ref_feats = extract_features(self.ref, self.net, batch_size, self.device, progress, desc="reference")
        self.ref_stats, self.ref_stats_source = reference_stats(self.ref, self.ref_feats, features, given)

    def features_of(self, samples, desc="samples"):
        if isinstance(samples, np.ndarray):
            source = ArrayImages(samples)
        else:
            source = samples if hasattr(samples, "batches") else open_images(samples, self.image_size)
        return extract_features(source, self.net, self.batch_size, self.device, self.progress, desc=desc), source.labels

    def __call__(self, samples, labels=None):
        feats, file_labels = self.features_of(samples)
        labels = file_labels if labels is None else labels
        out = score(feats, self.ref_feats, self.ref_stats, labels, self.features, self.device)
        out["reference_stats"] = self.ref_stats_source
        warning = resolution_warning(feats["image_size"], self.ref_feats["image_size"],
                                     getattr(self.net, "input_size", None))
        if warning:
            out["warning"] = warning
        return out

    def save_stats(self, path):
        """The reference's statistics in the layout of ADM's reference batches: its images as `arr_0`
        and `mu`, `sigma` (+ `mu_s`, `sigma_s`); digits statistics are marked with `features`."""
        images = np.concatenate(list(self.ref.batches(self.batch_size)))
        arrays = dict(arr_0=images, **{k: v for k, v in self.ref_stats.items()})
        if self.features != "inception":
            arrays["features"] = np.array(self.features)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path


class ArrayImages:
    """An in-memory uint8 array (N, H, W, 3) as an image source (the training-time FID hook)."""

    def __init__(self, images, labels=None):
        self.images, self.labels, self.path = check_images(images, "samples"), labels, "samples"
        self.num = len(images)

    def stats(self):
        return {}

    def batches(self, batch_size):
        for start in range(0, self.num, batch_size):
            yield self.images[start:start + batch_size]


def evaluate(samples, ref, **kwargs):
    """Metrics of `samples` against `ref` (paths); keyword arguments as Evaluator's."""
    return Evaluator(ref, **kwargs)(samples)


def summary_line(metrics):
    """One line for the log: every metric with 4 significant digits."""
    keys = ("fid", "sfid", "inception_score", "fd_digits", "accuracy", "precision", "recall")
    names = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "fd_digits": "FD-digits"}
    parts = [f"{names.get(k, k)} {metrics[k]:.4g}"
             for k in keys if metrics.get(k) is not None]
    if metrics.get("precision") is None:
        parts.append(f"precision/recall n/a (they need more than {PR_K} images in each set)")
    return " | ".join(parts) + f" ({metrics['num_samples']} samples vs {metrics['num_reference']} reference images)"
