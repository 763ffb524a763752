"""The examples in the README, the docs and --help that use an earlier command's output run as written, in
the order a reader meets them, in a temporary copy of the repository: `make toy`, then the commands on its
runs by their stable names; the digits demo (`python train.py`), then sampling, scoring, resuming and
exporting its run. Each runs in a short form: the example's own command line, as the page writes it, with
flags appended that make it tiny (later flags win). test_readme.py checks every flag of every example."""

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = "--steps 4 --eval-steps 4 --depth 2 --hidden-size 32 --num-heads 2 --global-batch-size 16 " \
      "--num-eval-samples 4 --sampling-steps 4 --probe-samples 4 --no-outliers"
DEMO = ["--demo", "--max-steps", "4", "--ckpt-every", "4", "--sample-every", "0", "--log-every", "2", "--global-batch-size", "16",
        "--depth", "1", "--threads", "1"]


def example(page, start):
    """The command line on `page` that starts with `start`, as written there (comment and continuation
    lines resolved). Fails when the page no longer shows it."""
    text = open(os.path.join(ROOT, page)).read().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(start):
            return shlex.split(line.split("  #")[0])
    raise AssertionError(f"{page} no longer shows an example starting {start!r}")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the tracked files (the examples write results/ and data/ into it), sharing this .venv."""
    copy = tmp_path_factory.mktemp("repo") / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(copy / name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), copy / name)
    if os.path.isdir(os.path.join(ROOT, ".venv")):
        os.symlink(os.path.join(ROOT, ".venv"), copy / ".venv")
    return copy


def run(repo, argv, *short):
    """Run an example (argv as written, `python` being this interpreter) with the short-form flags appended."""
    argv = [sys.executable if a == "python" else a for a in argv] + list(short)
    done = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout + done.stderr


def test_toy_examples_run_on_the_runs_make_toy_writes(repo):
    out = run(repo, ["make", "toy"], f"PYTHON={sys.executable}", f"TOY_ARGS={TOY}")
    assert "runs by name: results/toy-runs/layer-norm-s0" in out
    assert "toy study: 2 runs (layer-norm, none x seeds [0])" in out and "[2/2] finished" in out
    head = (repo / "results" / "toy" / "summary.md").read_text().splitlines()[:7]  # what make toy's report opens with
    assert head[0] == "# Toy identity study" and head[2].startswith("_Written by `")
    assert head[4].startswith("At 4 steps, 1 seed: LayerNorm's sampled error is ")
    assert head[6].startswith("**Too short to mean anything:** 4 steps is under 5x the EMA's lag")
    for name in ("layer-norm-s0", "none-s0"):
        assert os.path.islink(repo / "results" / "toy-runs" / name)
    run(repo, example("docs/toy.md", "python study.py toy --report"), "--no-outliers")
    run(repo, example("README.md", "python analyze_embeddings.py --ckpt results/toy-runs/"), "--batch-size", "4",
        "--timesteps", "0", "999")
    assert (repo / "results" / "viz" / "stats.json").is_file()
    run(repo, example("docs/mechanism.md", "python intervene.py --ckpt results/toy-runs/"), "--edits", "zero",
        "--probe-samples", "4", "--stats-samples", "2", "--num-samples", "4", "--sampling-steps", "4")
    help_example = example("intervene.py", "python intervene.py --ckpt results/toy-runs/")
    run(repo, help_example, "--places", "final.norm", "--edits", "mean", "--probe-samples", "4", "--stats-samples",
        "2", "--num-samples", "4", "--sampling-steps", "4", "--out", "results/iv2")
    run(repo, example("README.md", "python -m benchmarks.samplers --toy-ckpt"), "--samplers", "ddpm", "ddim",
        "--toy-steps", "250", "10", "--toy-seeds", "0", "--num-samples", "4", "--out", "results/samplers")


def test_digits_demo_examples_run_on_the_run_the_demo_writes(repo):
    run(repo, example("README.md", "python train.py "), *DEMO)
    assert os.path.isdir(repo / "results" / "000-DiT-S-4-layer-norm")
    run(repo, example("README.md", "python sample.py --ckpt results/000-DiT-S-4-layer-norm"),
        "--num-sampling-steps", "3")
    assert (repo / "results" / "sample.png").is_file()
    run(repo, example("docs/evaluation.md", "python sample_ddp.py --ckpt results/000-DiT-S-4-layer-norm"),
        "--num-fid-samples", "20", "--num-sampling-steps", "3", "--per-proc-batch-size", "20")
    (npz,) = glob.glob(str(repo / "results" / "samples" / "*.npz"))
    evaluate = example("README.md", "python evaluate.py results/samples/<folder>.npz data/digits")
    evaluate[2] = os.path.relpath(npz, repo)  # the folder sample_ddp.py named
    out = run(repo, evaluate)
    assert "FD-digits" in out or "fd_digits" in out
    assert "different resolutions" not in out
