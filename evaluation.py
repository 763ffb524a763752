"""Sample quality with the definitions of ADM's evaluator (Dhariwal & Nichol 2021, guided-diffusion's
evaluations/evaluator.py), in PyTorch: FID, sFID, Inception Score, precision and recall, plus the same
metrics in the features of a small digits classifier for the CPU-sized digits demo.

    from evaluation import evaluate
    metrics = evaluate("samples/DiT-XL-2-....npz", "VIRTUAL_imagenet256_labeled.npz")

Inputs are ADM-format .npz files (`arr_0`: uint8 N x H x W x 3, optionally `arr_1`: class labels) or
folders of PNG/JPEG images; a reference .npz that holds `mu`, `sigma`, `mu_s`, `sigma_s` (as ADM's
published reference batches do) supplies FID/sFID statistics as given. Images are streamed in batches,
so 50,000 samples never sit in memory at once; only their features do.

Feature networks (one code path: only the network differs):
  - "inception": torch-fidelity's FeatureExtractorInceptionV3, a PyTorch port of the TF Inception graph of
    2015-12-05 that ADM uses, including its TF1 bilinear resize to 299 x 299. pool_3 (2048-d) gives FID,
    IS (softmax of the bias-free logits, 1008 classes), precision and recall. sFID uses ADM's
    `mixed_6/conv` tensor: TF's blocks `mixed`, `mixed_1`, ... are torch-fidelity's Mixed_5b, 5c, 5d, 6a, 6b,
    6c, 6d, ..., so `mixed_6` is Mixed_6d, and `mixed_6/conv` is that block's first unit, the 1x1 branch
    (`Mixed_6d.branch1x1`; torch-fidelity's weight converter maps `mixed_6/conv/conv2d_params` and
    `mixed_6/conv/batchnorm` there). The graph tensor `mixed_6/conv:0` is the output of that unit (the ReLU
    after its batch norm), i.e. the output of the BasicConv2d module, captured with a forward hook:
    192 x 17 x 17, of which ADM keeps the first 7 channels and flattens them in TF's (H, W, C) order
    (7 x 17 x 17 = 2023-d). The order matters for statistics shared with ADM's files, not for the distance.
  - "digits": DigitsClassifier, a small CNN trained once on scikit-learn's digits rendered exactly as the
    digits demo sees them (16 x 16), cached under data/. Its penultimate layer (128-d) gives the Frechet
    distance ("FD-digits"), precision and recall; its logits give the accuracy on the intended labels.

Weights are always opened with torch.load(weights_only=True) (train_utils.load_checkpoint) before
torch-fidelity sees them: its own loader unpickles.
"""

import contextlib
import glob
import math
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import center_crop_arr, digits_images
from train_utils import atomic_write, load_checkpoint

FEATURES = ("inception", "digits")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
DIGITS_CLASSIFIER = os.path.join("data", "digits_classifier.pt")
DIGITS_SIZE = 16  # the digits demo's image size
IS_SPLIT = 5000  # ADM's split size for the Inception Score
PR_K = 3  # ADM's neighbourhood size for precision and recall
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
STAT_SIZES = {"inception": {"mu": 2048, "mu_s": SPATIAL_CHANNELS * 17 * 17}, "digits": {"mu": 128}}


def add_network_args(group, features_flag="--features"):
    """The flags that choose and locate the feature network, shared by evaluate.py (--features),
    sample_ddp.py (--eval-features) and train.py (--fid-features)."""
    group.add_argument(features_flag, choices=FEATURES, default="inception",
                       help="inception: ADM's metrics (FID, sFID, IS, precision, recall); digits: the digits "
                            "classifier (FD-digits, precision, recall, accuracy; the CPU-sized digits demo)")
    group.add_argument("--inception-weights", default=None, metavar="PATH",
                       help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: downloaded once "
                            "into torch's hub cache)")
    group.add_argument("--digits-classifier", default=DIGITS_CLASSIFIER, metavar="PATH",
                       help="the cached digits classifier (trained once, in seconds, when missing)")


class EvaluationError(ValueError):
    """Bad input to the evaluator; the message names the file and says what to do."""


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


def check_images(images, where):
    """Validate a batch (N, H, W, 3) of uint8 images, or floats within [0, 255] (rounded, as ADM's
    evaluator would read them); returns uint8."""
    if images.ndim != 4:
        raise EvaluationError(f"{where}: images must be N x H x W x 3, got an array of shape {images.shape}")
    if images.shape[-1] != 3:
        hint = ("; it looks like N x 3 x H x W: transpose it with a.transpose(0, 2, 3, 1)"
                if images.shape[1] == 3 else "; convert grayscale or RGBA images to RGB")
        raise EvaluationError(f"{where}: images must have 3 channels last (N x H x W x 3), got shape "
                              f"{images.shape}{hint}")
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all() or images.min(initial=0) < 0 or images.max(initial=0) > 255:
            raise EvaluationError(f"{where}: float images must lie in [0, 255] (found {np.nanmin(images):.3g} .. "
                                  f"{np.nanmax(images):.3g}); scale images in [-1, 1] with 127.5 * (x + 1)")
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
        if len(self.shape) != 4:
            raise EvaluationError(f"{path}: arr_0 must be N x H x W x 3, got shape {self.shape}")
        check_images(np.zeros((1, *self.shape[1:]), dtype=self.dtype), f"{path} (arr_0)")
        self.num = self.shape[0]
        self._small = {n for n in names if n != "arr_0"}
        self.labels = self._array("arr_1") if "arr_1" in self._small else None
        if self.labels is not None and self.labels.shape != (self.num,):
            raise EvaluationError(f"{path}: arr_1 (labels) has shape {self.labels.shape}, expected ({self.num},)")

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
                yield check_images(batch, f"{self.path} (arr_0, images {start}..{start + n - 1})")


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

    def _load(self, file):
        from PIL import Image

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


#################################################################################
#                               Feature networks                                #
#################################################################################


def read_plain_state_dict(path, what):
    """A {name: tensor} dict from `path`, opened with weights_only=True; anything else is refused."""
    try:
        obj = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(f"{what} {path}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise EvaluationError(f"{what} {path} is not a plain state dict (a dict of tensors); save one with "
                              f"torch.save(model.state_dict(), path)")
    return obj


def inception_weights_file(path=None):
    """The Inception weights file: `path`, or torch-fidelity's release file, downloaded once into torch's
    hub cache (where torch-fidelity itself keeps it)."""
    if path is not None:
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_URL))
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, cached, progress=True)
        except Exception as e:
            raise EvaluationError(f"could not download the Inception weights from {INCEPTION_URL} ({e}); on a machine "
                                  f"without internet copy that file here and pass --inception-weights PATH") from None
    return cached


def write_random_inception_weights(path, seed=0):
    """torch-fidelity's InceptionV3 layout with random weights (He-initialised convolutions, so activations
    keep a usable scale through its 40 layers), saved as a plain state dict: for tests and benchmarks on
    machines without the real weights. Same network and cost; its scores mean nothing."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tfi

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


class InceptionFeatures(nn.Module):
    """ADM's three Inception outputs for uint8 images (N, 3, H, W): 'pool' (N, 2048) pool_3, 'spatial'
    (N, 2023) mixed_6/conv[..., :7] flattened in (H, W, C) order, 'logits' (N, 1008) without the bias."""

    def __init__(self, weights_path=None):
        super().__init__()
        import torch_fidelity.feature_extractor_inceptionv3 as tfi

        path = inception_weights_file(weights_path)
        state = read_plain_state_dict(path, "Inception weights")
        # torch-fidelity loads weights itself (and unpickles them): give it the dict we opened safely.
        original = tfi.load_state_dict_from_url
        tfi.load_state_dict_from_url = lambda *args, **kwargs: state
        try:
            self.net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise EvaluationError(f"Inception weights {path} are not an InceptionV3 state dict of torch-fidelity's "
                                  f"layout ({first}); use weights-inception-2015-12-05-6726825d.pth") from None
        finally:
            tfi.load_state_dict_from_url = original
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def forward(self, images):
        pool, logits = self.net(images)
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial, "logits": logits}


class DigitsClassifier(nn.Module):
    """A small CNN for the digits demo's 16 x 16 digits: three convolutions, a 128-d penultimate layer
    (the features), 10 logits. Input: (N, 1, 16, 16) in [-1, 1]."""

    def __init__(self, width=32, features=128):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, features)
        self.head = nn.Linear(features, 10)

    def features(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def digits_rgb():
    """(uint8 images (1797, 16, 16, 3), labels (1797,)): scikit-learn's digits exactly as the digits demo
    trains on them (data.digits_images at 32 x 32, then the ADM center crop to 16), as sample files hold them."""
    images, labels = digits_images()
    return np.stack([center_crop_arr(im.convert("RGB"), DIGITS_SIZE) for im in images]), np.asarray(labels)


def digits_data():
    """(images (1797, 1, 16, 16) in [-1, 1], labels): digits_rgb as the classifier's input."""
    arrays, labels = digits_rgb()
    return to_gray(torch.from_numpy(arrays).permute(0, 3, 1, 2)), torch.as_tensor(labels)


def to_gray(images):
    """uint8 (N, 3, H, W) -> float (N, 1, H, W) in [-1, 1], the mean of the channels."""
    return images.float().mean(1, keepdim=True).div(127.5).sub(1.0)


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_digits_classifier(epochs=30, seed=0, held_out=360):
    """Train DigitsClassifier on all but `held_out` digits (a fixed random split), deterministically (one
    thread, fixed seed; about 10 s on a CPU core). Random shifts of up to 1 pixel make it tolerant of
    imperfect samples. Returns (model, held-out accuracy)."""
    images, labels = digits_data()
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    test, train = order[:held_out], order[held_out:]
    with _one_thread(), torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(train) / 64))
        for _ in range(epochs):
            for idx in train[torch.randperm(len(train))].split(64):
                x = F.pad(images[idx], (1, 1, 1, 1), value=-1.0)
                dx, dy = torch.randint(0, 3, (2,)).tolist()
                x = x[..., dy:dy + DIGITS_SIZE, dx:dx + DIGITS_SIZE]
                loss = F.cross_entropy(model(x), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    return model, accuracy


def load_digits_classifier(path=DIGITS_CLASSIFIER):
    """The cached DigitsClassifier at `path` (a plain-tensor checkpoint, weights_only), trained and
    written there first when missing."""
    if not os.path.isfile(path):
        print(f"training the digits classifier once -> {path}", file=sys.stderr, flush=True)
        model, accuracy = train_digits_classifier()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, lambda f: torch.save({"state_dict": model.state_dict(), "held_out_accuracy": accuracy,
                                                 "image_size": DIGITS_SIZE}, f))
        print(f"digits classifier: held-out accuracy {accuracy:.2%}", file=sys.stderr, flush=True)
    state = read_plain_state_dict(path, "digits classifier")
    model = DigitsClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise EvaluationError(f"digits classifier {path} does not fit DigitsClassifier; delete it to retrain") from None
    return model.eval()


class DigitsFeatures(nn.Module):
    """The digits route's outputs for uint8 images (N, 3, H, W): 'pool' (N, 128) penultimate features and
    'logits' (N, 10). Images that are not 16 x 16 are ADM-center-cropped to it first."""

    def __init__(self, path=DIGITS_CLASSIFIER):
        super().__init__()
        self.net = load_digits_classifier(path)

    @torch.no_grad()
    def forward(self, images):
        if images.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
            from PIL import Image

            arrays = [center_crop_arr(Image.fromarray(a), DIGITS_SIZE) for a in images.permute(0, 2, 3, 1).cpu().numpy()]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(images.device)
        feats = self.net.features(to_gray(images))
        return {"pool": feats, "spatial": None, "logits": self.net.head(feats)}


def feature_network(features="inception", inception_weights=None, digits_classifier=DIGITS_CLASSIFIER):
    """The feature network by name. Built inside torch.random.fork_rng: creating its layers draws initial
    weights, which must not move the caller's RNG (train.py's exact resume depends on it)."""
    if features not in FEATURES:
        raise EvaluationError(f"unknown feature network {features!r}; choose one of {', '.join(FEATURES)}")
    with torch.random.fork_rng():
        return InceptionFeatures(inception_weights) if features == "inception" else DigitsFeatures(digits_classifier)


@torch.no_grad()
def extract_features(source, net, batch_size=64, device="cpu", progress=True, desc=None):
    """Run `net` over every image of `source`: {'pool', 'spatial', 'logits'} as float32 numpy arrays
    (None where the network has no such output)."""
    out = {}
    total = math.ceil(source.num / batch_size)
    for batch in tqdm(source.batches(batch_size), total=total, desc=desc or os.path.basename(source.path),
                      disable=not progress, file=sys.stderr, mininterval=2):
        x = torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2).to(device)  # a writable copy
        for key, value in net(x).items():
            out.setdefault(key, []).append(None if value is None else value.float().cpu().numpy())
    return {k: None if v[0] is None else np.concatenate(v) for k, v in out.items()}


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
    from scipy import linalg

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
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


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


def reference_stats(source, feats, features):
    """FID statistics of the reference: the file's own (`mu`, `sigma`, `mu_s`, `sigma_s`), checked for
    size, when it holds them for this feature network; else computed from its features."""
    given = source.stats()
    if given and given.pop("features", "inception") == features:
        for key, size in STAT_SIZES[features].items():
            cov = key.replace("mu", "sigma")
            if key not in given or cov not in given:
                raise EvaluationError(f"{source.path}: holds statistics but not {key!r} and {cov!r}")
            if given[key].shape != (size,) or given[cov].shape != (size, size):
                raise EvaluationError(f"{source.path}: {key}/{cov} have shapes {given[key].shape}/{given[cov].shape}, "
                                      f"expected ({size},)/({size}, {size}) for {features} features; recompute them "
                                      f"with evaluate.py --save-stats")
        return {k: given[k] for k in given if k in ("mu", "sigma", "mu_s", "sigma_s")}, "given"
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
            accuracy = float((sample_feats["logits"].argmax(1) == np.asarray(labels)).mean())
        out.update(fd_digits=fd, accuracy=accuracy)
    out.update(precision=precision, recall=recall, num_samples=len(sample_feats["pool"]),
               num_reference=len(ref_feats["pool"]))
    return out


class Evaluator:
    """A feature network and a reference set, whose features and statistics are computed once; call it
    with sample images (a path, or a uint8 array N x H x W x 3) for the metrics."""

    def __init__(self, ref, features="inception", inception_weights=None, digits_classifier=DIGITS_CLASSIFIER,
                 batch_size=64, device=None, image_size=None, progress=True):
        self.features, self.batch_size, self.progress, self.image_size = features, batch_size, progress, image_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = feature_network(features, inception_weights, digits_classifier).to(self.device)
        self.ref = open_images(ref, image_size)
        self.ref_feats = extract_features(self.ref, self.net, batch_size, self.device, progress, desc="reference")
        self.ref_stats, self.ref_stats_source = reference_stats(self.ref, self.ref_feats, features)

    def features_of(self, samples, desc="samples"):
        source = ArrayImages(samples) if isinstance(samples, np.ndarray) else open_images(samples, self.image_size)
        return extract_features(source, self.net, self.batch_size, self.device, self.progress, desc=desc), source.labels

    def __call__(self, samples, labels=None):
        feats, file_labels = self.features_of(samples)
        labels = file_labels if labels is None else labels
        out = score(feats, self.ref_feats, self.ref_stats, labels, self.features, self.device)
        out["reference_stats"] = self.ref_stats_source
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
    return " | ".join(parts) + f" ({metrics['num_samples']} samples vs {metrics['num_reference']} reference images)"
