"""Fixtures shared by several test files: the digits classifier (trained once per session into a temp
folder, never into data/) and a randomly initialised InceptionV3 state dict saved to a temp file (the
real weights cannot be downloaded here)."""

import os
from unittest import mock

import pytest
import torch


@pytest.fixture(scope="session")
def digits_classifier(tmp_path_factory):
    import evaluation

    path = str(tmp_path_factory.mktemp("digits-classifier") / "digits_classifier.pt")
    evaluation.load_digits_classifier(path)  # trains (about 10 s) and caches
    return path


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with He-initialised convolutions (so activations keep a sane scale
    through 40 layers), as a plain state dict file."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = tfi.FeatureExtractorInceptionV3("random-inception", ["2048"])
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    torch.nn.init.normal_(net.fc.bias, std=1.0)
    path = os.path.join(str(tmp_path_factory.mktemp("inception")), "random-inception.pth")
    torch.save(net.state_dict(), path)
    return path
