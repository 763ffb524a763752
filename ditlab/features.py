"""Feature networks of the evaluation: the TF-compatible InceptionV3 (torch-fidelity) and the digits
classifier.

Layer: above checkpoint_io (weights are read weights_only) and data (the digits and the ADM crop); below
evaluation. Failures raise EvaluationError."""

import contextlib
import hashlib
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ditlab.checkpoint_io import load_checkpoint
from ditlab.data import center_crop_arr, digits_images
from ditlab.errors import CheckpointError, DitlabError, UsageError
from ditlab.files import atomic_write

FEATURES = ("inception", "digits")
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# The digits classifier that FD-digits is measured with, shipped beside this module (train_digits_classifier,
# trained on an AMD EPYC core on 2026-12-04). Training is deterministic on one machine but not across CPUs
# (another matmul kernel, another classifier): scores measured with two classifiers differ by 1-3%, so every
# machine measures with this one. A --digits-classifier path that does not exist is trained there instead.
DIGITS_CLASSIFIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_classifier.pt")
DIGITS_SIZE = 16  # the digits demo's image size, the digits classifier's input
DIGITS_CLASSES = 10  # the digits classifier's classes, 0 to 9
INCEPTION_SIZE = 299  # torch-fidelity resizes every image to 299 x 299 for Inception
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]


class EvaluationError(DitlabError):
    """Bad input to the evaluator; the message names the file and says what to do."""


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
                       help="the digits classifier (default: the one shipped in ditlab/; a path that does not "
                            "exist gets one trained there, in seconds)")


#################################################################################
#                               Feature networks                                #
#################################################################################


def read_plain_state_dict(path, what):
    """A {name: tensor} dict from `path`, opened with weights_only=True; anything else is refused."""
    try:
        obj = load_checkpoint(path)
    except CheckpointError as e:
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


class InceptionFeatures(nn.Module):
    """ADM's three Inception outputs for uint8 images (N, 3, H, W): 'pool' (N, 2048) pool_3, 'spatial'
    (N, 2023) mixed_6/conv[..., :7] flattened in (H, W, C) order, 'logits' (N, 1008) without the bias.
    Every image is resized to `input_size` x `input_size` first."""

    input_size = INCEPTION_SIZE

    def __init__(self, weights_path=None):
        super().__init__()
        import torch_fidelity.feature_extractor_inceptionv3 as tfi  # lazily: only the Inception route needs it

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
        self.head = nn.Linear(features, DIGITS_CLASSES)

    def features(self, x):
        """The 128-d penultimate features of (N, 1, 16, 16) digits."""
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


def real_digits(num, seed=0, counts=None):
    """The real-digit floor's images: `num` of the 1,797 digits as uint8 (num, 16, 16, 3) with their labels,
    the classes as balanced as `num` allows (num // 10 each, the remainder to the first classes), or `counts[c]`
    of class c when given (the label counts of a sample set, whose labels are drawn at random: an uneven draw
    alone raises FD-digits, so a set is fairly compared with real digits of the same counts), drawn without
    replacement within each class (with replacement only for a class asked for more digits than it has). A
    perfect model's samples score like these; the digits study and benchmarks/samplers.py both use it."""
    images, labels = digits_rgb()
    if counts is None:
        counts = [num // 10 + (c < num % 10) for c in range(10)]
    if len(counts) != 10 or sum(counts) != num or min(counts) < 0:
        raise UsageError(f"counts {list(counts)}: 10 non-negative per-class counts summing to num={num} expected")
    rng = np.random.default_rng(seed)
    picks = []
    for c, want in enumerate(counts):
        members = np.flatnonzero(labels == c)
        want = int(want)
        picks.append(rng.choice(members, want, replace=want > len(members)))
    idx = np.concatenate(picks)
    return images[idx], labels[idx]


def digits_data():
    """(images (1797, 1, 16, 16) in [-1, 1], labels): digits_rgb as the classifier's input."""
    arrays, labels = digits_rgb()
    return to_gray(torch.from_numpy(arrays).permute(0, 3, 1, 2)), torch.as_tensor(labels)


def to_gray(images):
    """uint8 (N, 3, H, W) -> float (N, 1, H, W) in [-1, 1], the mean of the channels."""
    return images.float().mean(1, keepdim=True).div(127.5).sub(1.0)


@contextlib.contextmanager
def _one_thread():
    """Run the block on one torch thread (deterministic training), restoring the count afterwards."""
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


def classifier_id(path=DIGITS_CLASSIFIER):
    """A 12-hex fingerprint of the digits classifier at `path`: sha256 over its tensors' names, dtypes, shapes
    and bytes, in key order. Stored with every study record, so that scores measured with different
    classifiers are not compared unawares."""
    state = read_plain_state_dict(path, "digits classifier")
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:12]


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
    'logits' (N, 10). Images that are not 16 x 16 (`input_size`) are ADM-center-cropped to it first."""

    input_size = DIGITS_SIZE

    def __init__(self, path=DIGITS_CLASSIFIER):
        super().__init__()
        self.net = load_digits_classifier(path)

    @torch.no_grad()
    def forward(self, images):
        if images.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
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
