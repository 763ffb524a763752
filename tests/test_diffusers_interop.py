"""Tests for ditlab/diffusers_interop.py and export_diffusers.py: the round trip ours -> diffusers -> ours, DiTPipeline
running an export (and matching our DPM-Solver++ sampler), the Hub layout, hf:REPO, and the errors. Tiny
models and a tiny local AutoencoderKL, no network."""

import fnmatch
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from test_sample import TINY, one_thread, random_model, same_weights  # noqa: F401 (one_thread: autouse fixture)

import export_diffusers
import sample
import sample_ddp
from diffusion import create_diffusion
from ditlab import checkpoints, diffusers_interop, sampling
from ditlab.analysis import load_for_analysis
from ditlab.errors import CheckpointError, InputError, UsageError


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL with 2x downsampling and 4 latent channels, saved to a folder."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    path = str(tmp_path_factory.mktemp("vae") / "vae")
    vae.save_pretrained(path)
    return path


def latent_checkpoint(tmp_path, vae_dir, name="ckpt.pt", **changes):
    """A training checkpoint of a tiny latent DiT (8x8x4 latents of 16 px images); raw and EMA differ."""
    config = {**TINY, "in_channels": 4, "input_size": 8, "image_size": 16, "vae": vae_dir, "latent_scale": 0.5,
              "normalization": "layer-norm", **changes}
    raw, ema = random_model(config, 0), random_model(config, 1)
    path = str(tmp_path / name)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "step": 7, "config": config}, path)
    return path, config, raw, ema


def export(tmp_path, ckpt, *extra, out="export"):
    return export_diffusers.main(["--ckpt", ckpt, "--out", str(tmp_path / out), *extra])


@pytest.mark.parametrize("class_dropout_prob", [0.1, 0.0])
def test_round_trip_is_bitwise(tmp_path, vae_dir, class_dropout_prob, capsys):
    path, config, raw, ema = latent_checkpoint(tmp_path, vae_dir, class_dropout_prob=class_dropout_prob)
    folder = export(tmp_path, path)
    diffs = dict(re.findall(r"exported vs ours \((.*?) \(.*?max \|diff\| (\S+) ", capsys.readouterr().err))
    assert float(diffs["make_exact"]) < 1e-6 < float(diffs["as exported"]) <= float(diffs["diffusers defaults"])
    assert set(os.listdir(folder)) >= {"transformer", "scheduler", "vae", "model_index.json", "dit_config.json"}
    model, loaded = checkpoints.load_model(folder)
    assert same_weights(model, ema) and model.state_dict().keys() == ema.state_dict().keys()
    assert {k: loaded[k] for k in config if k != "vae"} == {k: config[k] for k in config if k != "vae"}
    assert loaded["vae"] == os.path.join(os.path.abspath(folder), "vae")
    # The per-block copies of the embedders are stored as diffusers expects.
    from safetensors.torch import load_file

    sd = load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
    table = sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
    assert len(table) == 11  # 10 classes + the null row (a zero row when the model had none)
    assert torch.equal(sd["transformer_blocks.0.attn1.to_k.weight"], ema.blocks[0].attn.qkv.weight[32:64])
    # Raw weights: exported on request, and the folder then refuses to pass them off as EMA.
    raw_folder = export(tmp_path, path, "--weights", "raw", "--no-check", out="raw")
    assert same_weights(checkpoints.load_model(raw_folder, weights="raw")[0], raw)
    with pytest.raises(UsageError, match="holds the raw weights only"):
        checkpoints.load_model(raw_folder)


def test_exported_pipeline_runs_and_matches_our_sampler(tmp_path, vae_dir):
    """DiTPipeline.from_pretrained(DIR) runs the export; after make_exact it draws what our dpm-solver++
    sampler draws from the same noise (the pipeline guides with class 1000: a 1000-class model)."""
    from diffusers import DiTPipeline

    images = tmp_path / "images"  # the run's image folder: its class folders become id2label
    for name in ("cat", "dog, puppy"):
        (images / name).mkdir(parents=True)
    path, config, _, ema = latent_checkpoint(tmp_path, vae_dir, num_classes=1000, data_path=str(images))
    pipe = DiTPipeline.from_pretrained(export(tmp_path, path, "--no-check"))
    assert pipe.labels == {"cat": 0, "dog": 1, "puppy": 1}
    pipe.set_progress_bar_config(disable=True)
    labels, steps = [3, 999], 6
    plain = pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    diffusers_interop.make_exact(pipe.transformer)
    exact = pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sampling.denoise(ema, create_diffusion(str(steps)), noise, torch.tensor(labels), "dpm-solver++", 4.0)
    ours = (sampling.decode(pipe.vae, ours, 0.5) / 2 + 0.5).clamp(0, 1)
    assert exact.shape == (2, 3, 16, 16)
    torch.testing.assert_close(exact, ours, rtol=0, atol=1e-5)
    assert (plain - ours).abs().max() > 1e-5  # diffusers' own timestep embedding differs


def hub_layout(folder):
    """Rewrite an export the way the Hub stores facebook/DiT-XL-2-256: a Transformer2DModel config
    without norm_eps, .bin weights, no dit_config.json."""
    from safetensors.torch import load_file

    tdir = os.path.join(folder, "transformer")
    config = json.load(open(os.path.join(tdir, "config.json")))
    config["_class_name"] = "Transformer2DModel"
    config.pop("norm_eps")
    json.dump(config, open(os.path.join(tdir, "config.json"), "w"))
    weights = os.path.join(tdir, "diffusion_pytorch_model.safetensors")
    torch.save(load_file(weights), os.path.join(tdir, "diffusion_pytorch_model.bin"))
    os.unlink(weights)
    os.unlink(os.path.join(folder, "dit_config.json"))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    index["transformer"] = ["diffusers", "Transformer2DModel"]
    json.dump(index, open(os.path.join(folder, "model_index.json"), "w"))
    return folder


def test_hub_layout_and_hf_prefix(tmp_path, vae_dir, monkeypatch):
    path, config, _, ema = latent_checkpoint(tmp_path, vae_dir)
    folder = hub_layout(export(tmp_path, path, "--no-check"))
    model, loaded = checkpoints.load_model(folder)
    assert same_weights(model, ema)
    assert loaded["model"] == "DiT-XL/2" and loaded["image_size"] == 16 and loaded["latent_scale"] == 0.5  # patch 2
    assert loaded["depth"] == 1 and loaded["hidden_size"] == 32 and loaded["num_classes"] == 10
    # hf:REPO goes through huggingface_hub.snapshot_download, faked without network: it copies the files of
    # `folder` that match allow_patterns (as the Hub would), so the safetensors-only call finds no weights.
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        snap = tmp_path / f"snapshot{len(calls)}"
        for root, _, files in os.walk(folder):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), folder)
                if any(fnmatch.fnmatch(rel, pattern) for pattern in allow_patterns):
                    os.makedirs(snap / os.path.dirname(rel), exist_ok=True)
                    shutil.copy(os.path.join(root, name), snap / rel)
        return str(snap)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    images = sample.main(["--ckpt", "hf:facebook/DiT-XL-2-256", "--num-sampling-steps", "3", "--class-labels", "1",
                          "--sampler", "unipc", "--out", str(tmp_path / "hub.png")])
    assert images.shape == (1, 3, 16, 16) and calls[0][0] == "facebook/DiT-XL-2-256"
    assert len(calls) == 2 and "transformer/diffusion_pytorch_model.bin" in calls[1][1]  # .bin only in this copy
    assert not any("fp16" in p or p.startswith("vae/") and p.endswith(".bin") for p in calls[1][1])
    # The other --ckpt users take folders too.
    assert same_weights(load_for_analysis(folder)[0], ema)
    npz = sample_ddp.main(["--ckpt", folder, "--num-fid-samples", "2", "--num-sampling-steps", "2", "--sample-dir",
                           str(tmp_path / "ddp"), "--sampler", "ddim"]) + ".npz"
    assert np.load(npz)["arr_0"].shape == (2, 16, 16, 3)


def test_bin_weights_are_never_unpickled(tmp_path, vae_dir):
    path, _, _, _ = latent_checkpoint(tmp_path, vae_dir)
    folder = hub_layout(export(tmp_path, path, "--no-check"))
    marker = tmp_path / "executed"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    weights = os.path.join(folder, "transformer", "diffusion_pytorch_model.bin")
    torch.save({"pos_embed.proj.weight": torch.zeros(1), "evil": RunsCode()}, weights)
    with pytest.raises(CheckpointError, match="refusing to load"):
        checkpoints.load_model(folder)
    assert not marker.exists()


def test_clear_errors(tmp_path, vae_dir, capsys):
    path, _, _, _ = latent_checkpoint(tmp_path, vae_dir, normalization="none")
    with pytest.raises(SystemExit, match="normalization='none'.*only layer-norm models can be exported"):
        export(tmp_path, path)
    pixel, _, _, _ = latent_checkpoint(tmp_path, vae_dir, name="pixel.pt", in_channels=3, image_size=8, vae="none")
    with pytest.raises(SystemExit, match="pixel-space model"):
        export(tmp_path, pixel)
    export_diffusers.main(["--ckpt", pixel, "--check-only"])  # measuring needs no VAE
    assert "make_exact (norm_eps 1e-6, freq shift 0)): max |diff|" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_diffusers.main(["--ckpt", pixel])  # neither --out nor --check-only
    assert "--out DIR is required" in capsys.readouterr().err
    # Folders that are not a DiT.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither a run directory .* nor a diffusers DiT folder"):
        checkpoints.load_model(str(empty))
    with pytest.raises(SystemExit, match="nor a diffusers DiT folder"):
        sample.main(["--ckpt", str(empty), "--out", str(tmp_path / "x.png")])
    with pytest.raises(CheckpointError, match="diffusers AutoencoderKL .*not a DiT"):
        checkpoints.load_model(vae_dir)
    sd_pipe = tmp_path / "sd"
    sd_pipe.mkdir()
    json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
              open(sd_pipe / "model_index.json", "w"))
    with pytest.raises(CheckpointError, match="StableDiffusionPipeline folder, not a DiT"):
        checkpoints.load_model(str(sd_pipe))


def test_different_per_block_embedders_are_refused(tmp_path, vae_dir):
    """diffusers keeps a copy of the timestep embedder in every block; ours has one, so copies that were
    changed independently (fine-tuned in diffusers) cannot be converted silently."""
    from safetensors.torch import load_file, save_file

    path, _, _, _ = latent_checkpoint(tmp_path, vae_dir, depth=2)
    folder = export(tmp_path, path, "--no-check")
    weights = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
    sd = load_file(weights)
    sd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1e-3
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match="different norm1.emb.timestep_embedder.linear_1.bias"):
        checkpoints.load_model(folder)


def test_failed_official_download_points_to_the_hub_copy(tmp_path, monkeypatch):
    def offline(url, f, chunk_size=0):
        raise OSError("network unreachable")

    monkeypatch.setattr(checkpoints, "PRETRAINED_DIR", str(tmp_path / "pretrained"))
    monkeypatch.setattr(checkpoints, "_copy_url", offline)
    with pytest.raises(InputError, match="--ckpt hf:facebook/DiT-XL-2-512"):
        checkpoints.find_model("DiT-XL-2-512x512.pt")


def test_hub_vae_that_cannot_be_loaded_is_named(tmp_path, vae_dir, monkeypatch, capsys):
    """Offline, a run with the Hub's sd-vae-ft-ema exports without a vae/ folder and says what to pass."""
    path, _, _, ema = latent_checkpoint(tmp_path, vae_dir, vae="ema")

    def offline(vae, device):
        raise InputError("could not load the VAE")

    monkeypatch.setattr(diffusers_interop, "load_vae", offline)
    folder = export(tmp_path, path, "--no-check")
    assert "vae=AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-ema')" in capsys.readouterr().err
    assert "vae" not in os.listdir(folder)
    model, config = checkpoints.load_model(folder)
    assert same_weights(model, ema) and config["vae"] == "ema"


def test_export_files_are_readable_by_others_and_an_unrelated_folder_is_refused(tmp_path, vae_dir):
    """Every exported file gets the umask's mode (0644 under 022, as open() gives), and
    --out into a non-empty folder that is not an export is refused before anything is written; an
    earlier export is overwritten."""
    path, _, _, _ = latent_checkpoint(tmp_path, vae_dir)
    old = os.umask(0o022)
    try:
        folder = export(tmp_path, path, "--no-check")
        modes = {os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_mode & 0o777
                 for d, _, files in os.walk(folder) for f in files}
        assert modes and set(modes.values()) == {0o644}, modes
        export(tmp_path, path, "--no-check")  # an export may be redone in place
    finally:
        os.umask(old)
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "paper.tex").write_text("x")
    with pytest.raises(SystemExit, match="not empty and not an export"):
        export(tmp_path, path, "--no-check", out="notes")
    assert os.listdir(unrelated) == ["paper.tex"]
