"""Tests for ablation.py: the tables it builds from finished runs and analysis output."""

import argparse
import json
import os

import pytest

import ablation
import train_toy
from ditlab.toy.readers import final_loss, load_config, load_metrics

TINY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "16", "--num-eval-samples",
        "4", "--sampling-steps", "10", "--log-every", "2", "--threads", "1", "--preset", "cpu", "--steps", "4",
        "--eval-steps", "2"]


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
    args = argparse.Namespace(variants=["layer-norm", "dyt"], seeds=[0], digits_steps=0)
    text = ablation.write_summary(str(tmp_path), table, {}, args)
    ratio = table["dyt"]["ema_rms"]["mean"] / table["layer-norm"]["ema_rms"]["mean"]
    assert f"| {ratio:.2f} |" in text and "| dyt | 4 | 1 |" in text


def test_outlier_table_takes_worst_block_value(tmp_path):
    def layer(max_abs, ratio, kurt, massive):
        return dict(max_abs=max_abs, max_median_ratio=ratio, rms_kurtosis=kurt, massive_count=massive)

    stats = {"models": {"ln": {"config": {"normalization": "layer-norm"}, "summary": {"overall": {"channel": 3}},
                               "stats": {"10": {"embed": layer(999, 999, 999, 999), "block.0": layer(5, 2, 1.5, 0),
                                                "final": layer(999, 999, 999, 999)},
                                         "500": {"block.0": layer(50, 20, 9.0, 2), "block.1": layer(7, 3, 2.0, 1)}}}}}
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats))
    row = ablation.outlier_table(str(path))["layer-norm"]
    assert (row["max_abs"], row["max_median_ratio"], row["rms_kurtosis"], row["massive_count"]) == (50, 20, 9.0, 2)
    assert row["dominant_channel"] == {"channel": 3}


def test_quality_table_and_summary_give_mean_and_range_over_seeds(tmp_path, monkeypatch):
    runs = [(v, seed, f"{v}-{seed}") for seed in (0, 1, 2) for v in ("layer-norm", "none")]
    scores = {run: dict(fd_digits=10.0 * (seed + 1) + (v == "none"), precision=0.5 + 0.1 * seed, recall=0.3,
                        accuracy=0.9 - 0.1 * seed) for v, seed, run in runs}
    monkeypatch.setattr(ablation, "final_loss", lambda run: 0.01 * int(run[-1]))
    table = ablation.quality_table(runs, scores)
    ln = table["layer-norm"]
    assert ln["seeds"] == [0, 1, 2]
    assert ln["fd_digits"]["mean"] == pytest.approx(20.0) and (ln["fd_digits"]["min"], ln["fd_digits"]["max"]) == (10.0, 30.0)
    assert table["none"]["fd_digits"]["mean"] == pytest.approx(21.0)
    assert ln["accuracy"]["values"] == pytest.approx([0.9, 0.8, 0.7]) and ln["final_loss"]["max"] == pytest.approx(0.02)
    args = argparse.Namespace(variants=["layer-norm", "none"], seeds=[0, 1, 2], digits_steps=10, quality_samples=5,
                              quality_steps=3, quality_cfg=1.0)
    floor = dict(fd_digits=1.5, precision=1.0, recall=0.9, accuracy=1.0)
    text = ablation.write_summary(str(tmp_path), {}, {}, args, table, floor)
    assert "| layer-norm | 3 | 20 [10, 30] | 0.6 [0.5, 0.7] | 0.3 [0.3, 0.3] | 0.8 [0.7, 0.9] |" in text
    assert "| real digits | - | 1.5 | 1 | 0.9 | 1 | - |" in text and "Toy identity" not in text
    assert json.load(open(tmp_path / "summary.json"))["quality"]["none"]["fd_digits"]["mean"] == pytest.approx(21.0)
    ablation.plot_quality(table, floor, args.variants, str(tmp_path / "q.png"))
    assert os.path.getsize(tmp_path / "q.png") > 1000


def test_real_digits_floor_scores_real_digits_as_near_perfect(tmp_path, digits_classifier):
    from ditlab import data

    ref = data.write_digits_folder(str(tmp_path / "digits"))
    args = argparse.Namespace(quality_samples=300, digits_ref=ref, digits_classifier=digits_classifier)
    floor = ablation.real_digits_floor(args)
    assert floor["accuracy"] >= 0.97 and floor["precision"] >= 0.9 and floor["num_samples"] == 300
