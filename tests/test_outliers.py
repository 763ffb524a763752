"""Tests for ditlab/outliers.py, analyze_embeddings.py and notebooks/TokenEmbeddingsViz.ipynb.

Statistics are checked against direct computations on small hand-made tensors; the capture against an
independent re-run of the model's own submodules; plots by decoding the PNGs; the command end to end on
two tiny checkpoints (LayerNorm and none) written in this repo's training-checkpoint format; the notebook
by executing it with nbclient (its first cell reads DIT_CKPT, DIT_DATA_PATH, DIT_TIMESTEPS, DIT_OUT).
"""

import gc
import json
import math
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import analyze_embeddings as ae
from diffusion import create_diffusion
from ditlab import analysis as A
from ditlab import outliers as O
from ditlab.data import center_crop_arr
from models import build_model_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model="DiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=3, num_classes=4,
            class_dropout_prob=0.1, learn_sigma=True, image_size=8, vae="none")


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

def tiny_model(normalization, seed=0, **overrides):
    """A tiny DiT with every weight random (adaLN-Zero would otherwise make the blocks identities)."""
    torch.manual_seed(seed)
    model = build_model_from_config({**TINY, "normalization": normalization, **overrides})
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.2)
    return model.eval()


def save_run(run_dir, normalization, seed=0, **overrides):
    """A checkpoint in this repo's format at <run_dir>/checkpoints/latest.pt (config TINY with
    `overrides`); returns its path."""
    sd = tiny_model(normalization, seed, **overrides).state_dict()
    path = os.path.join(run_dir, "checkpoints", "latest.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": sd, "ema": sd, "config": {**TINY, "normalization": normalization, **overrides}}, path)
    return path


def lower_median(values):
    """Lower median of a flat list, by sorting."""
    values = sorted(values)
    return values[(len(values) - 1) // 2]


def assert_png(path, min_bytes=3000):
    """The file exists, is not tiny and decodes as a non-empty PNG image."""
    assert os.path.getsize(path) > min_bytes, path
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        assert im.size[0] > 100 and im.size[1] > 100


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs (LayerNorm and none) and a folder of images in one folder per class."""
    base = tmp_path_factory.mktemp("runs")
    ln = save_run(str(base / "000-ln"), "layer-norm", seed=1)
    none = save_run(str(base / "001-none"), "none", seed=2)
    rng = np.random.default_rng(0)
    for c in range(TINY["num_classes"]):
        folder = base / "images" / f"n0{c}"
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (21, 13 + 7 * i, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return {"ln": ln, "none": none, "images": str(base / "images"), "base": base}


# ----------------------------------------------------------------------------------------------------
# Statistics against direct computation
# ----------------------------------------------------------------------------------------------------

def test_max_and_median_abs():
    x = torch.tensor([[1.0, -5.0, 2.0], [0.5, 3.0, -4.0]])
    assert O.max_abs(x) == 5.0
    assert O.median_abs(x) == 2.0  # |x| sorted: 0.5 1 2 3 4 5 -> lower median 2
    y = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(0))
    assert O.median_abs(y) == pytest.approx(lower_median(y.abs().flatten().tolist()))
    assert O.max_abs(y) == pytest.approx(max(y.abs().flatten().tolist()))


def test_max_median_ratio():
    # token 1: max 100, median 3 -> 33.33; token 2: max 2, median 2 -> 1
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0], [-2.0, 2.0, 2.0, 2.0, 2.0]])
    assert O.max_median_ratio(x) == pytest.approx((100 / 3 + 1) / 2)
    y = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    ratios = [max(map(abs, tok)) / lower_median(list(map(abs, tok))) for tok in y.reshape(-1, 6).tolist()]
    assert O.max_median_ratio(y) == pytest.approx(sum(ratios) / len(ratios))


def test_channel_rms_and_kurtosis():
    x = torch.tensor([[1.0, 1.0, 1.0, 4.0], [1.0, -1.0, 1.0, -4.0]])
    assert O.channel_rms(x).tolist() == pytest.approx([1.0, 1.0, 1.0, 4.0])
    # s = (1, 1, 1, 4): mean(s^4) = 259/4, mean(s^2)^2 = (19/4)^2
    assert O.rms_kurtosis(x) == pytest.approx((259 / 4) / (19 / 4) ** 2)
    assert O.rms_kurtosis(torch.ones(5, 8)) == pytest.approx(1.0)  # equal channels
    one_hot = torch.zeros(3, 4)
    one_hot[:, 2] = 7.0
    assert O.rms_kurtosis(one_hot) == pytest.approx(4.0)  # a single channel: D
    y = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2))
    tokens = y.reshape(-1, 3).tolist()
    s = [math.sqrt(sum(t[j] ** 2 for t in tokens) / len(tokens)) for j in range(3)]
    assert O.channel_rms(y).tolist() == pytest.approx(s, rel=1e-5)
    kurt = (sum(v ** 4 for v in s) / 3) / (sum(v ** 2 for v in s) / 3) ** 2
    assert O.rms_kurtosis(y) == pytest.approx(kurt, rel=1e-5)


def test_massive_activations():
    x = torch.full((10, 100), 0.05)  # median 0.05: the ratio threshold is 50
    x[0, 3] = 150.0  # > 100 and > 50: massive
    x[1, 3] = -200.0  # massive (magnitude)
    x[2, 7] = 90.0  # > 50 but not > 100
    x[4, 9] = 100.0  # not strictly above 100
    x[5, 1] = 120.0  # massive
    s = O.massive_summary(x)
    assert s == {"massive_count": 3, "massive_tokens": 3, "massive_channels": [3, 1]}
    y = torch.ones(4, 10)  # median 1: the ratio threshold is 1000
    y[0, 0] = 500.0  # > 100 but not > 1000x the median
    y[0, 5] = 2000.0  # massive
    y[1, 5] = -1500.0  # massive
    assert O.massive_mask(y).sum() == 2 and O.massive_mask(y)[0, 5] and not O.massive_mask(y)[0, 0]
    assert O.massive_summary(y) == {"massive_count": 2, "massive_tokens": 2, "massive_channels": [5]}


def test_top_channels_and_argmax_consistency():
    assert O.top_channels(torch.tensor([1.0, 5.0, 3.0, 5.5]), 2) == [[3, 5.5], [1, 5.0]]
    x = torch.tensor([[1.0, -9.0, 2.0], [7.0, 0.0, 1.0], [0.0, -1.0, 8.0], [3.0, -10.0, 1.0]])
    assert O.argmax_channels(x).tolist() == [1, 0, 2, 1]
    assert O.argmax_counts(x).tolist() == [1, 2, 1]
    assert O.dominant_channel(O.argmax_counts(x)) == (1, 0.5)


def test_summarize_channels_over_layers_and_timesteps():
    counts = {
        0: {"embed": [10, 0, 0], "block.0": [0, 8, 2], "block.1": [1, 7, 2], "final": [9, 0, 1]},
        1: {"embed": [10, 0, 0], "block.0": [5, 4, 1], "block.1": [0, 9, 1], "final": [9, 0, 1]},
    }
    s = O.summarize_channels({t: {n: np.array(c) for n, c in v.items()} for t, v in counts.items()})
    # blocks only: t=0 pooled (1, 15, 4); t=1 pooled (5, 13, 2), block.0's own argmax is channel 0
    assert s["per_timestep"]["0"] == pytest.approx({"channel": 1, "share": 15 / 20, "layers_agree": 1.0})
    assert s["per_timestep"]["1"] == pytest.approx({"channel": 1, "share": 13 / 20, "layers_agree": 0.5})
    assert s["overall"] == pytest.approx({"channel": 1, "share": 28 / 40, "layers_agree": 0.75})


def test_pooled_channel_rms_equals_rms_over_all_tokens():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 4, generator=g), 3 * torch.randn(2, 5, 4, generator=g)
    pooled = O.pooled_channel_rms({0: {"x": O.channel_rms(a).numpy()}, 1: {"x": O.channel_rms(b).numpy()}})
    assert pooled["x"] == pytest.approx(O.channel_rms(torch.cat([a, b])).numpy(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Capture against the model's own intermediate values
# ----------------------------------------------------------------------------------------------------

def recompute_embeddings(model, x, t, y):
    """The captured tensors, recomputed step by step from the model's submodules."""
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        out = {"embed": h}
        for i, block in enumerate(model.blocks):
            h = block(h, c)
            out[f"block.{i}"] = h
        out["final"] = model.final_layer(h, c)
    return out


@pytest.mark.parametrize("normalization", ["layer-norm", "none"])
def test_capture_matches_recomputation(normalization):
    model = tiny_model(normalization)
    g = torch.Generator().manual_seed(4)
    x, t, y = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([5, 500, 990]), torch.tensor([0, 3, 1])
    expected = recompute_embeddings(model, x, t, y)
    with torch.no_grad():
        assert torch.allclose(model.unpatchify(expected["final"]), model(x, t, y), atol=1e-5)
    keep = O.pick_tokens(model.embedding_names(), 3, 16, seed=7)
    rec = O.capture_embeddings(model, x, t, y, keep=keep)
    assert list(rec.stats) == model.embedding_names() == list(expected)
    for name, tokens in expected.items():
        s, k = keep[name]
        assert torch.allclose(rec.vectors[name], tokens[s, k], atol=1e-5)
        assert rec.stats[name]["max_abs"] == pytest.approx(tokens.abs().max().item(), rel=1e-5)
        assert rec.stats[name]["median_abs"] == pytest.approx(tokens.abs().flatten().median().item(), rel=1e-5)
        assert torch.allclose(rec.channel_rms[name], tokens.reshape(-1, tokens.shape[-1]).square().mean(0).sqrt(),
                              rtol=1e-5)
        assert rec.argmax_counts[name].tolist() == O.argmax_counts(tokens).tolist()
        assert rec.stats[name]["rms_kurtosis"] == pytest.approx(O.rms_kurtosis(tokens.double()), rel=1e-6)


def test_capture_keeps_only_small_results():
    model = tiny_model("layer-norm")
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    rec = O.EmbeddingRecorder(keep={"block.1": (1, 3)})
    refs = []

    def capture(name, tokens):
        refs.append(weakref.ref(tokens))
        rec(name, tokens)

    with torch.no_grad():
        out = model(x, t, y, capture=capture)
    del out
    gc.collect()
    assert len(refs) == 4 and all(r() is None for r in refs)  # no captured tensor survives
    assert list(rec.vectors) == ["block.1"] and rec.vectors["block.1"].shape == (32,)
    for store in (rec.channel_rms, rec.argmax_counts):
        assert all(v.ndim == 1 for v in store.values())


def test_analyze_model_noises_with_q_sample():
    model = tiny_model("none")
    diffusion = create_diffusion(timestep_respacing="")
    x0, y = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([2, 3])
    analysis = O.analyze_model(model, x0, y, [0, 600], diffusion, seed=11)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    abar = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[600])
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise
    expected = recompute_embeddings(model, x_t, torch.tensor([600, 600]), y)
    for name in model.embedding_names():
        assert analysis.stats[600][name]["max_abs"] == pytest.approx(expected[name].abs().max().item(), rel=1e-4)
    assert analysis.stats[0]["block.1"]["max_abs"] != analysis.stats[600]["block.1"]["max_abs"]
    js = json.loads(json.dumps(analysis.to_json()))
    assert list(js["stats"]) == ["0", "600"] and js["layers"] == model.embedding_names()
    assert js["summary"]["overall"]["channel"] in range(32)


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------

def test_grid_shape():
    assert O.grid_shape(30) == (5, 6)
    for n in (1, 4, 14, 26, 30):
        rows, cols = O.grid_shape(n)
        assert rows * cols >= n and (rows - 1) * cols < n and cols >= rows


def fake_stats(depth, spike):
    """stats.json-like {timestep: {layer: stats}} with a spike growing with the layer."""
    names = ["embed"] + [f"block.{i}" for i in range(depth)] + ["final"]
    return {str(t): {n: {"max_abs": 1 + spike * i * (t + 1), "max_median_ratio": 3 + spike * i, "rms_kurtosis": 1 + i}
                     for i, n in enumerate(names)} for t in (10, 500)}


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(0)
    names = ["embed"] + [f"block.{i}" for i in range(28)] + ["final"]
    vectors = {n: rng.normal(size=1152 if n != "final" else 32) for n in names}
    for n in names[1:-1]:
        vectors[n][87] = 500.0
    paths = [
        O.plot_token_grid(vectors, str(tmp_path / "grid.png"), "grid", {n: (0, 1) for n in names}),
        O.plot_layer_curves({"layer-norm": fake_stats(4, 10), "none": fake_stats(2, 1)}, str(tmp_path / "curves.png")),
        O.plot_channel_rms_heatmap({n: np.abs(v) for n, v in vectors.items()}, str(tmp_path / "heat.png")),
        O.plot_outliers_vs_timestep({"layer-norm": fake_stats(4, 10), "none": fake_stats(2, 1)}, str(tmp_path / "t.png")),
    ]
    for path in paths:
        assert_png(path)


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------

def test_command_compares_layer_norm_and_none(runs, tmp_path):
    out = tmp_path / "viz"
    cmd = [sys.executable, "analyze_embeddings.py", "--ckpt", runs["ln"], "--ckpt", runs["none"],
           "--data-path", runs["images"], "--out", str(out), "--timesteps", "10", "500", "999", "--batch-size", "3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["models"]) == ["layer-norm", "none"]
    for label, m in stats["models"].items():
        assert m["config"]["normalization"] == label and m["input"].startswith("pixels")
        assert m["layers"] == ["embed", "block.0", "block.1", "final"]
        assert list(m["stats"]) == ["10", "500", "999"]
        for per_layer in m["stats"].values():
            assert list(per_layer) == m["layers"]
            assert all(math.isfinite(s["max_abs"]) and s["rms_kurtosis"] >= 1 - 1e-9 for s in per_layer.values())
        assert m["summary"]["overall"] is not None
    files = ["layer_curves.png", "outliers_vs_timestep.png", "channel_rms_layer-norm.png", "channel_rms_none.png"]
    files += [f"grid_{label}_t{t}.png" for label in ("layer-norm", "none") for t in (10, 500, 999)]
    for name in files:
        assert_png(str(out / name))


def test_command_gaussian_latents_and_labels(runs, tmp_path):
    other = save_run(str(runs["base"] / "002-ln-again"), "layer-norm", seed=3)
    results = ae.main(["--ckpt", runs["ln"], other, "--out", str(tmp_path), "--timesteps", "999",
                       "--batch-size", "2", "--class-labels", "3"])
    assert list(results) == ["layer-norm [000-ln]", "layer-norm [002-ln-again]"]
    assert all(r[2] == "gaussian" for r in results.values())
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["settings"]["class_labels"] == [3]
    assert (tmp_path / "grid_layer-norm_000-ln_t999.png").exists()


def test_command_errors(runs, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--ckpt .*missing.pt"):
        ae.main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="--ckpt .*garbage.pt"):
        ae.main(["--ckpt", str(garbage), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        ae.main(["--ckpt", runs["ln"], "--data-path", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert "--data-path" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        ae.main(["--ckpt", runs["ln"], "--data-path", str(tmp_path / "empty"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        ae.main(["--ckpt", runs["ln"], "--timesteps", "1000", "--out", str(tmp_path)])
    assert "--timesteps" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")  # refused before the analysis runs, not after
    with pytest.raises(SystemExit, match="--out .*a-file is a file"):
        ae.main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "a-file")])


def test_latents_from_a_local_vae(runs, tmp_path):
    """A latent-space run whose config names a local diffusers VAE folder: images are center-cropped to
    image_size, scaled to [-1, 1], encoded (latent_dist.sample() x 0.18215) and labelled by folder."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    vae.save_pretrained(str(tmp_path / "vae"))  # 8x downsampling like the SD VAE
    ckpt = save_run(str(tmp_path / "latent-run"), "layer-norm", in_channels=4, image_size=64, vae=str(tmp_path / "vae"))
    args = ae.parse_args(["--ckpt", ckpt, "--data-path", runs["images"], "--batch-size", "3", "--seed", "1",
                          "--timesteps", "999", "--out", str(tmp_path / "out")])
    model, config = A.load_for_analysis(ckpt)
    x0, classes, described = A.clean_batch(model, config, args, torch.device("cpu"), {})
    files = A.list_images(runs["images"])
    chosen = sorted(np.random.default_rng(1).permutation(len(files))[:3])
    pixels = []
    for i in chosen:
        with Image.open(files[i][0]) as im:
            pixels.append(center_crop_arr(im.convert("RGB"), 64))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = vae.eval().encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(1)) * 0.18215
    assert x0.shape == (3, 4, 8, 8) and torch.allclose(x0, expected, atol=1e-5)
    assert classes.tolist() == [int(files[i][1][-1]) for i in chosen] and "latents" in described
    results = ae.main(["--ckpt", ckpt, "--data-path", runs["images"], "--batch-size", "3",
                       "--timesteps", "999", "--out", str(tmp_path / "out")])
    assert results["layer-norm"][2].endswith(f"latents of {runs['images']}")


def test_center_crop_arr():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 100, 3), dtype=np.uint8))
    arr = center_crop_arr(image, 32)  # 100 >= 64: BOX-halved to 50 x 150, then resized to 32 x 96
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    box = image.resize((50, 150), resample=Image.BOX).resize((32, 96), resample=Image.BICUBIC)
    assert np.array_equal(arr, np.array(box)[32:64])


# ----------------------------------------------------------------------------------------------------
# The notebook
# ----------------------------------------------------------------------------------------------------

def test_notebook_runs(runs, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    monkeypatch.setenv("DIT_CKPT", os.pathsep.join([runs["ln"], runs["none"]]))
    monkeypatch.setenv("DIT_DATA_PATH", runs["images"])
    monkeypatch.setenv("DIT_TIMESTEPS", "10 900")
    monkeypatch.setenv("DIT_OUT", str(tmp_path / "nb"))
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "TokenEmbeddingsViz.ipynb"), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
    client.execute()  # raises CellExecutionError if any cell fails
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable  # the kernel ran on this (venv) python
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2 + 4  # grids, then curves, two heatmaps and the timestep plot
    assert (tmp_path / "nb" / "stats.json").exists()
