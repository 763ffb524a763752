"""Fixtures shared by several test files: the digits classifier (trained once per session into a temp
folder, never into data/) and a randomly initialised InceptionV3 state dict saved to a temp file (the
real weights cannot be downloaded here), and `make`, which runs a make target as a user types it."""

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def digits_classifier(tmp_path_factory):
    from ditlab.features import load_digits_classifier

    path = str(tmp_path_factory.mktemp("digits-classifier") / "digits_classifier.pt")
    load_digits_classifier(path)  # trains (about 10 s) and caches
    return path


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised InceptionV3 state dict file (benchmarks.bench_eval.write_random_inception_weights)."""
    from benchmarks.bench_eval import write_random_inception_weights

    return write_random_inception_weights(str(tmp_path_factory.mktemp("inception") / "random-inception.pth"))


@pytest.fixture(scope="session")
def make():
    """make(TARGET, VAR=value, ...): run a make target with this interpreter from the repository root, as a
    user types it (the studies' make targets are the command lines users know); returns its stdout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(target, **variables):
        cmd = ["make", "--no-print-directory", target, f"PYTHON={sys.executable}",
               *(f"{k}={v}" for k, v in variables.items())]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    return run
