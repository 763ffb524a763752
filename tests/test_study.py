"""The studies' one front door, study.py: it lists the studies, refuses an unknown one in one line, and each
study's smallest form runs through it and through its make target (the command line users already know)."""

import os
import subprocess
import sys

import pytest

import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "16",
       "--num-eval-samples", "4", "--sampling-steps", "4", "--probe-samples", "4", "--threads", "1"]


def make(target, **variables):
    """`make TARGET VAR=value ...` with this interpreter, from the repository root; its stdout."""
    cmd = ["make", "--no-print-directory", target, f"PYTHON={sys.executable}",
           *(f"{k}={v}" for k, v in variables.items())]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_help_lists_every_study(capsys):
    with pytest.raises(SystemExit) as stop:
        study.main(["--help"])
    assert stop.value.code == 0
    listed = capsys.readouterr().out
    for name in study.STUDIES:
        assert f"\n    {name} " in listed


def test_an_unknown_study_is_one_line():
    with pytest.raises(SystemExit, match="unknown study 'toys'; choose one of toy, sweep"):
        study.main(["toys"])


def test_a_study_that_passes_nothing_on_refuses_an_unknown_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        study.main(["mechanism", "--no-such-flag"])
    assert stop.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_make_toy_runs_the_toy_study(tmp_path):
    args = " ".join([*TOY, "--steps", "4", "--eval-steps", "4", "--results-dir", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "toy"), "--no-outliers"])
    out = make("toy", TOY_ARGS=args)
    assert "toy study: 2 runs (layer-norm, none x seeds [0])" in out and "[2/2] finished" in out
    assert (tmp_path / "toy" / "summary.md").read_text().startswith("# ")


def test_make_ablation_and_make_sweep_run_their_smallest_forms(tmp_path):
    tiny = " ".join([*TOY, "--steps", "4", "--eval-steps", "4", "--variants", "layer-norm", "dyt",
                     "--out", str(tmp_path / "ablation")])
    assert "| dyt |" in make("ablation", ABLATION_SEEDS="0", ABLATION_ARGS=tiny)
    sweep = " ".join([*TOY, "--cells", "preset", "--seeds", "0", "--steps-scale", "0.0004", "--out",
                      str(tmp_path / "sweep")])
    make("sweep", SWEEP_ARGS=sweep)
    assert "| preset |" in (tmp_path / "sweep" / "summary.md").read_text()


def test_make_mechanism_and_the_digits_length_check_run_from_records(tmp_path):
    """The mechanism study's and the digits study's reports rebuilt from the measured studies' records (no
    training: every record is there), through their make targets."""
    out = make("mechanism", MECHANISM_ARGS=f"--report --records docs/results/mechanism_runs --out {tmp_path}/m")
    assert "[mechanism] wrote" in out and (tmp_path / "m" / "summary.md").exists()
    out = make("digits", DIGITS_ARGS=f"--lengths docs/results/digits_runs docs/results/digits_long_runs "
                                     f"--out {tmp_path}/d")
    assert (tmp_path / "d" / "lengths.md").read_text().startswith("# The digits study: how long is trained?")
