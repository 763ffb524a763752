"""Tests for ditlab/run.py, the run skeleton of train.py and train_toy.py: the lr schedule against its closed
form, the shared flags and their old names, configs written before the flags were shared, a resume
that names a run of the other trainer, and a resume past damaged checkpoints."""

import json
import math
import os
import shutil

import pytest
import torch

import train
import train_toy
from ditlab.checkpoints import load_checkpoint
from ditlab.errors import UsageError
from ditlab.run import lr_multiplier, upgrade_config


def test_lr_multiplier_matches_the_closed_form():
    assert lr_multiplier("constant", 0, 100) is None  # nothing to schedule: the optimiser's lr is left alone
    warm = lr_multiplier("constant", 4, 100)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lr_multiplier("cosine", 10, 110)
    for step in (10, 35, 60, 85, 109):
        assert cos(step) == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 10) / 100)), abs=1e-15)
    assert cos(60) == pytest.approx(0.5)
    with pytest.raises(UsageError, match="lr-schedule"):
        lr_multiplier("linear", 0, 10)


def test_both_trainers_take_the_same_names():
    toy, _ = train_toy.parse_args(["--max-steps", "7", "--lr-schedule", "constant", "--warmup-steps", "0"])
    old, _ = train_toy.parse_args(["--steps", "7"])  # the study's old name
    assert toy.max_steps == old.max_steps == 7 and toy.lr_schedule == "constant"
    img, explicit = train.parse_args(["--steps", "5", "--lr-schedule", "cosine", "--warmup-steps", "2",
                                      "--eval-every", "3", "--fid-ref", os.path.abspath(__file__)])
    assert (img.max_steps, img.lr_schedule, img.warmup_steps, img.fid_every) == (5, "cosine", 2, 3)
    assert {"max_steps", "fid_every"} <= explicit


def test_old_toy_configs_are_upgraded():
    old = {"script": "train_toy.py", "steps": 12_000, "normalization": "none"}
    assert upgrade_config(old) == {"script": "train_toy.py", "max_steps": 12_000, "normalization": "none"}
    image = {"script": "train.py", "max_steps": 8, "epochs": 2}
    assert upgrade_config(image) == image


TOY = ["--preset", "cpu", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "8",
       "--steps", "2", "--eval-steps", "2", "--num-eval-samples", "4", "--sampling-steps", "5", "--probe-samples", "4",
       "--probe-every", "0", "--threads", "1"]


def test_a_resume_of_the_other_trainers_run_is_refused_without_touching_it(tmp_path):
    run = train_toy.main([*TOY, "--results-dir", str(tmp_path)])
    before = {name: open(os.path.join(run, name), "rb").read() for name in ("config.json", "log.txt")}
    with pytest.raises(SystemExit, match=r"written by train_toy.py.*python train_toy.py --resume"):
        train.main(["--resume", run])
    assert {name: open(os.path.join(run, name), "rb").read() for name in before} == before
    assert json.load(open(os.path.join(run, "config.json")))["script"] == "train_toy.py"


@pytest.mark.parametrize("parse", [train.parse_args, train_toy.parse_args])
def test_no_layernorm_with_another_explicit_normalization_is_refused(parse):
    """--no-layernorm means --normalization none: with another explicit --normalization one would be dropped."""
    for other in ("layer-norm", "rms-norm"):
        with pytest.raises(UsageError, match=f"--no-layernorm contradicts --normalization {other}"):
            parse(["--no-layernorm", "--normalization", other])
    assert parse(["--no-layernorm", "--normalization", "none"])[0].normalization == "none"
    assert parse(["--no-layernorm"])[0].normalization == "none"


def damage(run_dir, *names):
    """Cut checkpoints to half their size in place, as a write cut short by a full disk or a crash leaves
    them (latest.pt is a hard link to the newest numbered file: both names are cut)."""
    for name in names:
        path = os.path.join(run_dir, "checkpoints", name)
        os.truncate(path, os.path.getsize(path) // 2)


def test_a_truncated_latest_checkpoint_resumes_from_the_newest_that_loads_as_that_file_would(tmp_path, capsys):
    flags = [*TOY, "--steps", "3", "--eval-steps", "3", "--ckpt-every", "1"]
    run = train_toy.main([*flags, "--results-dir", str(tmp_path / "a")])
    copy = str(tmp_path / "b" / os.path.basename(run))
    shutil.copytree(run, copy)
    damage(run, "latest.pt", "0000003.pt")
    capsys.readouterr()
    assert train_toy.main(["--resume", run, "--threads", "1"]) == run
    (note,) = capsys.readouterr().err.splitlines()
    fallback = os.path.join(run, "checkpoints", "0000002.pt")
    assert note.startswith(f"warning: --resume {run}: resuming from {fallback} (step 2), the newest checkpoint that "
                           f"loads; skipped: could not load {os.path.join(run, 'checkpoints', 'latest.pt')!r}")
    assert "0000003.pt': the file is corrupt" in note
    assert any(line.endswith(f"] {note}") for line in open(os.path.join(run, "log.txt")).read().splitlines())
    assert train_toy.main(["--resume", os.path.join(copy, "checkpoints", "0000002.pt"), "--threads", "1"]) == copy
    a, b = load_checkpoint(run), load_checkpoint(copy)
    assert a["step"] == b["step"] == 3
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])
    for x, y in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert open(os.path.join(run, "metrics.jsonl")).read() == open(os.path.join(copy, "metrics.jsonl")).read()


def test_a_run_whose_every_checkpoint_is_damaged_is_refused_and_a_named_damaged_file_never_falls_back(tmp_path):
    flags = [*TOY, "--ckpt-every", "1", "--results-dir", str(tmp_path)]
    run = train_toy.main(flags)
    damage(run, "0000001.pt")
    named = os.path.join(run, "checkpoints", "0000001.pt")
    with pytest.raises(SystemExit, match=f"--resume {named}: could not load .*corrupt, truncated"):
        train_toy.main(["--resume", named, "--steps", "3", "--threads", "1"])
    damage(run, "latest.pt")
    before = {name: open(os.path.join(run, name), "rb").read() for name in ("config.json", "log.txt")}
    for resume in (run, "auto"):
        with pytest.raises(SystemExit, match="none of the run's 3 checkpoints loads: could not load .*latest.pt"):
            train_toy.main([*flags, "--steps", "3", "--resume", resume])
    assert {name: open(os.path.join(run, name), "rb").read() for name in before} == before
