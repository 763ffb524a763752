"""Tests for ditlab/checkpoints.py, download.py, sample.py and sample_ddp.py on tiny checkpoints built here (CPU, no network)."""

import argparse
import io
import json
import os
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import download
import sample
import sample_ddp
from diffusion import create_diffusion
from ditlab import checkpoints, sampling
from ditlab.errors import CheckpointError, InputError, UsageError
from models import build_model_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMS = ["layer-norm", "none"]
# A 1-block DiT-S/2 seeing 8x8 pixels (vae none): 16 tokens, runs in milliseconds.
TINY = dict(model="DiT-S/2", input_size=8, in_channels=3, num_classes=10, class_dropout_prob=0.1, learn_sigma=True,
            depth=1, hidden_size=32, num_heads=2, image_size=8, vae="none", latent_scale=0.18215)
SMALL_XL = dict(depth=1, hidden_size=32, num_heads=2)  # shrinks the official DiT-XL/2 for tests


def random_model(config, seed=0):
    """The model `config` describes with every trainable weight perturbed (a fresh DiT outputs zeros)."""
    torch.manual_seed(seed)
    model = build_model_from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def write_checkpoint(path, normalization="layer-norm", **changes):
    """A checkpoint like train_toy.py writes: raw and EMA weights differ. Returns (path, config, raw, ema)."""
    config = {**TINY, "normalization": normalization, **changes}
    raw, ema = random_model(config, 0), random_model(config, 1)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {}, "step": 42, "rng": [],
                "config": config}, path)
    return str(path), config, raw, ema


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spinning slows them 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "ckpt.pt")


# ----------------------------------------------------------------------------------------------------
# find_model / load_model
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", NORMS)
def test_load_model_from_our_checkpoint(tmp_path, normalization):
    path, config, raw, ema = write_checkpoint(tmp_path / "ckpt.pt", normalization)
    model, loaded = checkpoints.load_model(path)
    assert same_weights(model, ema) and not same_weights(model, raw)
    assert model.normalization == normalization and not model.training
    assert loaded["ckpt_step"] == 42 and loaded["model"] == "DiT-S/2"
    model, _ = checkpoints.load_model(path, weights="raw")
    assert same_weights(model, raw)
    state_dict, found = checkpoints.find_model(path, weights="raw")
    assert found["normalization"] == normalization and torch.equal(state_dict["pos_embed"], raw.pos_embed)


def test_run_directory_means_latest(tmp_path):
    os.makedirs(tmp_path / "run" / "checkpoints")
    _, _, _, ema = write_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    model, _ = checkpoints.load_model(str(tmp_path / "run"))
    assert same_weights(model, ema)


def test_reference_training_checkpoint_with_namespace(tmp_path):
    """The reference train.py pickles an argparse.Namespace under "args": loaded with weights_only."""
    config = {**checkpoints.official_config(64), "model": "DiT-S/2", "num_classes": 10, **SMALL_XL}
    model = random_model(config)
    args = argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10, vae="ema", global_seed=0)
    path = str(tmp_path / "0000100.pt")
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args}, path)
    loaded, found = checkpoints.load_model(path, **SMALL_XL)
    assert same_weights(loaded, model)
    assert found["input_size"] == 8 and found["vae"] == "ema" and found["num_classes"] == 10
    assert found["normalization"] == "layer-norm"


class Payload:
    """A class the loader does not know: loading must refuse it rather than import/construct it."""

    def __init__(self):
        self.x = 1


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["class", "os.system"])
def test_refuses_checkpoints_that_pickle_code(tmp_path, payload):
    marker = tmp_path / "executed"
    obj = Payload() if payload == "class" else RunsCode(marker)
    path = str(tmp_path / "evil.pt")
    torch.save({"model": {"w": torch.ones(1)}, "ema": {"w": torch.ones(1)}, "extra": obj}, path)
    with pytest.raises(CheckpointError, match="refusing to load") as refused:
        checkpoints.find_model(path)
    # the refusal names what the file references and never advises the unsafe retry
    assert "weights_only=False" not in str(refused.value) and "set to `False`" not in str(refused.value)
    assert ("posix.system" in str(refused.value)) if payload == "os.system" else ("Payload" in str(refused.value))
    with pytest.raises(SystemExit, match="refusing to load"):
        sample.main(["--ckpt", path, "--out", str(tmp_path / "x.png")])
    assert not marker.exists()


def test_errors_name_what_was_expected(tmp_path, ckpt):
    path, config, _, _ = ckpt
    with pytest.raises(CheckpointError, match="no checkpoint at .*or an official name: DiT-XL-2-256x256.pt"):
        checkpoints.find_model(str(tmp_path / "missing.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 50)
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoints.find_model(str(garbage))
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        checkpoints.find_model(str(truncated))
    # Another architecture: the message names the model it expected.
    with pytest.raises(CheckpointError, match=r"does not fit the expected model DiT-B/2 .*hidden_size=64"):
        checkpoints.load_model(path, model="DiT-B/2", hidden_size=64)
    with pytest.raises(CheckpointError, match=r"input_size=16"):
        checkpoints.load_model(path, input_size=16)
    # Another normalization.
    with pytest.raises(CheckpointError, match="normalization='layer-norm'.*normalization='none'"):
        checkpoints.load_model(path, normalization="none")
    # Not a DiT checkpoint at all, and weights that are not there.
    torch.save({"step": 3}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a DiT checkpoint"):
        checkpoints.find_model(str(tmp_path / "other.pt"))
    with pytest.raises(UsageError, match="weights must be one of"):
        checkpoints.find_model(path, weights="best")


def test_bare_state_dict(tmp_path):
    config = {**TINY, "normalization": "none"}
    model = random_model(config)
    path = str(tmp_path / "weights.pt")
    torch.save(model.state_dict(), path)
    state_dict, found = checkpoints.find_model(path)
    assert found is None
    with pytest.raises(UsageError, match="no config"):
        checkpoints.load_model(path)
    with pytest.raises(UsageError, match="no raw weights"):
        checkpoints.find_model(path, weights="raw")
    overrides = {k: config[k] for k in ("model", "input_size", "in_channels", "num_classes", "depth", "hidden_size",
                                        "num_heads")}
    loaded, _ = checkpoints.load_model(path, **overrides)  # normalization read from the state dict
    assert loaded.normalization == "none" and same_weights(loaded, model)


def test_load_model_describes_a_bare_pixel_model_and_checks_flags_against_a_config(tmp_path, ckpt):
    """A bare state dict of a pixel-space model: the overrides (and bare_model) say what it is, with the
    reference's defaults for the rest; a file with a config refuses a must_match flag that contradicts it."""
    config = {**TINY, "input_size": 8, "in_channels": 3}
    model = random_model(config)
    path = str(tmp_path / "pixels.pt")
    torch.save(model.state_dict(), path)
    small = {k: config[k] for k in ("depth", "hidden_size", "num_heads", "num_classes")}
    loaded, built = checkpoints.load_model(path, bare_model=config["model"], image_size=8, vae="none", **small)
    assert same_weights(loaded, model)
    assert (built["model"], built["input_size"], built["in_channels"], built["vae"]) == (config["model"], 8, 3, "none")
    with pytest.raises(UsageError, match="--num-classes 7 conflicts with the checkpoint"):
        checkpoints.load_model(ckpt[0], must_match=("num_classes",), num_classes=7)
    _, kept = checkpoints.load_model(ckpt[0], must_match=("num_classes",), num_classes=ckpt[1]["num_classes"])
    assert kept["num_classes"] == ckpt[1]["num_classes"]


# ----------------------------------------------------------------------------------------------------
# Official files: download once, atomically
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """A local 'download server' (file:// URL) holding a small fake DiT-XL-2-256x256.pt; the pretrained
    directory is a temp dir."""
    server = tmp_path / "server"
    server.mkdir()
    model = random_model({**checkpoints.official_config(256), **SMALL_XL})
    torch.save(model.state_dict(), server / "DiT-XL-2-256x256.pt")
    monkeypatch.setattr(checkpoints, "PRETRAINED_URL", server.as_uri() + "/")
    monkeypatch.setattr(checkpoints, "PRETRAINED_DIR", str(tmp_path / "pretrained_models"))
    return server, model


def test_official_name_downloads_once(fake_server):
    server, model = fake_server
    state_dict, config = checkpoints.find_model("DiT-XL-2-256x256.pt")
    assert config["model"] == "DiT-XL/2" and config["input_size"] == 32 and config["num_classes"] == 1000
    assert config["learn_sigma"] and config["normalization"] == "layer-norm"
    local = os.path.join(checkpoints.PRETRAINED_DIR, "DiT-XL-2-256x256.pt")
    assert os.path.isfile(local)
    os.unlink(server / "DiT-XL-2-256x256.pt")  # a second call must not download again
    loaded, _ = checkpoints.load_model("DiT-XL-2-256x256.pt", **SMALL_XL)
    assert same_weights(loaded, model)
    # The same file as a local path is recognised as official too.
    assert checkpoints.find_model(local)[1]["image_size"] == 256
    with pytest.raises(UsageError, match="EMA weights only"):
        checkpoints.find_model("DiT-XL-2-256x256.pt", weights="raw")
    with pytest.raises(CheckpointError, match=r"normalization='layer-norm'"):
        checkpoints.load_model("DiT-XL-2-256x256.pt", normalization="none", **SMALL_XL)
    with pytest.raises(InputError, match="could not download"):  # not on the server
        checkpoints.find_model("DiT-XL-2-512x512.pt")
    assert not os.path.exists(os.path.join(checkpoints.PRETRAINED_DIR, "DiT-XL-2-512x512.pt"))


def test_download_command_prefetches_and_says_what_failed(fake_server, capsys):
    """download.py (the README's pre-fetch): the named file lands in PRETRAINED_DIR, checked as a plain
    state dict; a file the server lacks is a one-line error naming it; an unknown name is refused."""
    server, model = fake_server
    download.main(["DiT-XL-2-256x256.pt"])
    local = os.path.join(checkpoints.PRETRAINED_DIR, "DiT-XL-2-256x256.pt")
    assert f"DiT-XL-2-256x256.pt: {local}" in capsys.readouterr().out
    assert torch.equal(torch.load(local, weights_only=True)["x_embedder.proj.weight"],
                       model.state_dict()["x_embedder.proj.weight"])
    with pytest.raises(SystemExit, match="could not download .*DiT-XL-2-512x512.pt"):
        download.main([])  # both: the 256 file is there, the 512 one is not on the server
    with pytest.raises(SystemExit):
        download.main(["DiT-XL-2-1024x1024.pt"])
    assert "not an official file" in capsys.readouterr().err


class FailingResponse(io.BytesIO):
    """An HTTP response that announces `length` bytes, sends `data`, then fails (or just ends)."""

    def __init__(self, data, length, fail):
        super().__init__(data)
        self.headers = {"Content-Length": str(length)}
        self.fail = fail

    def read(self, n=-1):
        chunk = super().read(n)
        if not chunk and self.fail:
            raise ConnectionResetError("connection reset by peer")
        return chunk


@pytest.mark.parametrize("fail", [True, False], ids=["connection-reset", "short-read"])
def test_interrupted_download_leaves_no_file(fake_server, monkeypatch, fail):
    server, _ = fake_server
    data = (server / "DiT-XL-2-256x256.pt").read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: FailingResponse(data[: len(data) // 3], len(data), fail))
    with pytest.raises(InputError, match="could not download .*nothing was written"):
        checkpoints.find_model("DiT-XL-2-256x256.pt")
    assert os.listdir(checkpoints.PRETRAINED_DIR) == []  # no partial file under any name


def test_download_after_interruption_succeeds(fake_server, monkeypatch):
    server, model = fake_server
    real = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FailingResponse(b"xx", 100, True))
    with pytest.raises(InputError):
        checkpoints.find_model("DiT-XL-2-256x256.pt")
    monkeypatch.setattr(urllib.request, "urlopen", real)
    state_dict, _ = checkpoints.find_model("DiT-XL-2-256x256.pt")
    assert torch.equal(state_dict["pos_embed"], model.pos_embed)


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", NORMS)
@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_sample_images_per_image_randomness(tmp_path, normalization, sampler):
    """Image i depends on (seed, i) only: drawing it alone or inside a batch gives the same result."""
    path, _, _, _ = write_checkpoint(tmp_path / "ckpt.pt", normalization)
    model, config = checkpoints.load_model(path)
    diffusion = create_diffusion("8")
    labels = torch.tensor([3, 1, 4, 1])

    def draw(indices, cfg_scale=4.0):
        gens = sampling.image_generators(7, indices)
        return sampling.sample_images(model, diffusion, labels[list(indices)], gens, cfg_scale, sampler=sampler,
                                    clip_denoised=True)

    batch = draw(range(4))
    assert batch.shape == (4, 3, 8, 8) and torch.isfinite(batch).all() and batch.abs().max() <= 1
    # Alone or in a batch, the model's float32 matmuls round differently; the multistep solvers carry that
    # rounding along (3e-6 seen on a 2-core CPU, already at 72aa15f). Different noise would differ by O(1).
    torch.testing.assert_close(draw([2]), batch[2:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(draw(range(4)), batch, rtol=0, atol=0)  # global RNG plays no part
    assert not torch.allclose(batch[1], batch[3])  # same label, different noise
    assert not torch.allclose(draw(range(4), cfg_scale=1.0), batch)


def grid_size(num, image_size, nrow=4, padding=2):
    cols, rows = min(num, nrow), -(-num // nrow)
    return cols * (image_size + padding) + padding, rows * (image_size + padding) + padding


@pytest.mark.parametrize("normalization", NORMS)
def test_sample_py_writes_grid(tmp_path, normalization):
    path, _, _, _ = write_checkpoint(tmp_path / "ckpt.pt", normalization)
    out = str(tmp_path / "grid.png")
    sample.main(["--ckpt", path, "--num-sampling-steps", "5", "--out", out, "--seed", "3"])
    assert Image.open(out).size == grid_size(8, 8)
    first = np.asarray(Image.open(out))
    sample.main(["--ckpt", path, "--num-sampling-steps", "5", "--out", out, "--seed", "3", "--class-labels", "1", "2",
                 "--cfg-channels", "3", "--sampler", "ddim", "--weights", "raw"])
    assert Image.open(out).size == grid_size(2, 8)
    assert first.std() > 0


def test_sample_py_subprocess(tmp_path, ckpt):
    out = tmp_path / "sub.png"
    run = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt[0], "--num-sampling-steps", "3", "--out",
                          str(out), "--class-labels", "0", "9", "5"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == grid_size(3, 8)


def test_sample_py_flag_errors(tmp_path, ckpt, capsys):
    path = ckpt[0]
    out = str(tmp_path / "x.png")
    with pytest.raises(SystemExit, match="trained with layer-norm"):
        sample.main(["--ckpt", path, "--normalization", "none", "--out", out])
    with pytest.raises(SystemExit, match="--model DiT-B/2 conflicts"):
        sample.main(["--ckpt", path, "--model", "DiT-B/2", "--out", out])
    with pytest.raises(SystemExit, match="out of range"):
        sample.main(["--ckpt", path, "--class-labels", "10", "--out", out])
    with pytest.raises(SystemExit, match="cfg-channels"):
        sample.main(["--ckpt", path, "--cfg-channels", "4", "--out", out])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        sample.main(["--ckpt", str(tmp_path / "nope.pt"), "--out", out])
    with pytest.raises(SystemExit, match="only for DiT-XL/2"):
        sample.main(["--image-size", "128", "--out", out])
    assert not os.path.exists(out)


def test_a_normalization_flag_that_contradicts_the_checkpoint_names_the_checkpoints_own(tmp_path, ckpt):
    """The hint is the checkpoint's normalization and that it is read from the checkpoint, not --depth."""
    bare = str(tmp_path / "bare.pt")
    torch.save(torch.load(ckpt[0])["ema"], bare)  # a bare state dict says its normalization too
    bare_flags = ["--model", "DiT-S/2", "--vae", "none", "--image-size", "8", "--num-classes", "10", "--num-heads", "2"]
    for argv in (["--ckpt", ckpt[0]], ["--ckpt", bare, *bare_flags]):
        with pytest.raises(SystemExit) as e:
            sample.main([*argv, "--normalization", "none", "--out", str(tmp_path / "x.png")])
        message = str(e.value)
        assert "--normalization none: this checkpoint was trained with layer-norm" in message
        assert "read the normalization from the checkpoint, so drop the flag" in message and "--depth" not in message
        args = sample_ddp.parse_args([*argv, "--normalization", "layer-norm"])  # the same value is accepted
        assert sampling.load_for_sampling(args)[0].normalization == "layer-norm"
    assert not os.path.exists(tmp_path / "x.png")


def test_sample_py_toy_checkpoint_without_null_class(tmp_path, capsys):
    """train_toy.py's config: 2x2 pixels, 2 channels, one class, no label dropout -> unguided, RGB padded."""
    path, _, _, _ = write_checkpoint(tmp_path / "toy.pt", "none", model="DiT-XS/1", input_size=2, image_size=2,
                                     in_channels=2, num_classes=1, class_dropout_prob=0.0, script="train_toy.py")
    out = str(tmp_path / "toy.png")
    sample.main(["--ckpt", path, "--num-sampling-steps", "4", "--out", out])
    assert "no null class" in capsys.readouterr().err
    assert Image.open(out).size == grid_size(8, 2)


def test_vae_path_decode(tmp_path):
    """--vae PATH: a tiny diffusers AutoencoderKL (2x downsampling) saved to a folder."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae_dir = str(tmp_path / "vae")
    vae.save_pretrained(vae_dir)
    path, _, _, _ = write_checkpoint(tmp_path / "latent.pt", in_channels=4, input_size=8, image_size=16, vae=vae_dir,
                                     latent_scale=0.5)
    out = str(tmp_path / "vae.png")
    images = sample.main(["--ckpt", path, "--num-sampling-steps", "3", "--out", out, "--class-labels", "1", "2"])
    assert images.shape == (2, 3, 16, 16)
    assert Image.open(out).size == grid_size(2, 16)
    # The decode path is vae.decode(latents / latent_scale).sample.
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(sampling.decode(vae.eval(), z, 0.5), vae.decode(z / 0.5).sample)
    # A VAE with other latent channels is refused with a clear message.
    path, _, _, _ = write_checkpoint(tmp_path / "c3.pt", in_channels=3, input_size=8, image_size=16, vae=vae_dir)
    with pytest.raises(SystemExit, match="4 latent channels but the model expects 3"):
        sample.main(["--ckpt", path, "--num-sampling-steps", "2", "--out", out])
    with pytest.raises(SystemExit, match="--vae"):
        sample.main(["--ckpt", path, "--vae", str(tmp_path / "no-such-vae"), "--out", out])


# ----------------------------------------------------------------------------------------------------
# sample_ddp.py
# ----------------------------------------------------------------------------------------------------

DDP_FLAGS = ["--num-sampling-steps", "4", "--num-fid-samples", "11", "--per-proc-batch-size", "3", "--cfg-scale", "2"]


def npz_of(folder):
    return np.load(folder + ".npz")["arr_0"]


def test_sample_ddp_npz_resume_and_world_size_2(tmp_path, ckpt, capsys):
    path = ckpt[0]
    folder = sample_ddp.main(["--ckpt", path, "--sample-dir", str(tmp_path / "one"), *DDP_FLAGS])
    assert os.path.basename(folder) == "DiT-S-2-ckpt-ema-layer-norm-size-8-vae-none-cfg-2.0-ddpm-4-seed-0"
    arr = npz_of(folder)
    assert arr.shape == (11, 8, 8, 3) and arr.dtype == np.uint8
    with np.load(folder + ".npz") as f:  # labels as arr_1, as ADM's class-conditional sampler writes them
        assert list(f.keys()) == ["arr_0", "arr_1"] and f["arr_1"].dtype == np.int64
        np.testing.assert_array_equal(f["arr_1"], sampling.image_labels(sampling.image_generators(0, range(11)), 10))
    for i in (0, 10):
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))), arr[i])
    assert len({arr[i].tobytes() for i in range(11)}) == 11

    # Resume: remove some PNGs (and leave a stale temp file), rerun: only those are drawn, same npz.
    for i in (1, 7, 10):
        os.unlink(os.path.join(folder, f"{i:06d}.png"))
    open(os.path.join(folder, ".tmp-000001.png"), "wb").write(b"partial")
    os.unlink(folder + ".npz")
    capsys.readouterr()
    sample_ddp.main(["--ckpt", path, "--sample-dir", str(tmp_path / "one"), *DDP_FLAGS])
    err = capsys.readouterr().err
    assert "8 of 11 images already there, drawing 3" in err and "images/s" in err
    np.testing.assert_array_equal(npz_of(folder), arr)
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp")]

    # Two processes (torchrun, gloo): the same images.
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "sample_ddp.py",
                          "--ckpt", path, "--sample-dir", str(tmp_path / "two"), *DDP_FLAGS],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stderr
    two = os.path.join(tmp_path / "two", os.path.basename(folder))
    np.testing.assert_array_equal(npz_of(two), arr)


def test_sample_ddp_eval_ref_scores_the_npz(tmp_path, ckpt, digits_classifier, capsys):
    from ditlab.evaluation import evaluate
    from ditlab.features import digits_rgb

    ref = str(tmp_path / "ref.npz")
    np.savez(ref, digits_rgb()[0][:40])
    folder = sample_ddp.main(["--ckpt", ckpt[0], "--sample-dir", str(tmp_path), *DDP_FLAGS, "--eval-ref", ref,
                              "--eval-features", "digits", "--digits-classifier", digits_classifier])
    metrics = json.load(open(folder + ".metrics.json"))
    assert metrics["num_samples"] == 11 and metrics["num_reference"] == 40 and metrics["features"] == "digits"
    assert 0.0 <= metrics["accuracy"] <= 1.0  # scored against the labels sample_ddp stored as arr_1
    assert metrics == {**metrics, **evaluate(folder + ".npz", ref, features="digits", device="cpu",
                                                        digits_classifier=digits_classifier, progress=False)}
    assert "FD-digits" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a missing reference is caught before any sampling
        sample_ddp.parse_args(["--ckpt", ckpt[0], "--eval-ref", str(tmp_path / "missing.npz")])


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver++", "unipc"])  # ddpm: the test above
def test_sample_ddp_world_size_1_and_2_give_the_same_images_for_every_sampler(tmp_path, ckpt, sampler):
    flags = ["--ckpt", ckpt[0], "--sampler", sampler, *DDP_FLAGS]
    folder = sample_ddp.main([*flags, "--sample-dir", str(tmp_path / "one")])
    assert folder.endswith(f"-{sampler}-4-seed-0")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "sample_ddp.py",
                          *flags, "--sample-dir", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = npz_of(folder), npz_of(os.path.join(tmp_path / "two", os.path.basename(folder)))
    np.testing.assert_array_equal(two, one)
    assert len({image.tobytes() for image in one}) == len(one)


def test_sample_ddp_helpers():
    assert [list(b) for b in sample_ddp.batches_to_draw([1, 7, 10], 11, 3)] == [[0, 1, 2], [6, 7, 8], [9, 10]]
    assert sample_ddp.checkpoint_tag(None, {}) == "pretrained"
    assert sample_ddp.checkpoint_tag("results/003-run/checkpoints/latest.pt", {"ckpt_step": 500}) == "003-run-0000500"
    assert sample_ddp.checkpoint_tag("results/003-run/checkpoints/0000400.pt", {"ckpt_step": 400}) == "003-run-0000400"
    assert sample_ddp.checkpoint_tag("weights.pt", {}) == "weights"


class StopAfter:
    """Stands in for ditlab.preemption.StopFlag: reports a stop signal once it has been asked `n` times."""

    def __init__(self, n):
        self.n, self.name = n, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __bool__(self):
        self.n -= 1
        if self.n < 0:
            self.name = "SIGTERM"
        return self.n < 0


def test_sample_ddp_stop_signal_keeps_the_batch_then_finishes_identically(tmp_path, ckpt, monkeypatch, capsys):
    """A stop signal ends the run after the batch in progress (its PNGs saved, no .npz, exit 75); the same
    command then draws the rest and the .npz equals an uninterrupted run's."""
    path = ckpt[0]
    straight = sample_ddp.main(["--ckpt", path, "--sample-dir", str(tmp_path / "straight"), *DDP_FLAGS])
    monkeypatch.setattr(sample_ddp, "StopFlag", lambda: StopAfter(1))  # stop after the second batch
    with pytest.raises(SystemExit) as stop:
        sample_ddp.main(["--ckpt", path, "--sample-dir", str(tmp_path / "cut"), *DDP_FLAGS])
    assert stop.value.code == 75 and "SIGTERM received: stopped after 6 new images" in capsys.readouterr().err
    folder = os.path.join(tmp_path / "cut", os.path.basename(straight))
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(6)] and not os.path.exists(folder + ".npz")
    monkeypatch.undo()
    sample_ddp.main(["--ckpt", path, "--sample-dir", str(tmp_path / "cut"), *DDP_FLAGS])
    np.testing.assert_array_equal(npz_of(folder), npz_of(straight))


#################################################################################
#            Output paths and step counts checked before the work               #
#################################################################################


def never_load(*args, **kwargs):
    raise AssertionError("the model was loaded: the bad flag was not caught before the work")


@pytest.mark.parametrize("out,message", [("grid", r"grid: give a file name ending in \.png"),
                                         ("folder.png", "--out: .* is a directory")])
def test_sample_out_is_checked_before_sampling(tmp_path, monkeypatch, out, message):
    monkeypatch.setattr(sample, "load_for_sampling", never_load)
    (tmp_path / "folder.png").mkdir()
    out = str(tmp_path / out)
    with pytest.raises(SystemExit, match=message):
        sample.main(["--ckpt", "x.pt", "--out", out])


def test_sample_out_folder_is_created_and_steps_above_1000_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "load_for_sampling", never_load)
    with pytest.raises(AssertionError, match="model was loaded"):  # the path is fine: it gets to the model
        sample.main(["--ckpt", "x.pt", "--out", str(tmp_path / "new" / "deeper" / "grid.png")])
    assert os.path.isdir(tmp_path / "new" / "deeper")
    with pytest.raises(UsageError, match="--num-sampling-steps 5000: the diffusion has 1000 steps"):
        sampling.load_for_sampling(sample.parse_args(["--num-sampling-steps", "5000"]))


def test_sample_ddp_sample_dir_that_is_a_file_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(sample_ddp, "load_for_sampling", never_load)
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(SystemExit, match="--sample-dir .* is a file; give a folder"):
        sample_ddp.main(["--ckpt", "x.pt", "--sample-dir", str(path), "--device", "cpu"])


def test_a_bare_state_dict_of_a_non_standard_size_samples_and_mismatches_say_what_to_pass(tmp_path):
    """The demo's DiT (depth 4, width 128, 4 heads, 16 px pixels, 10 classes) saved as a bare
    state dict: its depth and width are read from the weights, --num-heads and the rest come from flags,
    and a wrong description names the flags its shapes call for."""
    torch.manual_seed(0)
    model = build_model_from_config(dict(model="DiT-S/4", depth=4, hidden_size=128, num_heads=4, input_size=16,
                                         in_channels=3, num_classes=10))
    path = str(tmp_path / "bare.pt")
    torch.save(model.state_dict(), path)
    flags = ["--ckpt", path, "--model", "DiT-S/4", "--image-size", "16", "--num-classes", "10", "--vae", "none",
             "--num-sampling-steps", "2", "--device", "cpu"]
    images = sample.main([*flags, "--num-heads", "4", "--out", str(tmp_path / "grid.png")])
    assert images.shape == (8, 3, 16, 16) and os.path.isfile(tmp_path / "grid.png")
    with pytest.raises(SystemExit, match=r"divisible by the number of heads 6.*--num-heads N \(a divisor of 128"):
        sample.main([*flags, "--out", str(tmp_path / "g2.png")])  # DiT-S's 6 heads do not divide 128
    with pytest.raises(SystemExit, match=r"does not fit.*--depth 4 --hidden-size 128 .*patch size 4.*--num-classes 10 "
                                         r"\(or 11 without label dropout\), --vae none --image-size 16"):
        sample.main(["--ckpt", path, "--model", "DiT-S/2", "--num-heads", "4", "--out", str(tmp_path / "g3.png")])


def test_outputs_default_under_the_ignored_results_folder():
    """sample.py's grid and sample_ddp.py's folders default under results/, which git ignores."""
    out, sample_dir = sample.parse_args([]).out, sample_ddp.parse_args([]).sample_dir
    assert (out, sample_dir) == (os.path.join("results", "sample.png"), os.path.join("results", "samples"))
    for path in (out, os.path.join(sample_dir, "x.npz"), "sample.png", os.path.join("samples", "x.npz")):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not git-ignored"


def test_sample_ddp_shows_images_per_second_only_when_the_batches_run_long(tmp_path, ckpt, monkeypatch, capsys):
    """A short run prints no bar; a long one (here: any, the delay set to 0) shows images/s and the ETA."""
    sample_ddp.main(["--ckpt", ckpt[0], "--sample-dir", str(tmp_path / "quick"), *DDP_FLAGS])
    assert "%|" not in capsys.readouterr().err
    monkeypatch.setattr(sampling, "PROGRESS_DELAY", 0)
    sample_ddp.main(["--ckpt", ckpt[0], "--sample-dir", str(tmp_path / "long"), *DDP_FLAGS])
    err = capsys.readouterr().err
    assert "sampling: 100%" in err and "11/11" in err and "img/s" in err and "building .npz" in err


def test_sample_ddp_refuses_a_malformed_eval_ref_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(sample_ddp, "load_for_sampling", never_load)
    ref = tmp_path / "ref.npz"
    np.savez(ref, np.zeros((4, 3, 8, 8), np.uint8))  # channels first
    with pytest.raises(SystemExit, match="ref.npz.*transpose"):
        sample_ddp.main(["--ckpt", "x.pt", "--sample-dir", str(tmp_path / "s"), "--eval-ref", str(ref),
                         "--device", "cpu"])
