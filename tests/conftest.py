"""Fixtures shared by several test files: the digits classifier (trained once per session into a temp
folder, never into data/) and a randomly initialised InceptionV3 state dict saved to a temp file (the
real weights cannot be downloaded here)."""

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
