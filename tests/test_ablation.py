"""Tests for the ablation (ditlab/studies/ablation.py): the toy table, summary and plot it builds from finished runs."""

import argparse
import json
import os

import pytest

from ditlab.studies import ablation
import train_toy
from ditlab.toy.readers import final_loss, load_config, load_metrics

TINY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "16", "--num-eval-samples",
        "4", "--sampling-steps", "10", "--log-every", "2", "--threads", "1", "--preset", "cpu", "--steps", "4",
        "--eval-steps", "2"]


def test_headline_of_long_runs_has_no_warning():
    """Runs of many EMA lags whose samples are far from the prior: the sentence alone."""
    row = lambda rms: dict(step=12000, seeds=3, ema_decay=0.999, ema_rms=dict(mean=rms))
    toy = {"layer-norm": row(0.02), "none": row(0.01), "dyt": row(0.03)}
    assert ablation.headline(toy, ["layer-norm", "none", "dyt"]) == [
        "At 12,000 steps, 3 seeds (EMA weights): the lowest sampled error is none's (1.00e-02); relative to "
        "LayerNorm's: none 0.50x, dyt 1.50x."]


def test_toy_table_summary_and_plot(tmp_path):
    runs = [train_toy.main([*TINY, "--results-dir", str(tmp_path / "runs"), "--normalization", n]) for n in ("layer-norm", "dyt")]
    table = ablation.toy_table(runs)
    for run in runs:
        norm = load_config(run)["normalization"]
        last = [r for r in load_metrics(run) if r["step"] == 4]
        ema = next(r for r in last if r["weights"] == "ema")
        assert table[norm]["step"] == 4 and table[norm]["seeds"] == 1
        assert table[norm]["ema_rms"]["mean"] == pytest.approx(ema["rms"])
        assert table[norm]["final_loss"] == pytest.approx(final_loss(run))
    ablation.plot_toy(runs, str(tmp_path / "toy.png"))
    assert os.path.getsize(tmp_path / "toy.png") > 1000
    args = argparse.Namespace(variants=["layer-norm", "dyt"], seeds=[0])
    text = ablation.write_summary(str(tmp_path), table, args)
    ratio = table["dyt"]["ema_rms"]["mean"] / table["layer-norm"]["ema_rms"]["mean"]
    assert f"| {ratio:.2f} |" in text and "| dyt | 4 | 1 |" in text
    head = text.splitlines()[:9]  # title, provenance, the result in a sentence, the warning, what was run
    assert head[0] == "# Normalization ablation (toy)" and head[2].startswith("_Written by `")
    best = min(("layer-norm", "dyt"), key=lambda v: table[v]["ema_rms"]["mean"])
    assert head[4] == (f"At 4 steps, 1 seed (EMA weights): the lowest sampled error is {best}'s "
                       f"({table[best]['ema_rms']['mean']:.2e}); relative to LayerNorm's: dyt {ratio:.2f}x.")
    assert head[6].startswith("**Too short to mean anything:** 4 steps is under 5x the EMA's lag")
    assert head[8] == "Run: variants layer-norm, dyt; seeds [0]; the `make toy` CPU preset."
    assert json.load(open(tmp_path / "summary.json"))["toy"]["dyt"]["ema_rms"]["mean"] == pytest.approx(
        table["dyt"]["ema_rms"]["mean"])
