"""End-to-end tests of train.py, extract_latents.py and ditlab/data.py on the CPU with tiny models: a small
ImageFolder and a small diffusers AutoencoderKL written to tmp folders, torchrun with two gloo
processes, pre-extracted latents, exact resume, atomic checkpoints, SIGTERM, NaN stops and the errors
for bad input."""

import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_sample import StopAfter

import extract_latents
import train
from ditlab import data
from ditlab.checkpoints import load_checkpoint
from ditlab.config import resolve
from ditlab.distributed import DistInfo
from ditlab.errors import DIVERGED_EXIT, PREEMPTED_EXIT, Diverged, InputError, UsageError
from ditlab.files import truncate_jsonl
from ditlab.preemption import StopFlag, ignore_stop_signals
from ditlab.run import configure_threads, new_run_dir
from ditlab.trainer import Trainer, compile_mode
from models import build_model_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES, NUM_CLASSES = 12, 3
# A DiT-S/2 shrunk to one block of width 32; 16px images -> 8x8x4 latents with the tiny VAE (factor 2).
TINY = ["--model", "DiT-S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--image-size", "16",
        "--num-classes", "4", "--global-batch-size", "4", "--log-every", "1", "--num-workers", "0",
        "--sample-every", "0", "--precision", "fp32", "--lr", "1e-3", "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes x 4 random RGB images of 20x24 pixels (not square: the center crop has work to do)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        folder = root / f"class{i % NUM_CLASSES}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL (downsampling 2, 4 latent channels) saved with save_pretrained."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=16)
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path)
    return path


def run(tmp, image_folder, *extra):
    return train.main([*TINY, "--data-path", image_folder, "--results-dir", str(tmp), *extra])


def only_run(results_dir):
    (name,) = os.listdir(results_dir)
    return os.path.join(results_dir, name)


def assert_same_weights(a, b, keys=("model", "ema")):
    for key in keys:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


def torchrun(port, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


# A launcher (written to a tmp folder): every rank saves its raw weights to <run>/rank<r>-weights.pt after each
# checkpoint, so the file ends with the rank's final weights. train.py writes its loop out in main, so there
# is no Trainer.fit for tests/rank_weights.py to wrap; Trainer.save is called on every rank.
RANK_WEIGHTS = """
import os, runpy, sys
import torch
from ditlab.trainer import Trainer

save = Trainer.save

def save_and_keep(self, extra=None):
    save(self, extra)
    path = os.path.join(self.run_dir, f"rank{self.dist.rank}-weights.pt")
    torch.save({"model": self.raw.state_dict()}, path)

Trainer.save = save_and_keep
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def printed_settings(capsys, main, argv):
    """What `main(argv)` with --dry-run prints, as a dict (each line is `name: JSON value`); it returns None."""
    capsys.readouterr()
    assert main([*argv, "--dry-run"]) is None
    lines = capsys.readouterr().out.splitlines()
    return dict((name, json.loads(value)) for name, value in (line.split(": ", 1) for line in lines))


def test_sample_grid_with_another_sampler(tmp_path, image_folder):
    run_dir = run(tmp_path, image_folder, "--vae", "none", "--max-steps", "2", "--sample-every", "2",
                  "--sample-steps", "3", "--sample-images", "4", "--sample-sampler", "dpm-solver++")
    assert os.listdir(os.path.join(run_dir, "samples")) == ["0000002.png"]
    assert "(dpm-solver++ 3 steps, cfg 4.0" in open(os.path.join(run_dir, "log.txt")).read()
    assert json.load(open(os.path.join(run_dir, "config.json")))["sample_sampler"] == "dpm-solver++"


#################################################################################
#                                  Data                                         #
#################################################################################


def test_center_crop_sizes():
    big = Image.fromarray(np.zeros((100, 70, 3), dtype=np.uint8))  # short side 70 >= 2 x 32: BOX first
    assert data.center_crop_arr(big, 32).shape == (32, 32, 3)
    small = Image.fromarray(np.zeros((9, 13, 3), dtype=np.uint8))  # upscaled
    assert data.center_crop_arr(small, 16).shape == (16, 16, 3)


def test_flip_sampler_is_deterministic_and_resumable(image_folder):
    folder = data.FlipImageFolder(image_folder, 16)
    keys = lambda s: list(iter(s))
    a, b = data.FlipSampler(folder, 1, 0, seed=3), data.FlipSampler(folder, 1, 0, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert keys(a) == keys(b) and sorted(i for i, _ in keys(a)) == list(range(NUM_IMAGES))
    assert {f for _, f in keys(a)} <= {0, 1}
    b.start = 5
    assert keys(b) == keys(a)[5:] and len(b) == NUM_IMAGES - 5
    a.set_epoch(3)
    assert keys(a) != keys(b)
    # two ranks split the epoch; an image's flip does not depend on the world size
    r0, r1 = data.FlipSampler(folder, 2, 0, seed=3), data.FlipSampler(folder, 2, 1, seed=3)
    r0.set_epoch(3), r1.set_epoch(3)
    flips = dict(keys(a))
    assert not {i for i, _ in keys(r0)} & {i for i, _ in keys(r1)}
    assert all(flips[i] == f for i, f in keys(r0) + keys(r1))
    plain = data.FlipSampler(folder, 1, 0, seed=3, flip=False)  # --no-flip
    plain.set_epoch(3)
    assert [i for i, _ in keys(plain)] == [i for i, _ in keys(a)] and {f for _, f in keys(plain)} == {0}


def test_flipped_item_is_the_mirrored_image(image_folder):
    folder = data.FlipImageFolder(image_folder, 16)
    x0, y0 = folder[3, 0]
    x1, y1 = folder[3, 1]
    assert x0.shape == (3, 16, 16) and y0 == y1 == 0
    assert torch.equal(x1, x0.flip(-1)) and -1 <= x0.min() and x0.max() <= 1


def test_small_data_set_is_cached_decoded_and_unchanged(tmp_path, image_folder):
    root = tmp_path / "images"
    shutil.copytree(image_folder, root)
    cached, plain = data.FlipImageFolder(str(root), 16), data.FlipImageFolder(str(root), 16, cache_bytes=0)
    assert cached.cache == {} and plain.cache is None  # 12 x 3 x 16 x 16 bytes fit; none fit in 0
    first = [(cached[i, 0], cached[i, 1]) for i in range(NUM_IMAGES)]  # the read that fills the cache
    for i, ((x, y), (x_flip, y_flip)) in enumerate(first):
        ref_x, ref_y = plain[i, 0]  # decoded from its file
        assert y == y_flip == ref_y and torch.equal(x, ref_x) and torch.equal(x_flip, ref_x.flip(-1))
    assert sorted(cached.cache) == list(range(NUM_IMAGES))
    shutil.rmtree(root)  # the files are gone: the cache answers, with the values it first read
    for i, ((x, y), (x_flip, _)) in enumerate(first):
        (a, b), (a_flip, _) = cached[i, 0], cached[i, 1]
        assert b == y and torch.equal(a, x) and torch.equal(a_flip, x_flip)
    cached[0, 0][0].add_(1)  # a returned tensor is the caller's: changing it leaves the cache as it was
    assert torch.equal(cached[0, 0][0], first[0][0][0])
    with pytest.raises(InputError, match="no image .* can be read"):  # the uncached one reads the files
        plain[0, 0]
    exact = data.FlipImageFolder(image_folder, 16, cache_bytes=NUM_IMAGES * 3 * 16 * 16 - 1)
    assert exact.cache is None  # one byte short of the data set: not cached


#################################################################################
#                                  Training                                     #
#################################################################################


def test_train_with_local_vae_writes_a_rebuildable_checkpoint(tmp_path, image_folder, vae_dir):
    run_dir = run(tmp_path, image_folder, "--vae", vae_dir, "--max-steps", "4", "--ckpt-every", "2",
                  "--sample-every", "2", "--sample-steps", "3", "--sample-images", "4", "--tensorboard")
    assert os.path.basename(run_dir) == "000-DiT-S-2-layer-norm"
    assert any(f.startswith("events.") for f in os.listdir(os.path.join(run_dir, "tensorboard")))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["0000002.pt", "0000004.pt", "latest.pt"]
    assert sorted(os.listdir(os.path.join(run_dir, "samples"))) == ["0000002.png", "0000004.png"]
    assert Image.open(os.path.join(run_dir, "samples", "0000004.png")).size[0] > 64
    ckpt = load_checkpoint(run_dir)  # weights_only=True
    assert ckpt["step"] == 4 and (ckpt["epoch"], ckpt["position"]) == (1, 1)  # 3 steps per epoch
    config = ckpt["config"]
    assert json.load(open(os.path.join(run_dir, "config.json"))) == config
    assert config["script"] == "train.py" and config["vae"] == vae_dir and config["latent_scale"] == 0.18215
    assert (config["image_size"], config["input_size"], config["in_channels"]) == (16, 8, 4)
    assert config["num_classes"] == 4 and config["learn_sigma"] and config["class_dropout_prob"] == 0.1
    model = build_model_from_config(config)
    model.load_state_dict(ckpt["ema"])  # strict: the config alone rebuilds the model
    log = open(os.path.join(run_dir, "log.txt")).read()
    for text in ("loss", "grad norm", "steps/s", "img/s", "saved EMA sample grid"):
        assert text in log


def test_torchrun_two_ranks_hold_identical_weights(tmp_path, image_folder, vae_dir, digits_classifier):
    launcher = tmp_path / "rank_weights.py"
    launcher.write_text(RANK_WEIGHTS)
    out = torchrun(29531, str(launcher), "train.py", *TINY, "--data-path", image_folder,
                   "--results-dir", str(tmp_path / "runs"), "--vae", vae_dir, "--max-steps", "1", "--num-workers", "1",
                   *fid_flags(image_folder, digits_classifier, every=1))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run_dir = only_run(tmp_path / "runs")
    ckpt = load_checkpoint(run_dir)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 1 and len(ckpt["rng"]) == 2
    ranks = [torch.load(os.path.join(run_dir, f"rank{r}-weights.pt"), weights_only=True)["model"] for r in (0, 1)]
    assert_same_weights({"model": ranks[0]}, {"model": ranks[1]}, keys=("model",))
    assert_same_weights({"model": ranks[0]}, ckpt, keys=("model",))
    assert ranks[0]["final_layer.linear.weight"].abs().sum() > 0  # zero at init: the step did update it
    # FID sharded over both ranks (batches of 2: rank 0 draws images 0, 1, 4; rank 1 images 2, 3), scored once
    (row,) = fid_rows(run_dir)
    assert row["step"] == 1 and row["num_samples"] == 5


def test_extract_then_train_from_latents(tmp_path, image_folder, vae_dir, monkeypatch):
    common = ["--data-path", image_folder, "--image-size", "16", "--vae", vae_dir, "--shard-size", "5",
              "--batch-size", "2", "--num-workers", "0", "--num-classes", "4"]
    one = str(tmp_path / "one")
    extract_latents.main([*common, "--latents-dir", one])
    out = torchrun(29532, "extract_latents.py", *common, "--latents-dir", str(tmp_path / "two"))
    assert out.returncode == 0, out.stderr[-3000:]
    index = json.load(open(os.path.join(one, "index.json")))
    assert index["num_images"] == NUM_IMAGES and [s["count"] for s in index["shards"]] == [5, 5, 2]
    assert (index["latent_size"], index["latent_channels"], index["vae"]) == (8, 4, vae_dir)
    # the same latents whatever the number of processes (noise seeded per shard)
    for s in index["shards"]:
        a = torch.load(os.path.join(one, s["file"]), weights_only=True)
        b = torch.load(os.path.join(tmp_path, "two", s["file"]), weights_only=True)
        assert a["latents"].shape == (s["count"], 2, 4, 8, 8)
        torch.testing.assert_close(a["latents"], b["latents"], rtol=0, atol=1e-5)
        assert torch.equal(a["labels"], b["labels"])
    # (index, flip) keys give the same labels as the images; the flipped latent is another encoding
    shards, folder = data.LatentShards(one), data.FlipImageFolder(image_folder, 16)
    for i in range(NUM_IMAGES):
        assert shards[i, 0][1] == shards[i, 1][1] == folder[i, 0][1]
        assert not torch.equal(shards[i, 0][0], shards[i, 1][0])

    with pytest.raises(SystemExit, match="--image-size 32 contradicts the latents"):
        train.main([*TINY, "--latents-dir", one, "--image-size", "32", "--results-dir", str(tmp_path / "runs")])

    # with sample grids the VAE (from the index) decodes them
    grids = train.main([*TINY, "--latents-dir", one, "--results-dir", str(tmp_path / "grids"), "--max-steps", "2",
                        "--sample-every", "2", "--sample-steps", "2", "--sample-images", "2"])
    assert os.listdir(os.path.join(grids, "samples")) == ["0000002.png"]

    # training reads the shards and never loads the VAE when it draws no sample grids
    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE was loaded")

    monkeypatch.setattr(train, "load_vae", no_vae)
    run_dir = train.main([*TINY, "--latents-dir", one, "--results-dir", str(tmp_path / "runs"), "--max-steps", "3",
                          "--no-layernorm"])
    ckpt = load_checkpoint(run_dir)
    assert run_dir.endswith("000-DiT-S-2-none") and ckpt["step"] == 3
    config = ckpt["config"]
    assert config["normalization"] == "none" and config["latents_dir"] == one
    assert (config["vae"], config["image_size"], config["input_size"], config["in_channels"]) == (vae_dir, 16, 8, 4)


def fid_flags(ref, classifier, every=3):
    """FID during training on the digits route (fast on a CPU): 5 images, 2 DDPM steps."""
    return ("--fid-every", str(every), "--fid-ref", ref, "--fid-features", "digits", "--digits-classifier", classifier,
            "--fid-num-samples", "5", "--fid-sampling-steps", "2", "--fid-batch-size", "2")


def fid_rows(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, image_folder, vae_dir, monkeypatch,
                                                           digits_classifier):
    # 12 images / batch 4 = 3 steps per epoch: the crash (after step 4's checkpoint) is mid-epoch. FID is on
    # (steps 3, 6 and the last): its sampling must not disturb the training RNG.
    args = ("--vae", vae_dir, "--max-steps", "7", "--ckpt-every", "2", "--sample-every", "3", "--sample-steps", "2",
            "--sample-images", "3", "--num-workers", "1", *fid_flags(image_folder, digits_classifier))
    full = run(tmp_path / "full", image_folder, *args)
    rows = fid_rows(full)
    assert [r["step"] for r in rows] == [3, 6, 7]
    assert all(r["kind"] == "fid" and r["weights"] == "ema" and r["num_samples"] == 5 for r in rows)
    assert all(np.isfinite(r["fd_digits"]) and 0 <= r["precision"] <= 1 for r in rows)
    assert "eval at step 6 (EMA, 2 ddpm steps" in open(os.path.join(full, "log.txt")).read()

    real_step = Trainer.train_step

    def crashing(self, x, y):
        if self.step == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", image_folder, *args)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    cut = only_run(tmp_path / "cut")
    ckpt = load_checkpoint(cut)
    assert (ckpt["step"], ckpt["epoch"], ckpt["position"]) == (4, 1, 1)

    assert train.main(["--resume", cut, "--num-workers", "1"]) == cut
    a, b = load_checkpoint(full), load_checkpoint(cut)
    assert a["step"] == b["step"] == 7
    assert_same_weights(a, b)
    for x, y in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    for name in ("0000006.png", "0000007.png"):  # grids drawn after the resume match too
        assert open(os.path.join(full, "samples", name), "rb").read() == open(os.path.join(cut, "samples", name), "rb").read()
    assert fid_rows(cut) == rows  # step 3 before the crash, 6 and 7 after the resume: the same scores


def test_resume_refuses_a_contradicting_flag(tmp_path, image_folder):
    run_dir = run(tmp_path, image_folder, "--vae", "none", "--max-steps", "1")
    with pytest.raises(SystemExit, match="--hidden-size 64 contradicts the run being resumed"):
        train.main(["--resume", run_dir, "--hidden-size", "64"])
    with pytest.raises(SystemExit, match="has reached step 1 and --max-steps is 1: nothing to do"):
        train.main(["--resume", run_dir])  # it used to exit 0 having done nothing


def test_dry_run_of_a_resume_shows_the_runs_settings_with_the_resumable_flags_and_changes_nothing(
        tmp_path, image_folder, capsys):
    run_dir = run(tmp_path, image_folder, "--vae", "none", "--max-steps", "1", "--lr", "1e-3")
    before = {path: open(path, "rb").read() for path in (os.path.join(run_dir, "config.json"),
                                                          os.path.join(run_dir, "log.txt"))}
    shown = printed_settings(capsys, train.main, ["--resume", run_dir, "--max-steps", "5", "--lr", "5e-4"])
    assert (shown["max_steps"], shown["lr"]) == (5, 5e-4)  # resumable: the command line's
    assert (shown["hidden_size"], shown["depth"], shown["num_classes"], shown["vae"]) == (32, 1, 4, "none")  # the run's
    assert {path: open(path, "rb").read() for path in before} == before
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["0000001.pt", "latest.pt"]
    with pytest.raises(SystemExit, match="--hidden-size 64 contradicts the run being resumed"):
        train.main(["--resume", run_dir, "--hidden-size", "64", "--dry-run"])  # checked as for a real resume


def test_dry_run_prints_the_demo_settings_a_typed_flag_overrides_and_creates_nothing(tmp_path, capsys):
    digits, results = tmp_path / "digits", tmp_path / "runs"
    shown = printed_settings(capsys, train.main, ["--demo", "--data-path", str(digits), "--results-dir",
                                                  str(results), "--lr", "1e-3", "--max-steps", "20"])
    assert set(shown) == {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert (shown["model"], shown["depth"], shown["hidden_size"], shown["image_size"]) == ("DiT-S/4", 4, 128, 16)
    assert (shown["vae"], shown["ema_decay"], shown["no_flip"], shown["demo"]) == ("none", 0.995, True, True)
    assert (shown["lr"], shown["max_steps"]) == (1e-3, 20)  # typed flags beat the preset's 2e-3 and 8000
    assert shown["latent_scale"] == 0.18215  # a default filled in during resolution
    assert not digits.exists() and not results.exists()
    # without --demo, the reference recipe
    plain = printed_settings(capsys, train.main, ["--data-path", str(digits), "--results-dir", str(results)])
    assert (plain["model"], plain["image_size"], plain["vae"], plain["lr"], plain["demo"]) == (
        "DiT-XL/2", 256, "ema", 1e-4, False)


def test_dry_run_alone_is_the_demos_and_exits_0_writing_nothing(tmp_path):
    """`python train.py --dry-run` shows what `python train.py` would run (the demo), from a fresh folder:
    it exits 0 and the folder stays empty (no data/digits, no results/)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dry-run"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'model: "DiT-S/4"' in out.stdout.splitlines() and "demo: true" in out.stdout.splitlines()
    assert os.listdir(tmp_path) == []


def test_probe_during_training_writes_rows_and_leaves_training_alone(tmp_path, image_folder, vae_dir):
    """--probe-every: per-timestep rows of the EMA model on fixed training images at every N steps and the last,
    their norm-input statistics, and weights bitwise those of the same run without the probe."""
    from ditlab.probe import TIMESTEP_GRID

    probed = run(tmp_path / "probed", image_folder, "--vae", vae_dir, "--max-steps", "5", "--probe-every", "2",
                 "--probe-samples", "6")  # images through a VAE: its posterior sample drawn off the training RNG
    plain = run(tmp_path / "plain", image_folder, "--vae", vae_dir, "--max-steps", "5")
    assert_same_weights(load_checkpoint(probed), load_checkpoint(plain))
    with open(os.path.join(probed, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r.get("kind") == "timestep"]
    assert sorted({r["step"] for r in rows}) == [2, 4, 5] and {r["t"] for r in rows} == set(TIMESTEP_GRID)
    assert all(r["num_samples"] == 6 and 0 < r["eps_rel_error"] < 2 for r in rows)
    with open(os.path.join(probed, "embeddings.jsonl")) as f:
        layers = {r["layer"] for r in map(json.loads, f) if r["kind"] == "norm_input"}
    assert layers == {"block.0.norm1", "block.0.norm2", "final.norm"}


def test_what_a_resume_may_change_is_marked_on_the_settings():
    """The 35 settings a resumed train.py run may change (extend it, move its data, tune the step, change what
    happens between steps); the model, data and recipe are the checkpoint's."""
    assert set(train.TrainConfig.names("resumable")) == {
        "max_steps", "epochs", "ckpt_every", "log_every", "sample_every", "sample_steps", "sample_images", "cfg_scale",
        "num_workers", "max_bad_images", "tensorboard", "compile", "grad_checkpointing", "precision", "lr",
        "weight_decay", "grad_clip", "ema_decay", "data_path", "latents_dir", "results_dir", "fid_every", "fid_ref",
        "fid_num_samples", "fid_cfg_scale", "fid_sampling_steps", "fid_features", "fid_batch_size",
        "inception_weights", "digits_classifier", "sample_sampler", "fid_sampler", "stop_loss_ratio", "probe_every",
        "probe_samples"}
    assert set(train.TrainConfig.names("runtime")) == {"resume", "device", "demo", "no_layernorm", "threads",
                                                       "dry_run"}
    config, *_ = resolve(train.SPEC, ["--data-path", "d", "--lr", "1e-3"])
    assert "dry_run" not in config.saved() and config.saved()["lr"] == 1e-3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0


def test_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, image_folder, monkeypatch):
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half a file, then the "crash"
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        run(tmp_path, image_folder, "--vae", "none", "--max-steps", "4", "--ckpt-every", "2")
    monkeypatch.setattr(torch, "save", real_save)
    checkpoints = os.path.join(only_run(tmp_path), "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["0000002.pt", "latest.pt"]  # no partial or temp files
    assert load_checkpoint(only_run(tmp_path))["step"] == 2


def start_and_signal(cmd, results_dir, sig, whole_group=True, wait_for="| loss"):
    """Start `cmd` in its own process group, wait until its log shows a training step, send `sig` to the
    group (as SLURM and `timeout` do) or to the process alone; returns (exit code, output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            logs = [os.path.join(results_dir, r, "log.txt") for r in os.listdir(results_dir)] \
                if os.path.isdir(results_dir) else []
            if any(os.path.exists(log) and wait_for in open(log).read() for log in logs):
                break
            time.sleep(0.2)
        if whole_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        output, _ = proc.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_resumes_exactly(tmp_path, image_folder):
    """SLURM's pre-emption: SIGTERM to every process of the job, the two DataLoader workers included. The
    workers ignore it, the main process saves at the next step and exits 75; resuming to step N then gives
    bitwise the weights of an uninterrupted N-step run."""
    flags = [*TINY, "--data-path", image_folder, "--vae", "none", "--num-workers", "2"]
    cut_dir = tmp_path / "cut"
    cmd = [sys.executable, "train.py", *flags, "--results-dir", str(cut_dir), "--max-steps", "1000000",
           "--ckpt-every", "1000000", "--log-every", "2"]
    code, output = start_and_signal(cmd, str(cut_dir), signal.SIGTERM)
    assert code == PREEMPTED_EXIT, output[-3000:]
    assert "SIGTERM received: saved a checkpoint" in output and "Traceback" not in output
    assert "killed by signal" not in output
    cut = only_run(cut_dir)
    stopped = load_checkpoint(cut)["step"]
    assert 2 <= stopped < 1000000
    target = stopped + 3
    train.main(["--resume", cut, "--max-steps", str(target), "--num-workers", "2"])
    full = train.main([*flags, "--results-dir", str(tmp_path / "full"), "--max-steps", str(target)])
    a, b = load_checkpoint(full), load_checkpoint(cut)
    assert a["step"] == b["step"] == target
    assert_same_weights(a, b)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_sigusr1_and_sigint_to_the_process_save_too(tmp_path, image_folder, sig):
    cmd = [sys.executable, "train.py", *TINY, "--data-path", image_folder, "--results-dir", str(tmp_path),
           "--vae", "none", "--max-steps", "1000000", "--ckpt-every", "1000000", "--log-every", "2",
           "--num-workers", "1"]
    code, output = start_and_signal(cmd, str(tmp_path), sig, whole_group=False)
    assert code == PREEMPTED_EXIT, output[-3000:]
    assert f"{signal.Signals(sig).name} received" in output and "Traceback" not in output
    assert load_checkpoint(only_run(tmp_path))["step"] >= 2


def test_sigterm_to_torchrun_group_saves_on_every_rank(tmp_path, image_folder):
    """Two gloo ranks, each with a loader worker, SIGTERM to the whole group (torchrun included): both
    ranks stop at the same step (the flag is all-reduced every 10 steps), rank 0 saves, and the ranks exit
    75 (torchrun itself reports the signal with its own traceback and exit code 1: its behaviour, not ours)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537", "train.py",
           *TINY, "--data-path", image_folder, "--results-dir", str(tmp_path), "--vae", "none",
           "--max-steps", "1000000", "--ckpt-every", "1000000", "--log-every", "10", "--num-workers", "1"]
    code, output = start_and_signal(cmd, str(tmp_path), signal.SIGTERM)
    assert code != 0 and "SIGTERM received: saved a checkpoint" in output, output[-3000:]
    assert "killed by signal" not in output and "Traceback" not in output.split("SIGTERM received")[0]
    assert f"exiting with code {PREEMPTED_EXIT}" in output
    ckpt = load_checkpoint(only_run(tmp_path))
    assert ckpt["step"] % 10 == 0 and ckpt["step"] >= 10 and ckpt["world_size"] == 2


def test_resume_auto_starts_then_continues_the_same_settings(tmp_path, image_folder):
    flags = [*TINY, "--data-path", image_folder, "--results-dir", str(tmp_path), "--vae", "none", "--resume", "auto"]
    first = run_with(flags, "--max-steps", "2")
    assert load_checkpoint(first)["step"] == 2
    assert run_with(flags, "--max-steps", "4") == first  # the requeued line continues it
    assert load_checkpoint(first)["step"] == 4
    assert json.load(open(os.path.join(first, "config.json")))["max_steps"] == 4  # rewritten when extended
    other = run_with(flags, "--max-steps", "2", "--global-seed", "1")  # other settings: a new run
    assert other != first and load_checkpoint(other)["step"] == 2


def run_with(flags, *extra):
    return train.main([*flags, *extra])


def test_nan_loss_before_any_checkpoint_says_so(tmp_path, image_folder, capsys):
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, image_folder, "--vae", "none", "--lr", "1e30", "--max-steps", "10", "--ckpt-every", "100")
    assert stop.value.code == DIVERGED_EXIT and "No checkpoint was written before it" in capsys.readouterr().err


def test_resume_removes_stale_temp_checkpoints_and_refuses_a_foreign_one(tmp_path, image_folder):
    run_dir = run(tmp_path / "a", image_folder, "--vae", "none", "--max-steps", "2")
    stale = os.path.join(run_dir, "checkpoints", ".tmp-0000004.ptk2j3h4")  # a writer killed by kill -9
    open(stale, "wb").write(b"partial")
    train.main(["--resume", run_dir, "--max-steps", "3"])
    assert not os.path.exists(stale) and "removed" in open(os.path.join(run_dir, "log.txt")).read()
    other = run(tmp_path / "b", image_folder, "--vae", "none", "--max-steps", "2", "--hidden-size", "64")
    foreign = os.path.join(run_dir, "checkpoints", "0000009.pt")
    shutil.copyfile(os.path.join(other, "checkpoints", "0000002.pt"), foreign)
    with pytest.raises(SystemExit, match="does not belong to the run .* hidden_size 64 \\(run: 32\\)"):
        train.main(["--resume", foreign])


def test_no_data_names_the_demo(tmp_path):
    with pytest.raises(SystemExit, match="--demo for the built-in digits demo"):
        train.main(["--max-steps", "20", "--results-dir", str(tmp_path), "--vae", "none"])


def test_stop_flag_catches_a_real_signal_and_restores_the_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with StopFlag() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert stop and stop.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_loader_workers_ignore_the_stop_signals():
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_worker_that_ignores_then_sleeps)
    proc.start()
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(2.0)
    assert proc.is_alive()  # ignored: a worker is shut down by its main process, not by the signal
    proc.kill()
    proc.join()


def _worker_that_ignores_then_sleeps():
    ignore_stop_signals(0)
    time.sleep(30)


def test_extract_latents_stop_signal_keeps_whole_shards_then_finishes_identically(tmp_path, image_folder, vae_dir,
                                                                                 monkeypatch, capsys):
    """A stop signal ends extraction between two batches with exit 75, keeping only whole shards; the
    same command then finishes, with the shards of an uninterrupted extraction."""
    common = ["--data-path", image_folder, "--image-size", "16", "--vae", vae_dir, "--shard-size", "5",
              "--batch-size", "2", "--num-workers", "1", "--num-classes", "4"]
    extract_latents.main([*common, "--latents-dir", str(tmp_path / "straight")])
    monkeypatch.setattr(extract_latents, "StopFlag", lambda: StopAfter(5))
    with pytest.raises(SystemExit) as stop:
        extract_latents.main([*common, "--latents-dir", str(tmp_path / "cut")])
    assert stop.value.code == PREEMPTED_EXIT and "SIGTERM received" in capsys.readouterr().out
    # 3 batch checks + 1 after saving shard 0, then the stop comes in shard 1's first batch
    assert sorted(f for f in os.listdir(tmp_path / "cut") if f.startswith("shard")) == ["shard-00000.pt"]
    assert not os.path.exists(tmp_path / "cut" / "index.json")
    monkeypatch.undo()
    extract_latents.main([*common, "--latents-dir", str(tmp_path / "cut")])
    for name in ("shard-00000.pt", "shard-00001.pt", "shard-00002.pt"):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "cut" / name, weights_only=True)
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["labels"], b["labels"])


@pytest.fixture
def folder_with_bad_image(tmp_path, image_folder):
    """The image folder plus a truncated PNG (the first half of a valid file) in class0."""
    root = tmp_path / "bad-data"
    shutil.copytree(image_folder, root)
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(buf, format="PNG")
    (root / "class0" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return str(root), str(root / "class0" / "truncated.png")


def test_truncated_image_is_logged_once_skipped_and_resume_stays_exact(tmp_path, folder_with_bad_image,
                                                                       monkeypatch):
    """13 images with one truncated: every epoch draws it, it is logged once (path and reason), replaced by
    the next readable image, and a run stopped at step 3 and resumed to 8 equals an uninterrupted run."""
    root, bad = folder_with_bad_image
    flags = [*TINY, "--data-path", root, "--vae", "none", "--num-workers", "2", "--global-batch-size", "2"]
    full = train.main([*flags, "--results-dir", str(tmp_path / "full"), "--max-steps", "14"])  # two epochs
    log = open(os.path.join(full, "log.txt")).read()
    assert log.count("unreadable image skipped") == 1 and bad in log and "OSError" in log
    # the report file lists it once too, not once per epoch
    assert open(os.path.join(full, "bad_images.txt")).read().count(bad) == 1
    real = Trainer._stop_everywhere
    monkeypatch.setattr(Trainer, "_stop_everywhere", lambda self: self.step == 3 or real(self))
    with pytest.raises(SystemExit):
        train.main([*flags, "--results-dir", str(tmp_path / "cut"), "--max-steps", "14"])
    monkeypatch.setattr(Trainer, "_stop_everywhere", real)
    cut = only_run(tmp_path / "cut")
    train.main(["--resume", cut, "--num-workers", "2"])
    assert_same_weights(load_checkpoint(full), load_checkpoint(cut))


def test_too_many_unreadable_images_stop_with_the_flag_named(tmp_path, folder_with_bad_image):
    root, bad = folder_with_bad_image
    with pytest.raises(SystemExit, match="more than --max-bad-images 0") as stop:
        train.main([*TINY, "--data-path", root, "--vae", "none", "--results-dir", str(tmp_path / "runs"),
                    "--max-steps", "14", "--global-batch-size", "2", "--max-bad-images", "0"])
    assert "bad_images.txt" in str(stop.value)
    log = open(os.path.join(only_run(tmp_path / "runs"), "log.txt")).read()
    assert "run stopped: 1 unreadable image, more than --max-bad-images 0" in log


def test_extract_latents_skips_a_truncated_image(tmp_path, folder_with_bad_image, vae_dir, capsys):
    root, bad = folder_with_bad_image
    extract_latents.main(["--data-path", root, "--image-size", "16", "--vae", vae_dir, "--shard-size", "5",
                          "--batch-size", "2", "--num-workers", "1", "--num-classes", "4",
                          "--latents-dir", str(tmp_path / "latents")])
    out = capsys.readouterr().out
    assert out.count("unreadable image skipped") == 1 and bad in out
    assert json.load(open(tmp_path / "latents" / "index.json"))["num_images"] == NUM_IMAGES + 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, image_folder, capsys):
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, image_folder, "--vae", "none", "--lr", "1e30", "--max-steps", "10", "--ckpt-every", "1")
    (message,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == DIVERGED_EXIT  # a sweep tells a diverged run from a crash by its exit code
    bad_step = int(message.split(" and ")[1].split(";")[0])
    assert "loss became" in message and f"last good checkpoint (step {bad_step - 1}) is untouched" in message
    ckpt = load_checkpoint(only_run(tmp_path))
    assert ckpt["step"] == bad_step - 1
    assert "run stopped: loss became" in open(os.path.join(only_run(tmp_path), "log.txt")).read()
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert f"{bad_step:07d}.pt" not in os.listdir(os.path.join(only_run(tmp_path), "checkpoints"))


def test_a_finite_loss_spike_stops_as_diverged_with_stop_loss_ratio_also_after_a_resume(tmp_path):
    """--stop-loss-ratio R: a logged mean loss above R times the lowest logged so far stops the run with
    DIVERGED_EXIT before the spiking step's checkpoint; the comparison includes the history a resumed run
    brings from its checkpoint; off by default; a rise under R trains on."""
    losses = iter([1.0, 1.0, 0.2, 0.3, 0.2, 0.3, 0.39, 0.5, 2.5, 2.5])  # per step; logged every 2 steps

    def scripted(trainer):
        def step(x, y):
            trainer.step += 1
            return torch.tensor(next(losses)), torch.tensor(0.1)
        return step

    batches = iter(lambda: (torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long)), None)
    trainer = toy_trainer()
    trainer.run_dir, trainer.stop_loss_ratio, trainer.train_step = str(tmp_path), 2.0, scripted(trainer)
    (tmp_path / "checkpoints").mkdir()
    assert trainer.fit(batches, 6, log_every=2, ckpt_every=2)  # means 1.0, 0.25, 0.25: no spike
    assert [v for _, v in trainer.loss_history] == [1.0, 0.25, 0.25]
    resumed = toy_trainer()
    resumed.load(load_checkpoint(str(tmp_path / "checkpoints" / "latest.pt")))
    resumed.run_dir, resumed.stop_loss_ratio, resumed.train_step = str(tmp_path), 2.0, scripted(resumed)
    with pytest.raises(Diverged) as stop:  # steps 7-8: mean 0.445 < 2 x 0.25 trains on; 9-10: 2.5 / 0.25 = 10x
        resumed.fit(batches, 12, log_every=2, ckpt_every=2)
    assert stop.value.exit_code == DIVERGED_EXIT and resumed.step == 10
    message = str(stop.value)
    assert "loss became 2.5 between steps 8 and 10, 10x its lowest logged value 0.25" in message
    assert "last good checkpoint (step 8) is untouched" in message
    assert "0000010.pt" not in os.listdir(tmp_path / "checkpoints")
    # off (the default): the same spike is logged and trained through
    losses = iter([1.0, 1.0, 0.2, 0.2, 5.0, 5.0])
    quiet = toy_trainer()
    quiet.run_dir, quiet.train_step = str(tmp_path / "quiet"), scripted(quiet)
    (tmp_path / "quiet" / "checkpoints").mkdir(parents=True)
    assert quiet.fit(batches, 6, log_every=2) and quiet.loss_history[-1] == [6, 5.0]


#################################################################################
#                              Errors for bad input                             #
#################################################################################


@pytest.mark.parametrize("extra, message", [
    (["--vae", "none", "--image-size", "15"], "--image-size 15 is not a multiple of the patch size 2"),
    (["--num-classes", "2", "--vae", "none"], "has 3 classes but --num-classes is 2"),
    (["--vae", "none", "--global-batch-size", "64"], "fewer than one global batch of 64"),
    (["--vae", "/no/such/vae"], "is not a directory"),
    (["--vae", "none", "--fid-every", "2"], "--fid-every needs --fid-ref"),
    (["--vae", "none", "--fid-every", "2", "--fid-ref", "/no/such/ref.npz"], "--fid-ref /no/such/ref.npz: no such file"),
])
def test_bad_input_is_a_clear_error(tmp_path, image_folder, extra, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, image_folder, *extra)


def test_image_size_must_divide_by_vae_factor_times_patch(tmp_path, image_folder, vae_dir):
    with pytest.raises(SystemExit, match=r"--image-size 18 is not a multiple of 4 \(VAE downsampling 2 x patch size 2"):
        run(tmp_path, image_folder, "--vae", vae_dir, "--image-size", "18")


def test_batch_not_divisible_by_world_size(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # the check comes before the process group is joined
    with pytest.raises(SystemExit, match="--global-batch-size 5 is not divisible by the world size 2"):
        run(tmp_path, image_folder, "--vae", "none", "--global-batch-size", "5")


def test_missing_data_path_is_a_message_not_a_traceback(tmp_path):
    cmd = [sys.executable, "train.py", *TINY, "--vae", "none", "--data-path", str(tmp_path / "nope"),
           "--results-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--data-path" in out.stderr and "no such directory" in out.stderr and "Traceback" not in out.stderr


#################################################################################
#                                 Demo and GPU                                  #
#################################################################################


def test_digits_demo_runs(tmp_path, digits_classifier):
    digits = str(tmp_path / "digits")
    run_dir = train.main(["--demo", "--data-path", digits, "--results-dir", str(tmp_path / "runs"), "--max-steps", "2",
                          "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--sample-steps", "2",
                          "--sample-images", "10", "--num-workers", "0",
                          # FD-digits against the folder the demo is about to write (a fresh machine has none yet)
                          "--fid-every", "2", "--fid-ref", digits, "--fid-features", "digits", "--fid-num-samples", "10",
                          "--fid-sampling-steps", "2", "--digits-classifier", digits_classifier])
    assert sorted(os.listdir(digits)) == [str(i) for i in range(10)]
    assert '"fd_digits"' in open(os.path.join(run_dir, "metrics.jsonl")).read()
    assert sum(len(os.listdir(os.path.join(digits, c))) for c in os.listdir(digits)) == 1797
    config = load_checkpoint(run_dir)["config"]
    assert (config["vae"], config["in_channels"], config["num_classes"]) == ("none", 3, 10)
    assert os.listdir(os.path.join(run_dir, "samples")) == ["0000002.png"]
    # a resume that changes only --fid-every keeps the run's --fid-ref (it was refused as missing)
    train.main(["--resume", run_dir, "--max-steps", "3", "--fid-every", "3", "--sample-every", "0"])
    steps = [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert steps == [2, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_compile_grad_checkpointing(tmp_path, image_folder):
    run_dir = run(tmp_path, image_folder, "--vae", "none", "--max-steps", "3", "--precision", "bf16", "--compile",
                  "--grad-checkpointing", "--device", "cuda", "--sample-every", "3", "--sample-steps", "2")
    ckpt = load_checkpoint(run_dir)
    assert ckpt["step"] == 3 and "peak mem" in open(os.path.join(run_dir, "log.txt")).read()


def test_thread_count_defaults(monkeypatch):
    """--threads wins, then OMP_NUM_THREADS, then one thread for a small model, else torch's default."""
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        default = configure_threads(None, 10**9)
        assert default == "torch CPU threads: 2 (torch's default; --threads to change)"
        assert configure_threads(None, 10**6).startswith("torch CPU threads: 1 (a model of 1M parameters")
        assert torch.get_num_threads() == 1
        assert configure_threads(2, 10**6).startswith("torch CPU threads: 2 (--threads")
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert configure_threads(None, 10**6) == "torch CPU threads: 2 (OMP_NUM_THREADS)"
    finally:
        torch.set_num_threads(before)


def test_resumed_small_run_logs_one_thread(tmp_path, image_folder, monkeypatch):
    """The count is chosen from the model, so a resumed run gets it too (it used to on a fresh demo only)."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        run_dir = run(tmp_path, image_folder, "--vae", "none", "--max-steps", "2")
        torch.set_num_threads(2)
        train.main(["--resume", run_dir, "--max-steps", "3"])
        log = open(os.path.join(run_dir, "log.txt")).read()
        assert log.count("torch CPU threads: 1 (a model of") == 2
    finally:
        torch.set_num_threads(before)


def _claim_run_dir(args):
    results_dir, name = args
    return new_run_dir(results_dir, "DiT-S/2", name)


def test_parallel_new_run_dir_calls_get_distinct_directories_and_indices(tmp_path):
    """Eight processes claim a run directory at the same moment (same or different names): every one gets
    its own directory and its own index (the index is claimed with an exclusive create)."""
    names = ["layer-norm", "none"] * 4
    with multiprocessing.get_context("fork").Pool(8) as pool:
        dirs = pool.map(_claim_run_dir, [(str(tmp_path), n) for n in names])
    assert len(set(dirs)) == 8 and all(os.path.isdir(os.path.join(d, "checkpoints")) for d in dirs)
    assert sorted(int(os.path.basename(d)[:3]) for d in dirs) == list(range(8))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".claim")]
    assert os.path.basename(new_run_dir(str(tmp_path), "DiT-S/2", "none")).startswith("008-")


def test_truncate_jsonl_drops_rows_newer_than_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"kind": "fid", "step": s, "fid": 1.0 / s}) + "\n" for s in (2, 4, 6, 8)))
    truncate_jsonl([str(path), str(tmp_path / "missing.jsonl")], 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    assert not (tmp_path / "missing.jsonl").exists()


def toy_trainer(compile=None, device="cpu"):
    """A Trainer around a one-block toy DiT (learned variance, so the loss has its VB term) on `device`."""
    import logging

    from diffusion import create_diffusion
    from models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=2, patch_size=1, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=1)
    return Trainer(model, create_diffusion(timestep_respacing=""),
                               dist_info=DistInfo(0, 1, 0, torch.device(device)), run_dir=None,
                               logger=logging.getLogger("test"), config={}, lr=1e-3, ema_decay=0.9, compile=compile)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, GPU])])
def test_compiled_training_steps_track_the_eager_ones(device):
    """--compile reduce-overhead (inductor on the CPU; CUDA graphs only on a GPU): the same losses and,
    after 3 AdamW steps, the same weights as eager up to float32 reordering. (fallback_random: the label
    dropout inside the model draws from torch's RNG as in eager, not from inductor's own generator.)"""
    torch._dynamo.reset()
    eager, compiled = toy_trainer(device=device), toy_trainer("reduce-overhead", device)
    assert compiled.model is not compiled.raw and eager.model is eager.raw
    x, y = torch.randn(16, 3, 2, 2, device=device), torch.zeros(16, dtype=torch.long, device=device)
    losses = {}
    for name, trainer in (("eager", eager), ("compiled", compiled)):
        torch.manual_seed(1)
        with torch._inductor.config.patch(fallback_random=True):
            losses[name] = torch.stack([trainer.train_step(x, y)[0] for _ in range(3)])
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-6)
    for a, b in zip(compiled.raw.parameters(), eager.raw.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(eager.raw.x_embedder.proj.weight.cpu(), toy_trainer().raw.x_embedder.proj.weight)  # trained


@pytest.mark.gpu
@GPU
def test_cuda_graph_training_step_makes_no_host_syncs():
    """The toy's GPU path (--compile reduce-overhead): once the graphs are recorded, a step never waits
    for the GPU (a host sync would stall every replay)."""
    torch._dynamo.reset()
    trainer = toy_trainer("reduce-overhead", "cuda")
    x, y = torch.zeros(64, 3, 2, 2, device="cuda"), torch.zeros(64, dtype=torch.long, device="cuda")
    for _ in range(4):  # compile, warm up, record
        trainer.train_step(x, y)
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [trainer.train_step(x, y)[0] for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(losses)).all()


def test_compile_flag_takes_an_optional_mode(tmp_path):
    """Bare --compile is torch.compile's default mode; a mode may follow; a typo names the choices; run
    configs of the old boolean flag still load."""
    assert train.parse_args(["--compile"])[0].compile == "default"
    assert train.parse_args(["--compile", "reduce-overhead", "--lr", "1e-3"])[0].compile == "reduce-overhead"
    assert train.parse_args(["--lr", "1e-3"])[0].compile is None
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        train.parse_args(["--compile", "fast"])
    assert "reduce-overhead" in err.getvalue()
    assert [compile_mode(v) for v in (True, False, None)] == ["default", None, None]
    with pytest.raises(UsageError, match="choose one of default, reduce-overhead"):
        compile_mode("fast")


def test_compile_none_logs_no_compiling(tmp_path, image_folder):
    """--compile none is eager: the Trainer compiles nothing and the log does not say "compiled"."""
    run_dir = run(tmp_path, image_folder, "--vae", "none", "--max-steps", "1", "--compile", "none")
    assert "compiled" not in open(os.path.join(run_dir, "log.txt")).read()
    assert compile_mode(json.load(open(os.path.join(run_dir, "config.json")))["compile"]) is None


#################################################################################
#                      Failures exit, whatever the workers do                   #
#################################################################################


def limited_run(cmd, limit_bytes, timeout=120):
    """Run cmd with a file-size limit (as `ulimit -f`): writes past it fail (Python ignores SIGXFSZ), as on a
    full disk. Returns the CompletedProcess; a hang is a TimeoutExpired, i.e. a failed test."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


def test_a_failed_save_with_two_loader_workers_exits_in_seconds(tmp_path, image_folder):
    """An exception (here the checkpoint write failing on a 'full disk') with --num-workers 2
    ends the process with a non-zero code within seconds, its reason as the last line of log.txt; it used
    to wait forever for the persistent workers, which ignore SIGTERM."""
    cmd = [sys.executable, "train.py", *TINY, "--num-workers", "2", "--data-path", image_folder, "--vae", "none",
           "--max-steps", "4", "--ckpt-every", "2", "--results-dir", str(tmp_path), "--threads", "1"]
    start = time.time()
    out = limited_run(cmd, 64_000)
    assert out.returncode == 1 and time.time() - start < 60, out.stderr[-2000:]
    last = open(os.path.join(only_run(str(tmp_path)), "log.txt")).read().strip().splitlines()[-1]
    assert "run failed" in last


def test_extract_latents_failure_with_workers_exits(tmp_path, image_folder, vae_dir):
    """The same for extract_latents.py: a shard that cannot be written ends the command, workers and all."""
    cmd = [sys.executable, "extract_latents.py", "--data-path", image_folder, "--image-size", "16", "--vae", vae_dir,
           "--shard-size", "5", "--batch-size", "2", "--num-workers", "2", "--num-classes", "4", "--latents-dir",
           str(tmp_path / "latents")]
    start = time.time()
    out = limited_run(cmd, 2_000)
    assert out.returncode != 0 and time.time() - start < 60, out.stderr[-2000:]


def test_threads_above_the_core_count_and_a_mistyped_demo_data_path_are_refused(tmp_path):
    """--threads beyond the cores (5 toy steps took 60 s at 1000) and --demo --data-path TYPO
    (which used to write the digits into TYPO) stop at once with what to do."""
    with pytest.raises(UsageError, match="--threads 100000 is more than the"):
        configure_threads(100000)
    typo = tmp_path / "digts"
    with pytest.raises(SystemExit, match="no such folder; the demo writes its digits only into a folder named"):
        train.main(["--demo", "--data-path", str(typo), "--results-dir", str(tmp_path / "runs"), "--max-steps", "1"])
    assert not typo.exists()


def test_heads_that_do_not_divide_the_width_leave_no_run_behind(tmp_path, image_folder):
    with pytest.raises(SystemExit, match="hidden size 32 must be divisible by the number of heads 3"):
        run(tmp_path, image_folder, "--vae", "none", "--num-heads", "3", "--max-steps", "1")
    assert not os.path.exists(tmp_path / "000-DiT-S-2-layer-norm")


def test_intervals_longer_than_the_run_are_warned_about_and_still_fire_at_its_last_step(tmp_path, image_folder,
                                                                                        capsys):
    """A typed --fid-every, --sample-every or --ckpt-every longer than --max-steps used to be accepted in
    silence: each fires only at the last step. One warning line each, on --dry-run too and in log.txt; not
    an error, since the run keeps that one grid, FID and checkpoint."""
    flags = ["--vae", "none", "--max-steps", "2", "--sample-every", "5", "--sample-steps", "2", "--sample-images", "2",
             "--ckpt-every", "3"]
    capsys.readouterr()
    train.main([*TINY, "--data-path", image_folder, *flags, "--fid-every", "4", "--fid-ref", image_folder,
                "--dry-run"])
    assert capsys.readouterr().err.splitlines() == [
        "warning: --ckpt-every 3 is longer than the run (--max-steps 2): a checkpoint is written only at its last step",
        "warning: --fid-every 4 is longer than the run (--max-steps 2): the FID is computed only at its last step",
        "warning: --sample-every 5 is longer than the run (--max-steps 2): a sample grid is drawn only at its last "
        "step"]
    run_dir = run(tmp_path, image_folder, *flags)
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "warning: --sample-every 5 is longer than the run" in log and "--ckpt-every 3 is longer" in log
    assert os.listdir(os.path.join(run_dir, "samples")) == ["0000002.png"]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["0000002.pt", "latest.pt"]
    capsys.readouterr()
    run(tmp_path / "quiet", image_folder, "--vae", "none", "--max-steps", "1")  # default intervals: no warning
    assert "warning" not in capsys.readouterr().err


def test_a_truncated_latest_checkpoint_resumes_from_the_previous_one_with_its_data_position(tmp_path, image_folder):
    """train.py's resume falls back like the toy's (tests/test_run.py): past a cut latest.pt (and the numbered
    file it links) to the step before, data position included, exactly as a resume from that file does."""
    run_dir = run(tmp_path / "a", image_folder, "--vae", "none", "--max-steps", "4", "--ckpt-every", "1")
    copy = str(tmp_path / "b" / os.path.basename(run_dir))
    shutil.copytree(run_dir, copy)
    for name in ("latest.pt", "0000004.pt"):
        path = os.path.join(run_dir, "checkpoints", name)
        os.truncate(path, os.path.getsize(path) // 2)
    assert train.main(["--resume", run_dir]) == run_dir
    assert "resuming from" in open(os.path.join(run_dir, "log.txt")).read()
    assert train.main(["--resume", os.path.join(copy, "checkpoints", "0000003.pt")]) == copy
    a, b = load_checkpoint(run_dir), load_checkpoint(copy)
    assert a["step"] == b["step"] == 4 and (a["epoch"], a["position"]) == (b["epoch"], b["position"])
    assert_same_weights(a, b, keys=("model", "ema"))
