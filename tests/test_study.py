"""The studies' one front door, study.py: it lists the studies, refuses an unknown one in one line, and each
study's smallest form runs through it and through its make target (the command line users already know):
toy, ablation and the digits length check here; the sweep in test_sweep.py, the mechanism study in
test_mechanism.py and the digits study's own runs in test_digits.py (through study.py)."""

import pytest

import study

TOY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "16",
       "--num-eval-samples", "4", "--sampling-steps", "4", "--probe-samples", "4", "--threads", "1"]


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


def test_make_toy_runs_the_toy_study(tmp_path, make):
    args = " ".join([*TOY, "--steps", "4", "--eval-steps", "4", "--results-dir", str(tmp_path / "runs"),
                     "--out", str(tmp_path / "toy"), "--no-outliers"])
    out = make("toy", TOY_ARGS=args)
    assert "toy study: 2 runs (layer-norm, none x seeds [0])" in out and "[2/2] finished" in out
    assert (tmp_path / "toy" / "summary.md").read_text().startswith("# ")


def test_make_ablation_runs_the_ablation(tmp_path, make):
    tiny = " ".join([*TOY, "--steps", "4", "--eval-steps", "4", "--variants", "dyt", "--out", str(tmp_path)])
    assert "| dyt | 4 | 1 |" in make("ablation", ABLATION_SEEDS="0", ABLATION_ARGS=tiny)
    assert (tmp_path / "summary.md").exists() and (tmp_path / "toy_errors.png").exists()


def test_make_digits_runs_the_length_check_from_the_committed_records(tmp_path, make):
    """The length check reads only records: the measured study's, committed in docs/results/."""
    make("digits", DIGITS_ARGS=f"--lengths docs/results/digits_runs docs/results/digits_long_runs --out {tmp_path}")
    assert (tmp_path / "lengths.md").read_text().startswith("# The digits study: how long is trained?")
