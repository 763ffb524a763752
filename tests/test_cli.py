"""Tests for ditlab/cli.py: every script refuses a nonsense numeric flag at parse time, naming the flag and the
allowed range, before any work starts."""

import argparse
import importlib
import re

import pytest

import analyze_embeddings
import extract_latents
import sample
import sample_ddp
import train
import train_toy
from benchmarks import bench
from ditlab.cli import at_least, number


def study_args(name):
    """A study's flag parser, as `python study.py NAME` uses it."""
    def parse(argv):
        return importlib.import_module(f"ditlab.studies.{name}").parser().parse_args(argv)

    parse.__module__ = f"study.{name}"
    return parse


def test_at_least():
    assert at_least(1)("3") == 3 and at_least(0)("0") == 0
    for bad in ("0", "-2", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer >= 1"):
            at_least(1)(bad)


@pytest.mark.parametrize("kind,good,bad", [
    (number(0, low_open=True), ["1e-4", "3"], ["0", "-1e-4", "nan", "inf", "x"]),
    (number(0), ["0", "2.5"], ["-0.1", "nan"]),
    (number(0, 1), ["0", "1", "0.9999"], ["1.0001", "-1"]),
    (number(0, 1, high_open=True), ["0", "0.5"], ["1", "2"]),
])
def test_number_ranges(kind, good, bad):
    for text in good:
        assert kind(text) == float(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="must be a number"):
            kind(text)


CASES = [  # (parse, flag, bad value, what the message says)
    (train.parse_args, "--global-batch-size", "0", "an integer >= 1"),
    (train.parse_args, "--global-batch-size", "-4", "an integer >= 1"),
    (train.parse_args, "--lr", "-0.001", "a number > 0"),
    (train.parse_args, "--max-steps", "0", "an integer >= 1"),
    (train.parse_args, "--ema-decay", "1.5", "a number in [0, 1]"),
    (train.parse_args, "--class-dropout-prob", "1", "a number in [0, 1)"),
    (train.parse_args, "--cfg-scale", "-2", "a number >= 0"),
    (train.parse_args, "--num-workers", "-1", "an integer >= 0"),
    (train.parse_args, "--sample-steps", "0", "an integer >= 1"),
    (train_toy.parse_args, "--steps", "0", "an integer >= 1"),
    (train_toy.parse_args, "--global-batch-size", "0", "an integer >= 1"),
    (train_toy.parse_args, "--grad-clip", "0", "a number > 0"),
    (train_toy.parse_args, "--probe-every", "-1", "an integer >= 0"),
    (train_toy.parse_args, "--probe-samples", "0", "an integer >= 1"),
    (study_args("sweep"), "--steps-scale", "0", "a number > 0"),
    (study_args("sweep"), "--seeds", "-1", "an integer >= 0"),
    (study_args("sweep"), "--parallel", "0", "an integer >= 1"),
    (sample.parse_args, "--num-sampling-steps", "0", "an integer >= 1"),
    (sample.parse_args, "--cfg-scale", "-2", "a number >= 0"),
    (sample_ddp.parse_args, "--per-proc-batch-size", "0", "an integer >= 1"),
    (sample_ddp.parse_args, "--num-fid-samples", "-5", "an integer >= 1"),
    (extract_latents.parse_args, "--shard-size", "0", "an integer >= 1"),
    (analyze_embeddings.parse_args, "--timesteps", "-1", "an integer >= 0"),
    (study_args("toy"), "--parallel", "0", "an integer >= 1"),
    (study_args("ablation"), "--seeds", "-1", "an integer >= 0"),
    (bench.parse_args, "--rounds", "0", "an integer >= 1"),
]


@pytest.mark.parametrize("parse,flag,value,says", CASES, ids=[f"{p.__module__}{f}={v}" for p, f, v, _ in CASES])
def test_bad_numeric_flag_is_refused_at_parse_time(parse, flag, value, says, capsys):
    required = {extract_latents.parse_args: ["--data-path", "d", "--latents-dir", "l"]}.get(parse, [])
    with pytest.raises(SystemExit) as stop:
        parse([*required, flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    # (a flag with an old name as alias is spelled "--max-steps/--steps" by argparse)
    assert re.search(rf"argument (--[\w-]+/)*{flag}(/--[\w-]+)*: must be {re.escape(says)}, got '{value}'", err), err
