"""Tests for ditlab/evaluation.py and evaluate.py: every metric against an independent computation (closed
forms, brute-force numpy of ADM's formulas), the Inception route end to end with random weights written
here, the digits route, the readers and every bad input."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_sample import one_thread  # noqa: F401 (autouse: tiny networks run on one thread)

import evaluate
from ditlab import evaluation
from ditlab.evaluation import (
    ArrayImages,
    Evaluator,
    NpzImages,
    check_images,
    extract_features,
    feature_stats,
    frechet_distance,
    inception_score,
    open_images,
    precision_recall,
    resolution_warning,
    score,
    squared_distances,
    summary_line,
)
from ditlab.features import (
    DIGITS_SIZE,
    INCEPTION_SIZE,
    EvaluationError,
    InceptionFeatures,
    digits_data,
    digits_rgb,
    load_digits_classifier,
    train_digits_classifier,
)


def spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def sqrt_psd(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# ----------------------------------------------------------------------------------------------------
# Metrics against independent computations
# ----------------------------------------------------------------------------------------------------


def test_frechet_distance_of_gaussians_in_closed_form():
    rng = np.random.default_rng(0)
    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # General covariances: tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), by eigendecompositions.
    s1, s2 = spd(rng, 8), spd(rng, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    r = sqrt_psd(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_psd(r @ s2 @ r))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # A singular covariance still gives a finite distance (ADM's eps retry).
    v = rng.standard_normal((8, 1))
    assert np.isfinite(frechet_distance(mu1, v @ v.T, mu2, np.zeros((8, 8))))


def test_feature_stats_are_numpy_mean_and_cov():
    acts = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    mu, sigma = feature_stats(acts)
    np.testing.assert_allclose(mu, acts.astype(np.float64).mean(0), rtol=1e-12)
    centred = acts.astype(np.float64) - acts.mean(0, dtype=np.float64)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)


def numpy_inception_score(logits, split):
    """ADM's formula written out with loops."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for start in range(0, len(p), split):
        part = p[start:start + split]
        py = part.mean(0)
        kl = [sum(part[i, c] * (np.log(part[i, c]) - np.log(py[c])) for c in range(p.shape[1])) for i in range(len(part))]
        scores.append(np.exp(np.mean(kl)))
    return np.mean(scores)


def test_inception_score_matches_brute_force_numpy():
    logits = np.random.default_rng(2).standard_normal((23, 7)) * 3
    assert inception_score(logits, split_size=10) == pytest.approx(numpy_inception_score(logits, 10), rel=1e-10)
    # Limits: identical predictions score 1; confident predictions spread evenly over K classes score ~K.
    assert inception_score(np.zeros((10, 5))) == pytest.approx(1.0)
    assert inception_score(np.eye(5)[np.arange(50) % 5] * 60.0) == pytest.approx(5.0, rel=1e-6)


def brute_force_pr(ref, smp, k=3):
    """Precision/recall with explicit loops in float64: radius = squared distance to the k-th nearest
    other point of the same set; a point counts when within the radius of any point of the other set."""
    def sq(a, b):
        return float(np.sum((a - b) ** 2))

    def radii(x):
        return [sorted(sq(x[i], x[j]) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    r_ref, r_smp = radii(ref), radii(smp)
    precision = np.mean([any(sq(s, ref[j]) <= r_ref[j] for j in range(len(ref))) for s in smp])
    recall = np.mean([any(sq(r, smp[j]) <= r_smp[j] for j in range(len(smp))) for r in ref])
    return precision, recall


def test_precision_recall_match_brute_force_numpy():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((40, 5)).astype(np.float32)
    smp = (rng.standard_normal((30, 5)) * 1.5 + 0.7).astype(np.float32)  # shifted, wider: neither metric is 1
    expected = brute_force_pr(ref.astype(np.float64), smp.astype(np.float64))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for block in (10_000, 7):  # one block, and many blocks of uneven size
        got = precision_recall(ref, smp, block=block, dtype=torch.float32)
        assert got == pytest.approx(expected, abs=1e-12)
    # ADM's float16 distances: within a point or two of the exact answer.
    p16, r16 = precision_recall(ref, smp)
    assert abs(p16 - expected[0]) <= 2 / 30 and abs(r16 - expected[1]) <= 2 / 40
    # The same set: every point lies within its own radius.
    assert precision_recall(ref, ref, dtype=torch.float32) == (1.0, 1.0)


def test_squared_distances_fall_back_to_float32_on_overflow():
    rng = np.random.default_rng(4)
    u, v = torch.from_numpy(rng.standard_normal((5, 64)) * 100).float(), torch.from_numpy(rng.standard_normal((6, 64)) * 100).float()
    d = squared_distances(u, v)  # |u|^2 ~ 6e5 > float16's 65504
    assert torch.isfinite(d).all()
    expected = ((u[:, None, :].double() - v[None, :, :].double()) ** 2).sum(-1)
    torch.testing.assert_close(d.double(), expected, rtol=1e-4, atol=1e-2)


# ----------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------


def test_npz_reader_streams_batches_equal_to_np_load(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 10)
    for compressed in (False, True):
        path = str(tmp_path / f"s{compressed}.npz")
        (np.savez_compressed if compressed else np.savez)(path, images, labels)
        source = open_images(path)
        assert source.num == 10
        np.testing.assert_array_equal(source.labels, labels)
        for b in (1, 3, 100):
            np.testing.assert_array_equal(np.concatenate(list(source.batches(b))), np.load(path)["arr_0"])


def test_float_images_in_range_are_rounded(tmp_path):
    images = np.random.default_rng(6).uniform(0, 255, (4, 3, 3, 3))
    path = str(tmp_path / "f.npz")
    np.savez(path, images)
    (batch,) = open_images(path).batches(10)
    np.testing.assert_array_equal(batch, np.round(images).astype(np.uint8))


def test_folder_reader_is_recursive_sorted_and_crops_on_request(tmp_path):
    rng = np.random.default_rng(7)
    arrays = {}
    for name in ("b/2.png", "a/1.jpg", "a/0.png", "c.png"):
        os.makedirs(os.path.dirname(str(tmp_path / name)), exist_ok=True)
        arrays[name] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(arrays[name]).save(tmp_path / name, quality=100)
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_images(str(tmp_path))
    assert [os.path.relpath(f, tmp_path) for f in source.files] == ["a/0.png", "a/1.jpg", "b/2.png", "c.png"]
    batch = np.concatenate(list(source.batches(3)))
    np.testing.assert_array_equal(batch[0], arrays["a/0.png"])
    np.testing.assert_array_equal(batch[3], arrays["c.png"])
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "d.png")
    with pytest.raises(EvaluationError, match="--image-size"):
        list(open_images(str(tmp_path)).batches(10))
    cropped = np.concatenate(list(open_images(str(tmp_path), image_size=4).batches(10)))
    assert cropped.shape == (5, 4, 4, 3)


def save_npz(tmp_path, name, *arrays, **named):
    path = str(tmp_path / name)
    np.savez(path, *arrays, **named)
    return path


BAD_ARRAYS = [
    (np.zeros((4, 8, 8), np.uint8), "N x H x W x 3"),
    (np.zeros((4, 3, 8, 8), np.uint8), "transpose"),
    (np.zeros((4, 8, 8, 4), np.uint8), "3 channels"),
    (np.full((4, 8, 8, 3), 300.0), r"\[0, 255\]"),
    (np.full((4, 8, 8, 3), -1.0, np.float32), "127.5"),
    (np.zeros((4, 8, 8, 3), np.complex64), "dtype"),
    (np.zeros((1, 8, 8, 3), np.uint8), "at least 2"),
]


@pytest.mark.parametrize("array,message", BAD_ARRAYS)
def test_bad_arrays_are_clear_errors(tmp_path, array, message):
    path = save_npz(tmp_path, "bad.npz", array)
    with pytest.raises(EvaluationError, match=message) as e:
        source = open_images(path)
        list(source.batches(2))
    assert "bad.npz" in str(e.value)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(EvaluationError, match="no such file"):
        open_images(str(tmp_path / "missing.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="no .png"):
        open_images(str(tmp_path / "empty"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(EvaluationError, match="not a readable .npz"):
        open_images(str(tmp_path / "junk.npz"))
    with pytest.raises(EvaluationError, match="no 'arr_0'"):
        open_images(save_npz(tmp_path, "named.npz", images=np.zeros((2, 4, 4, 3), np.uint8)))
    with pytest.raises(EvaluationError, match="Python objects"):
        open_images(save_npz(tmp_path, "obj.npz", np.array([{"a": 1}, None], dtype=object)))
    truncated = save_npz(tmp_path, "t.npz", np.zeros((6, 4, 4, 3), np.uint8))
    import zipfile
    with zipfile.ZipFile(truncated) as z:
        raw = z.read("arr_0.npy")
    with zipfile.ZipFile(truncated, "w") as z:
        z.writestr("arr_0.npy", raw[:-20])
    with pytest.raises(EvaluationError, match="truncated"):
        list(open_images(truncated).batches(2))


# ----------------------------------------------------------------------------------------------------
# The Inception route, with random weights
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images_npz(tmp_path_factory):
    rng = np.random.default_rng(8)
    path = str(tmp_path_factory.mktemp("npz") / "images.npz")
    np.savez(path, rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def inception_evaluator(random_inception_weights, images_npz):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield Evaluator(images_npz, inception_weights=random_inception_weights, batch_size=4, device="cpu",
                                   progress=False)
    finally:
        torch.set_num_threads(threads)


def test_inception_features_shapes_layer_and_layout(inception_evaluator):
    feats = inception_evaluator.ref_feats
    assert feats["pool"].shape == (6, 2048) and feats["spatial"].shape == (6, 2023) and feats["logits"].shape == (6, 1008)
    assert feats["pool"].std() > 1e-3  # the random network keeps a usable scale
    # The spatial features are Mixed_6d.branch1x1's output (TF mixed_6/conv), first 7 channels, (H, W, C) order.
    net = inception_evaluator.net.net
    seen = {}
    handle = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    x = torch.from_numpy(np.array(next(open_images(inception_evaluator.ref.path).batches(2))))
    x = x.permute(0, 3, 1, 2)
    out = inception_evaluator.net(x)
    handle.remove()
    full = seen["out"].numpy()
    assert full.shape == (2, 192, 17, 17)
    for n, h, w, c in [(0, 0, 0, 0), (1, 16, 3, 6), (0, 5, 11, 2), (1, 16, 16, 6)]:
        assert out["spatial"][n, (h * 17 + w) * 7 + c] == full[n, c, h, w]
    # IS logits are pool_3 @ W without the bias.
    torch.testing.assert_close(out["logits"], out["pool"] @ net.fc.weight.T)


def test_inception_cli_fid_of_a_set_with_itself_is_zero_and_stats_in_adm_layout(random_inception_weights, images_npz,
                                                                              tmp_path, capsys):
    out, stats = str(tmp_path / "metrics.json"), str(tmp_path / "ref.npz")
    evaluate.main([images_npz, images_npz, "--inception-weights", random_inception_weights, "--device", "cpu",
                   "--out", out, "--batch-size", "3", "--save-stats", stats])
    metrics = json.load(open(out))
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "num_samples", "num_reference"):
        assert key in metrics
    assert "FID" in capsys.readouterr().out
    with np.load(stats) as f:
        assert sorted(f.keys()) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert f["mu"].shape == (2048,) and f["sigma_s"].shape == (2023, 2023)
        np.testing.assert_array_equal(f["arr_0"], np.load(images_npz)["arr_0"])
        arrays = dict(f)
    # sqrtm of a rank-5 product of 2048 x 2048 matrices is exact only to ~sqrt(machine eps) relative
    assert abs(metrics["fid"]) < 1e-5 * np.trace(arrays["sigma"])
    assert abs(metrics["sfid"]) < 1e-5 * np.trace(arrays["sigma_s"])
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert metrics["inception_score"] >= 1.0
    assert (metrics["num_samples"], metrics["num_reference"], metrics["reference_stats"]) == (6, 6, "computed")
    # Statistics of the wrong size are refused before any sample is read.
    wrong = save_npz(tmp_path, "wrong.npz", arrays["arr_0"], mu=np.zeros(10), sigma=np.eye(10), mu_s=arrays["mu_s"],
                     sigma_s=arrays["sigma_s"])
    with pytest.raises(SystemExit, match="expected \\(2048,\\)"):
        evaluate.main([images_npz, wrong, "--inception-weights", random_inception_weights, "--device", "cpu"])
    with pytest.raises(SystemExit, match="no such file"):
        evaluate.main([str(tmp_path / "nope.npz"), images_npz, "--inception-weights", random_inception_weights])


def test_inception_weights_must_be_a_plain_state_dict(tmp_path, random_inception_weights):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module: refused, never executed
    with pytest.raises(EvaluationError, match="refusing to load"):
        InceptionFeatures(str(tmp_path / "module.pt"))
    torch.save({"a": 1}, tmp_path / "plain.pt")
    with pytest.raises(EvaluationError, match="not a plain state dict"):
        InceptionFeatures(str(tmp_path / "plain.pt"))
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(EvaluationError, match="not an InceptionV3 state dict"):
        InceptionFeatures(str(tmp_path / "linear.pt"))
    with pytest.raises(EvaluationError, match="no checkpoint"):
        InceptionFeatures(str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------------------------------
# The digits route
# ----------------------------------------------------------------------------------------------------


def test_digits_classifier_is_accurate_cached_and_deterministic(digits_classifier):
    stored = torch.load(digits_classifier, weights_only=True)
    images, labels = digits_data()
    test = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))[:360]
    model = load_digits_classifier(digits_classifier)
    with torch.no_grad():
        accuracy = (model(images[test]).argmax(1) == labels[test]).float().mean().item()
    assert accuracy >= 0.97 and accuracy == pytest.approx(stored["held_out_accuracy"])
    a, _ = train_digits_classifier(epochs=1)
    b, _ = train_digits_classifier(epochs=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def digits_npz(tmp_path, name, rng, count=200, noise=False):
    """Real digits (as the demo sees them, 16 x 16 RGB) with their labels, or uniform noise images."""
    images, labels = digits_rgb()
    idx = rng.choice(len(labels), count, replace=False)
    arr = rng.integers(0, 256, images[idx].shape, dtype=np.uint8) if noise else images[idx]
    return save_npz(tmp_path, name, arr, labels[idx])


def test_digits_route_separates_real_digits_from_noise(tmp_path, digits_classifier, capsys):
    rng = np.random.default_rng(9)
    ref = str(tmp_path / "digits")
    from ditlab import data
    data.write_digits_folder(ref)  # the demo's 32 x 32 folder: center-cropped to 16 by the digits route
    real, noise = digits_npz(tmp_path, "real.npz", rng), digits_npz(tmp_path, "noise.npz", rng, noise=True)
    out = str(tmp_path / "m.json")
    evaluate.main([real, ref, "--features", "digits", "--digits-classifier", digits_classifier, "--out", out])
    good = json.load(open(out))
    assert set(good) >= {"fd_digits", "precision", "recall", "accuracy", "num_samples", "num_reference"}
    assert good["accuracy"] >= 0.97 and good["precision"] >= 0.9 and good["num_reference"] == 1797
    assert "FD-digits" in capsys.readouterr().out
    bad = evaluate.main([noise, ref, "--features", "digits", "--digits-classifier", digits_classifier])
    assert bad["fd_digits"] > 10 * good["fd_digits"] and bad["precision"] < 0.1 and bad["accuracy"] < 0.5


def test_reference_statistics_are_used_as_given(tmp_path, digits_classifier):
    rng = np.random.default_rng(10)
    ref, samples = digits_npz(tmp_path, "ref.npz", rng), digits_npz(tmp_path, "samples.npz", rng)
    kwargs = dict(features="digits", digits_classifier=digits_classifier, device="cpu", progress=False)
    ev = Evaluator(ref, **kwargs)
    base = ev(samples)
    with np.load(ev.save_stats(str(tmp_path / "stats.npz"))) as f:
        assert str(f["features"]) == "digits" and f["mu"].shape == (128,)
        arrays = dict(f)
    # Shift the stored mean: the distance moves by exactly |shift|^2 + 2 shift.(mu_ref - mu_samples).
    shift = np.zeros(128)
    shift[:3] = [1.0, -2.0, 0.5]
    shifted = save_npz(tmp_path, "shifted.npz", arrays["arr_0"], mu=arrays["mu"] + shift, sigma=arrays["sigma"],
                       features=arrays["features"])
    got = Evaluator(shifted, **kwargs)(samples)
    mu_samples = feature_stats(Evaluator(samples, **kwargs).ref_feats["pool"])[0]
    expected = base["fd_digits"] + shift @ shift + 2 * shift @ (arrays["mu"] - mu_samples)
    assert got["reference_stats"] == "given" and got["fd_digits"] == pytest.approx(expected, rel=1e-9)
    assert got["precision"] == base["precision"]  # precision/recall still from the reference's images
    # Inception statistics (no 'features' entry, as in ADM's files) are not digits statistics: computed instead.
    adm_like = save_npz(tmp_path, "adm.npz", arrays["arr_0"], mu=np.zeros(2048), sigma=np.eye(2048),
                        mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    assert Evaluator(adm_like, **kwargs)(samples)["reference_stats"] == "computed"


def test_evaluate_out_is_checked_before_the_features(tmp_path, monkeypatch):
    """--out onto a folder fails before any feature is computed; a missing folder is created."""
    class NoEvaluator:
        def __init__(self, *args, **kwargs):
            raise AssertionError("features were computed before --out was checked")

    monkeypatch.setattr(evaluate, "Evaluator", NoEvaluator)
    samples = save_npz(tmp_path, "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    ref = save_npz(tmp_path, "ref.npz", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="--out: .* is a directory"):
        evaluate.main([samples, ref, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--save-stats .*stats: give a file name ending in .npz"):
        evaluate.main([samples, ref, "--save-stats", str(tmp_path / "stats")])
    with pytest.raises(AssertionError, match="features were computed"):
        evaluate.main([samples, ref, "--out", str(tmp_path / "new" / "m.json")])
    assert os.path.isdir(tmp_path / "new")


def bad_inputs(tmp_path):
    """(path, message) of samples that cannot be scored, each of another kind."""
    def folder(name, *files):
        (tmp_path / name).mkdir()
        for file, data in files:
            (tmp_path / name / file).write_bytes(data)
        return str(tmp_path / name)

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    wide = io.BytesIO()
    Image.new("RGB", (9, 8)).save(wide, format="PNG")
    truncated = save_npz(tmp_path, "truncated.npz", np.zeros((6, 8, 8, 3), np.uint8))
    with zipfile.ZipFile(truncated) as z:
        raw = z.read("arr_0.npy")
    with zipfile.ZipFile(truncated, "w") as z:
        z.writestr("arr_0.npy", raw[:-20])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    return [(str(tmp_path / "missing.npz"), "no such file"),
            (str(tmp_path / "junk.npz"), "not a readable .npz"),
            (save_npz(tmp_path, "nchw.npz", np.zeros((4, 3, 8, 8), np.uint8)), "transpose"),
            (save_npz(tmp_path, "labels.npz", np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2, 12])),
             r"labels 0\.\.12 lie outside"),
            (truncated, "truncated"),
            (folder("empty"), "no .png"),
            (folder("broken", ("a.png", png.getvalue()), ("b.png", b"not a png")), "b.png: cannot read this image"),
            (folder("mixed", ("a.png", png.getvalue()), ("b.png", wide.getvalue())), "pass --image-size")]


def test_every_input_is_checked_before_any_feature_is_computed(tmp_path, monkeypatch):
    """Bad samples are refused before the reference (large, so slow) is touched, and a bad reference too."""
    def never(*args, **kwargs):
        raise AssertionError("the features were computed before every input was checked")

    monkeypatch.setattr(evaluation, "extract_features", never)
    monkeypatch.setattr(evaluation, "feature_network", never)
    ref = save_npz(tmp_path, "ref.npz", np.zeros((3000, 8, 8, 3), np.uint8))
    good = save_npz(tmp_path, "good.npz", np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2, 9]))
    for samples, message in bad_inputs(tmp_path):
        with pytest.raises(SystemExit, match=message):
            evaluate.main([samples, ref, "--features", "digits"])
        if "labels" not in samples:
            with pytest.raises(SystemExit, match=message):
                evaluate.main([good, samples, "--features", "digits"])
    wrong_stats = save_npz(tmp_path, "stats.npz", np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(3),
                           sigma=np.eye(3), features=np.array("digits"))
    with pytest.raises(SystemExit, match=r"expected \(128,\)"):
        evaluate.main([good, wrong_stats, "--features", "digits"])
    with pytest.raises(AssertionError, match="before every input was checked"):
        evaluate.main([good, ref, "--features", "digits"])  # good inputs reach the features


#################################################################################
#                 Results that would be wrong are refused or noted (24.4)       #
#################################################################################


def test_float_images_in_unit_range_are_refused_not_rounded_to_black():
    images = np.random.default_rng(0).random((4, 8, 8, 3))
    with pytest.raises(EvaluationError, match=r"within \[0, 1\].*multiply them by 255"):
        check_images(images, "samples")
    assert check_images(images * 255, "samples").max() > 1  # the same images in 0-255 pass


def test_layout_errors_name_the_whole_shape(tmp_path):
    path = tmp_path / "nchw.npz"
    np.savez(path, np.zeros((7, 3, 8, 8), np.uint8))
    with pytest.raises(EvaluationError, match=r"got shape \(7, 3, 8, 8\).*transpose"):
        NpzImages(str(path))


def test_labels_outside_the_classifier_classes_are_refused():
    feats = {"pool": np.random.default_rng(0).normal(size=(6, 4)), "logits": np.zeros((6, 10))}
    ref = {"pool": np.random.default_rng(1).normal(size=(6, 4))}
    stats = dict(zip(("mu", "sigma"), feature_stats(ref["pool"])))
    with pytest.raises(EvaluationError, match=r"labels 0\.\.12 lie outside the classifier's classes 0\.\.9"):
        score(feats, ref, stats, labels=[0, 1, 2, 12, 3, 4], features="digits")
    assert score(feats, ref, stats, labels=[0] * 6, features="digits")["accuracy"] == 1.0  # argmax of zeros is 0


def test_few_images_say_why_precision_and_recall_are_missing():
    line = summary_line({"fd_digits": 3.0, "accuracy": 0.5, "precision": None, "recall": None, "num_samples": 3,
                         "num_reference": 100})
    assert "precision/recall n/a (they need more than 3 images in each set)" in line


def test_a_set_against_itself_is_never_below_zero():
    for seed in range(20):  # rounding in sqrtm leaves some of these a hair below zero before the clamp
        mu, sigma = feature_stats(np.random.default_rng(seed).normal(size=(50, 20)))
        assert 0 <= frechet_distance(mu, sigma, mu, sigma) < 1e-6


def test_only_resolutions_the_network_sees_differently_get_a_warning(tmp_path, digits_classifier):
    """The digits route crops 32 x 32 references to its 16 x 16 input: 16 x 16 samples compare fairly."""
    rng = np.random.default_rng(0)
    paths = {}
    for size in (8, 16, 32):
        paths[size] = str(tmp_path / f"{size}.npz")
        np.savez(paths[size], rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8))
    evaluator = Evaluator(paths[32], features="digits", digits_classifier=digits_classifier, device="cpu",
                          progress=False)
    assert "warning" not in evaluator(paths[16])
    assert "8 x 8 but the reference images 32 x 32" in evaluator(paths[8])["warning"]


def test_resolution_warning_follows_the_networks_input_size():
    assert resolution_warning((256, 256), (512, 512), INCEPTION_SIZE) is not None  # 256 upsampled, 512 down
    assert resolution_warning((512, 512), (1024, 1024), INCEPTION_SIZE) is None  # both downsampled to 299
    assert resolution_warning((16, 16), (32, 32), DIGITS_SIZE) is None
    assert "resizes both to 16 x 16" in resolution_warning((8, 8), (16, 16), DIGITS_SIZE)
    assert resolution_warning((16, 16), (16, 16)) is None and resolution_warning((8, 8), (16, 16)) is not None


def test_feature_extraction_shows_images_per_second_only_when_it_runs_long(monkeypatch, capsys):
    from ditlab import sampling

    source = ArrayImages(np.zeros((10, 4, 4, 3), np.uint8))
    def net(x):
        return {"pool": x.float().flatten(1), "spatial": None}

    extract_features(source, net, batch_size=4, progress=True, desc="reference")
    assert capsys.readouterr().err == ""  # short: quiet
    monkeypatch.setattr(sampling, "PROGRESS_DELAY", 0)
    feats = extract_features(source, net, batch_size=4, progress=True, desc="reference")
    err = capsys.readouterr().err
    assert "reference: 100%" in err and "10/10" in err and "img/s" in err and feats["pool"].shape == (10, 48)
