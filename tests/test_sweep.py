"""Tests for sweep.py (and the ditlab/studies/sweep.py): the table on tiny runs, and resuming a sweep."""

import json
import os
import statistics

import numpy as np
import pytest

import study
import train_toy
from ditlab.checkpoints import load_checkpoint
from ditlab.preemption import PREEMPTED_EXIT
from ditlab.toy.readers import last_probe, load_config, load_metrics
from ditlab.studies.sweep import DEFAULT_SWEEP_CELLS, SWEEP_CELLS, sweep_jobs
from ditlab.trainer import Trainer

SCALE = "0.0007"  # 12000 x 0.0007 = 8 steps per run
TINY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "16", "--num-eval-samples",
        "4", "--sampling-steps", "5", "--probe-samples", "8"]


def run_sweep(out, *flags):
    return study.main(["sweep", "--seeds", "0", "1", "--steps-scale", SCALE, "--out", str(out), *flags, *TINY])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, make):
    """The smallest sweep, through its make target (`make sweep SWEEP_ARGS=...`); its runs as the report
    finds them."""
    out = tmp_path_factory.mktemp("sweep")
    flags = ["--seeds", "0", "1", "--steps-scale", SCALE, "--out", str(out), "--cells", "preset", *TINY]
    assert "4 runs, 0 already finished (skipped), 4 to run" in make("sweep", SWEEP_ARGS=" ".join(flags))
    return out, run_sweep(out, "--cells", "preset", "--report")


def test_sweep_table_from_tiny_runs(finished):
    """The cell's numbers are those of its runs' metrics: sample RMS per variant and seed, ratio of the
    means, per-seed ratios, and the per-t eps error ratio at the last probe."""
    out, runs = finished
    assert list(runs) == ["preset"] and len(runs["preset"]) == 4
    rms, eps = {}, {}
    for run in runs["preset"]:
        cfg = load_config(run)
        assert cfg["max_steps"] == 8 and cfg["global_batch_size"] == 16
        last = [r for r in load_metrics(run) if r["step"] == 8 and r["weights"] == "ema"]
        rms[(cfg["normalization"], cfg["global_seed"])] = last[0]["rms"]
        eps[(cfg["normalization"], cfg["global_seed"])] = {t: r["eps_rel_error"] for t, r in last_probe(run).items()}
    cell = json.load(open(out / "summary.json"))["cells"]["preset"]
    ln, none = [rms[("layer-norm", s)] for s in (0, 1)], [rms[("none", s)] for s in (0, 1)]
    assert cell["ema"]["layer_norm"]["mean"] == pytest.approx(statistics.fmean(ln))
    assert cell["ema"]["ratio"] == pytest.approx(statistics.fmean(ln) / statistics.fmean(none))
    assert cell["ema"]["per_seed_ratios"] == pytest.approx([ln[0] / none[0], ln[1] / none[1]])
    assert cell["ema"]["ratio_min"] == pytest.approx(min(ln[0] / none[0], ln[1] / none[1]))
    for row in cell["timesteps"]:
        t = row["t"]
        mean = lambda norm: statistics.fmean(eps[(norm, s)][t] for s in (0, 1))
        assert row["ratio"] == pytest.approx(mean("layer-norm") / mean("none"))
    text = (out / "summary.md").read_text()
    head = text.splitlines()[:9]  # title, provenance, the result in a sentence, the warning, what was run
    assert head[0].startswith("# Sweep") and head[2].startswith("_Written by `") and head[1] == head[3] == ""
    ratio = cell["ema"]["ratio"]
    verdict = "about equal" if abs(ratio - 1) < 0.05 else "LayerNorm worse" if ratio > 1 else "LayerNorm better"
    assert head[4] == (f"In the preset cell, at 8 steps, 2 seeds: LayerNorm's sampled error is "
                       f"{ratio:.2f}x the no-LayerNorm model's (EMA weights; {verdict}).")
    assert head[5] == "" and head[6].startswith("**Too short to mean anything:** a quick sweep (runs of 0.00067x the preset's steps, "
                              "--steps-scale); 8 steps is under 5x the EMA's lag of 1/(1 - 0.999) = 1,000 steps")
    assert head[7] == "" and head[8].startswith("Run: preset (8 steps, seeds 0 1)")
    assert "EMA rows: the averaged weights lag the raw ones by about 1/(1 - 0.999) = 1,000 steps" in text
    assert f"| preset | {SWEEP_CELLS['preset'][0]} | 8 | 2 | {statistics.fmean(ln):.2e}" in text
    assert f"{cell['ema']['ratio']:.2f} [{cell['ema']['ratio_min']:.2f}, {cell['ema']['ratio_max']:.2f}]" in text
    assert os.path.getsize(out / "ratios.png") > 1000


def test_headline_of_a_full_length_sweep_gives_the_range_over_cells_and_no_warning():
    """Runs of the preset's length with EMA samples far from the prior: the sentence, and no too-short line."""
    from ditlab.studies.sweep import sweep_headline

    spread = lambda mean: dict(mean=mean, min=mean, max=mean)
    cell = lambda steps, ratio: dict(steps=steps, seeds=[0, 1], ema_decay=0.999,
                                     ema=dict(ratio=ratio, layer_norm=spread(0.02 * ratio), none=spread(0.02)))
    summary = dict(cells={"preset": cell(12000, 1.9), "steps2x": cell(24000, 0.5)})
    assert sweep_headline(summary) == [
        "In the preset cell, at 12,000 steps, 2 seeds: LayerNorm's sampled error is 1.90x the no-LayerNorm model's "
        "(EMA weights; LayerNorm worse); over the 2 cells this ratio runs from 0.50x to 1.90x."]
    summary["cells"]["preset"]["ema"]["none"] = spread(0.9)  # the symptom: samples still near the prior
    assert sweep_headline(summary)[2].startswith("**Too short to mean anything:** the EMA samples' RMS 0.90 is near")


def test_trajectory_table_from_tiny_runs(finished):
    """The probe trajectory of each run (geometric mean of the eps error over t >= 10 at every probe) and
    the cell's half-way / end ratios and second-half drops, recomputed with numpy from metrics.jsonl."""
    out, runs = finished
    curves = {}
    for run in runs["preset"]:
        cfg = load_config(run)
        rows = [r for r in load_metrics(run, "timestep") if r["weights"] == "ema" and r["t"] >= 10]
        steps = sorted({r["step"] for r in rows})
        curves[(cfg["normalization"], cfg["global_seed"])] = {
            s: float(np.exp(np.mean(np.log([r["eps_rel_error"] for r in rows if r["step"] == s])))) for s in steps}
    assert steps == list(range(1, 9))  # probed every step of the 8
    tr = json.load(open(out / "summary.json"))["cells"]["preset"]["trajectory"]["ema"]
    assert tr["half"]["step"] == 4 and tr["end"]["step"] == 8
    for key, curve in curves.items():
        assert dict(map(tuple, tr["curves"][key[0]][str(key[1])])) == pytest.approx(curve, rel=1e-12)
    for name, step in (("half", 4), ("end", 8)):
        ln, none = np.array([curves[("layer-norm", s)][step] for s in (0, 1)]), np.array([curves[("none", s)][step] for s in (0, 1)])
        assert tr[name]["ratio"] == pytest.approx(ln.mean() / none.mean())
        assert tr[name]["ratio_min"] == pytest.approx((ln / none).min())
    drop = np.array([curves[("none", s)][4] / curves[("none", s)][8] for s in (0, 1)])
    assert tr["drop"]["none"]["mean"] == pytest.approx(drop.mean())
    text = (out / "summary.md").read_text()
    assert f"| preset | 4 | {tr['half']['layer_norm']['mean']:.2e} |" in text
    assert os.path.getsize(out / "trajectories.png") > 1000


def test_rerun_skips_finished_and_continues_an_interrupted_run(finished, capsys, monkeypatch):
    out, runs = finished
    before = {run: os.path.getmtime(os.path.join(run, "metrics.jsonl")) for run in runs["preset"]}
    capsys.readouterr()
    again = run_sweep(out, "--cells", "preset")
    assert "4 runs, 4 already finished (skipped), 0 to run" in capsys.readouterr().out
    assert again == runs and all(os.path.getmtime(os.path.join(r, "metrics.jsonl")) == t for r, t in before.items())

    # One run of another cell is stopped at step 3 (a checkpoint, exit 75); the sweep continues it.
    job = next(j for j in sweep_jobs(["width128"], [0, 1], str(out), float(SCALE), TINY)
               if j["normalization"] == "layer-norm" and j["seed"] == 1)
    real = Trainer._stop_everywhere
    monkeypatch.setattr(Trainer, "_stop_everywhere", lambda self: self.step == 3 or real(self))
    with pytest.raises(SystemExit) as stop:
        train_toy.main(job["argv"][2:])
    assert stop.value.code == PREEMPTED_EXIT
    monkeypatch.setattr(Trainer, "_stop_everywhere", real)
    (cut,) = os.listdir(job["results_dir"])
    assert load_checkpoint(os.path.join(job["results_dir"], cut))["step"] == 3
    capsys.readouterr()
    both = run_sweep(out, "--cells", "preset", "width128")
    assert "8 runs, 4 already finished (skipped), 4 to run" in capsys.readouterr().out
    assert os.path.join(job["results_dir"], cut) in both["width128"]  # continued, not started again
    assert len(os.listdir(job["results_dir"])) == 4 and load_config(both["width128"][0])["hidden_size"] == 128
    assert load_checkpoint(os.path.join(job["results_dir"], cut))["step"] == 8
    assert list(json.load(open(out / "summary.json"))["cells"]) == ["preset", "width128"]


def test_report_only_refuses_unfinished_cells(tmp_path):
    with pytest.raises(SystemExit, match="has not finished"):
        run_sweep(tmp_path, "--cells", "preset", "--report")


def test_default_cells_are_the_six_and_steps4x_is_asked_for_by_name():
    """`make sweep` runs six cells (about 80 minutes on 2 cores); steps4x (4x the steps) only when named."""
    jobs = sweep_jobs(list(DEFAULT_SWEEP_CELLS), [0, 1], "out")
    assert {j["cell"] for j in jobs} == set(SWEEP_CELLS) - {"steps4x"} and len(jobs) == 24
    (job,) = [j for j in sweep_jobs(["steps4x"], [0], "out") if j["normalization"] == "none"]
    assert job["steps"] == 48_000 and job["results_dir"] == os.path.join("out", "runs", "steps4x-48000")


def test_report_adds_the_other_finished_seeds_of_a_cell(finished):
    """A seed run for some cells only appears in the report beside the asked ones once both of its
    variants have finished; a seed with one finished variant stays out. (The finished sweep has seeds 0
    and 1 in its preset cell; seed 7 gets its LayerNorm run only.)"""
    out, _ = finished
    (half,) = [j for j in sweep_jobs(["preset"], [7], str(out), float(SCALE), TINY)
               if j["normalization"] == "layer-norm"]
    train_toy.main(half["argv"][2:])
    runs = run_sweep(out, "--cells", "preset", "--report")  # asks for seeds 0 1
    assert sorted(load_config(r)["global_seed"] for r in runs["preset"]) == [0, 0, 1, 1]
    runs = study.main(["sweep", "--seeds", "0", "--steps-scale", SCALE, "--out", str(out), "--cells", "preset",
                       "--report", *TINY])
    assert sorted(load_config(r)["global_seed"] for r in runs["preset"]) == [0, 0, 1, 1]  # seed 1 added back
    assert json.load(open(out / "summary.json"))["cells"]["preset"]["seeds"] == [0, 1]
