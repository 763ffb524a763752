"""Interventions on one channel (ditlab/edits.py, intervene.py) on models built so that the
answer is known."""

import json

import pytest
import torch

from diffusion import create_diffusion
from ditlab.edits import Progress, channel_statistics, edit_fn, intervene, places
from ditlab.probe import TIMESTEP_GRID
from ditlab.toy.task import TOY_MODEL
from models import DiT

CHANNEL, VALUE = 5, 50.0


def hand_built(normalization="layer-norm"):
    """A small toy DiT with random weights, except that channel CHANNEL of the patch embedding (block 0's
    input, so what block.0.norm1 sees) is the constant VALUE for every token, input and timestep: an
    outlier that is exactly a bias."""
    torch.manual_seed(0)
    return plant_bias(DiT(**TOY_MODEL, patch_size=1, depth=2, hidden_size=16, num_heads=2, normalization=normalization))


def plant_bias(model):
    """Random weights (std 0.3), then channel CHANNEL of the patch embedding set to VALUE for every token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
        model.x_embedder.proj.weight[CHANNEL] = 0
        model.x_embedder.proj.bias[CHANNEL] = VALUE
        model.pos_embed[0, :, CHANNEL] = 0
    return model.eval()


def test_places_cover_every_block_output_and_norm_input():
    names = [n for n, _, _ in places(hand_built())]
    assert names == ["block.0.norm1", "block.0.norm2", "block.0", "block.1.norm1", "block.1.norm2", "block.1",
                     "final.norm"]


def test_a_constant_outlier_is_found_and_mean_ablation_changes_nothing_zeroing_does():
    model = hand_built()
    diffusion, sampler = create_diffusion(""), create_diffusion("10")
    stats = channel_statistics(model, diffusion, num=4)
    s = stats["block.0.norm1"]
    assert s["channel"] == CHANNEL and s["mean"] == VALUE and torch.all(s["per_t"] == VALUE)
    assert s["rms_share"] > 0.9
    result = intervene(model, diffusion, sampler, ["block.0.norm1"], probe_samples=8, num_samples=8, stats=stats)
    entry = result["places"]["block.0.norm1"]
    for edit in ("mean", "per-t"):  # the channel is its own mean, at every t: bitwise the unedited model
        assert entry[edit]["per_t"] == result["baseline"]["per_t"] and entry[edit]["sample_ratio"] == 1.0
    zero = entry["zero"]
    assert max(abs(r - 1) for r in zero["ratio_per_t"].values()) > 1e-3 and zero["sample_ratio"] != 1.0


def test_edits_replace_exactly_the_channel_with_the_asked_value():
    """Against a direct computation: the hook output equals the input with one channel set."""
    h = torch.randn(6, 4, 16)
    t = torch.tensor([0, 0, 3, 3, 999, 999])
    per_t = torch.arange(1000, dtype=torch.float64) / 7
    for edit, want in (("zero", torch.zeros(6, 4)), ("mean", torch.full((6, 4), 2.5)),
                       ("per-t", (t.double() / 7).float()[:, None].expand(6, 4))):
        out = edit_fn("block.0", 3, edit, per_t=per_t, value=2.5)("block.0", h, t)
        assert torch.equal(out[..., 3], want) and torch.equal(out[..., :3], h[..., :3])
        assert torch.equal(out[..., 4:], h[..., 4:])
    assert edit_fn("block.0", 3, "zero")("block.1", h, t) is None  # other places untouched


def test_progress_lines_are_spaced_in_time_and_give_the_time_left():
    """A line at most every `every` seconds (none for a run shorter than that), with the count and an ETA."""
    now, lines = [0.0], []
    progress = Progress("[model 1/2 layer-norm] ", every=10, clock=lambda: now[0], echo=lines.append)
    for done, at in ((1, 4.0), (2, 12.0), (3, 15.0), (4, 30.0)):
        now[0] = at
        progress(done, 10, f"edit {done}")
    assert lines == ["[model 1/2 layer-norm] edit 2 (2/10, 12 s so far, about 48 s to go)",
                     "[model 1/2 layer-norm] edit 4 (4/10, 30 s so far, about 45 s to go)"]


def test_intervene_reports_every_measurement_to_progress():
    model = hand_built()
    calls = []
    intervene(model, create_diffusion(""), create_diffusion("2"), ["block.0", "final.norm"], ("zero", "mean"),
              probe_samples=2, num_samples=2, stats=channel_statistics(model, create_diffusion(""), num=1),
              progress=lambda done, total, label: calls.append((done, total, label)))
    assert [c[:2] for c in calls] == [(i, 5) for i in range(1, 6)]
    assert calls[0][2] == "unedited" and calls[-1][2] == "place final.norm, edit mean"


def test_command_writes_tables_for_a_run(tmp_path, capsys):
    """intervene.py on a train_toy.py run (both in this process: the same code path as the commands)."""
    import intervene as command
    import train_toy

    ckpt = train_toy.main(["--depth", "1", "--hidden-size", "16", "--num-heads", "2", "--global-batch-size", "16",
                           "--steps", "3", "--eval-steps", "3", "--num-eval-samples", "4", "--sampling-steps", "5",
                           "--probe-samples", "4", "--results-dir", str(tmp_path / "runs"), "--threads", "1"])
    with torch.no_grad():
        command.main(["--ckpt", ckpt, "--places", "final.norm", "block.0", "--probe-samples", "4", "--stats-samples",
                      "2", "--num-samples", "4", "--sampling-steps", "5", "--out", str(tmp_path / "iv"),
                      "--threads", "1", "--progress-every", "0", "--no-control"])
    out = capsys.readouterr().out
    assert "[model 1/1 layer-norm] probe, channel statistics, then 6 edits" in out
    assert "[model 1/1 layer-norm] place final.norm, edit per-t (7/7," in out
    result = json.load(open(tmp_path / "iv" / "interventions.json"))
    (model,) = result["models"].values()
    assert set(model["places"]) == {"final.norm", "block.0"}
    # with one block, editing its output and the final norm's input are the same edit
    assert model["places"]["final.norm"]["zero"]["per_t"] == model["places"]["block.0"]["zero"]["per_t"]
    assert "| final.norm |" in open(tmp_path / "iv" / "interventions.md").read()
    with pytest.raises(SystemExit, match="^error: --places block.7: not a place"):  # one line, no traceback
        command.main(["--ckpt", ckpt, "--places", "block.7", "--out", str(tmp_path / "iv2")])


def test_control_model_without_layernorm_has_a_loudest_channel_too():
    stats = channel_statistics(hand_built("none"), create_diffusion(""), num=2)
    assert stats["block.0.norm1"]["channel"] == CHANNEL


def image_model(normalization="layer-norm"):
    """A small image DiT (3 x 8 x 8 pixels, 10 classes) built like hand_built: channel CHANNEL of its patch
    embedding is the constant VALUE, an outlier that is exactly a bias."""
    torch.manual_seed(0)
    return plant_bias(DiT(input_size=8, patch_size=2, in_channels=3, num_classes=10, class_dropout_prob=0.1,
                          learn_sigma=True, depth=2, hidden_size=16, num_heads=2, normalization=normalization))


def save_image_model(model, path):
    from ditlab.checkpoint_io import save_checkpoint

    config = dict(model="DiT-S/2", input_size=8, in_channels=3, num_classes=10, class_dropout_prob=0.1,
                  learn_sigma=True, depth=2, hidden_size=16, num_heads=2, image_size=8, vae="none",
                  normalization=model.normalization)
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "config": config}, path)
    return path


def test_edits_on_an_image_model_with_a_known_answer():
    """On images with labels: the bias-like channel is found, mean and per-t edits leave the probe and the
    samples bitwise unchanged, zero changes both; the control channel is one of ordinary size."""
    from ditlab.probe import image_data

    model, diffusion = image_model(), create_diffusion("")
    gen = torch.Generator().manual_seed(1)
    data = image_data(torch.rand(6, 3, 8, 8, generator=gen) * 2 - 1, torch.arange(6))
    stats = channel_statistics(model, diffusion, data=data)
    assert stats["block.0.norm1"]["channel"] == CHANNEL and torch.all(stats["block.0.norm1"]["per_t"] == VALUE)
    control = stats["block.0.norm1"]["control"]
    assert control["channel"] != CHANNEL and control["rms_share"] < 0.5
    drawn = []

    def sample_fn(m):  # a deterministic "sampler": the model's output on fixed inputs, as one number
        out = m(data.x0.float(), torch.full((6,), 10), data.y)
        drawn.append(1)
        return {"score": float(out.double().abs().sum())}

    result = intervene(model, diffusion, None, ["block.0.norm1"], data=data, stats=stats, sample_fn=sample_fn,
                       sample_places=["block.0.norm1"], sample_key="score", control=True)
    entry = result["places"]["block.0.norm1"]
    for edit in ("mean", "per-t"):
        assert entry[edit]["per_t"] == result["baseline"]["per_t"] and entry[edit]["sample_ratio"] == 1.0
        assert entry[edit]["x0_per_t"] == result["baseline"]["x0_per_t"]
    assert entry["zero"]["sample_ratio"] != 1.0 and max(abs(r - 1) for r in entry["zero"]["ratio_per_t"].values()) > 1e-3
    assert set(entry["control"]) >= {"channel", "mean", "zero", "per-t"} and "sample" not in entry["control"]["zero"]
    assert len(drawn) == 4  # the unedited model and the three edits; the control draws no samples


def test_command_on_an_image_model_probes_edits_and_scores_samples(tmp_path, capsys):
    """intervene.py on an image checkpoint with a folder of digits: probe, edits with the control, samples under
    the edits at the asked place and the other place that moves most, scored with the digits classifier, and
    their grids (the bias-like channel set to its mean: the same images); --probe-only writes the probe."""
    import intervene as command
    from ditlab.data import write_digits_folder

    ckpt = save_image_model(image_model(), str(tmp_path / "img.pt"))
    digits = str(tmp_path / "digits")
    write_digits_folder(digits, size=8)
    with pytest.raises(SystemExit, match=r"^error: --ckpt .*img\.pt is an image model, probed on real images"):
        command.main(["--ckpt", ckpt, "--out", str(tmp_path / "iv0")])
    with torch.no_grad():
        command.main(["--ckpt", ckpt, "--data-path", digits, "--eval-ref", digits, "--eval-features", "digits",
                      "--places", "block.0.norm1", "final.norm", "--sample-places", "block.0.norm1", "--probe-samples", "8",
                      "--stats-samples", "4", "--num-samples", "20",
                      "--sampling-steps", "4", "--out", str(tmp_path / "iv"), "--threads", "1"])
    (model,) = json.load(open(tmp_path / "iv" / "interventions.json"))["models"].values()
    entry = model["places"]["final.norm"]
    assert {"fd_digits", "accuracy"} <= set(entry["zero"]["sample"]) and "sample_ratio" in entry["mean"]
    assert entry["zero"]["sampled_because"] == "moved most"  # --sample-top 1: the one other place
    assert {r["t"] for r in model["probe"]["errors"]} == set(TIMESTEP_GRID) and "control" in entry
    import numpy as np

    with np.load(tmp_path / "iv" / model["grids"]) as grids:  # the same noise under every edit: mean changes nothing
        assert {"unedited", "block.0.norm1/mean", "final.norm/zero"} <= set(grids)
        assert grids["unedited"].shape == (20, 8, 8, 3) and np.array_equal(grids["unedited"], grids["block.0.norm1/mean"])
        assert not np.array_equal(grids["unedited"], grids["block.0.norm1/zero"])
    assert {r["layer"] for r in model["probe"]["norm_inputs"]} >= {"block.0.norm1", "final.norm"}
    with torch.no_grad():
        command.main(["--ckpt", ckpt, "--data-path", digits, "--probe-only", "--probe-samples", "8",
                      "--out", str(tmp_path / "iv2"), "--threads", "1"])
    (model,) = json.load(open(tmp_path / "iv2" / "interventions.json"))["models"].values()
    assert "places" not in model and len(model["probe"]["errors"]) == len(TIMESTEP_GRID)


def test_a_single_edit_keeps_the_channels_mean_and_writes_its_table():
    """The channel's mean value is kept beside the edits (an edit is named "mean" too: it must not overwrite
    it), and the table of one edit that is not "mean" is written."""
    from ditlab.edits import markdown

    model = hand_built()
    diffusion, sampler = create_diffusion(""), create_diffusion("4")
    stats = channel_statistics(model, diffusion, num=2)
    both = intervene(model, diffusion, sampler, ["block.0.norm1"], ["mean", "zero"], probe_samples=2, num_samples=2,
                     stats=stats)
    entry = both["places"]["block.0.norm1"]
    assert entry["channel_mean"] == pytest.approx(VALUE) and set(entry["mean"]) >= {"per_t", "sample_ratio"}
    zero = intervene(model, diffusion, sampler, ["block.0.norm1"], ["zero"], probe_samples=2, num_samples=2,
                     stats=stats)
    (row,) = [line for line in markdown("m", zero) if line.startswith("| block.0.norm1 |")]
    assert "| zero |" in row


def test_the_place_sampled_because_it_moved_most_is_not_the_sampled_tensor_again():
    """The last block's output is the final norm's input: with the final norm sampled, --sample-top skips it
    and samples the next place that moves most."""
    from ditlab.probe import image_data

    model, diffusion = image_model(), create_diffusion("")
    data = image_data(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1, torch.arange(4))
    result = intervene(model, diffusion, None, ["block.0", "block.1", "final.norm"], data=data,
                       stats=channel_statistics(model, diffusion, data=data), sample_fn=lambda m: {"rms": 1.0},
                       sample_places=["final.norm"], sample_top=1)
    places = result["places"]
    assert places["block.1"]["zero"]["per_t"] == places["final.norm"]["zero"]["per_t"]  # one tensor, two names
    assert "sample" not in places["block.1"]["zero"] and places["block.0"]["zero"]["sampled_because"] == "moved most"
