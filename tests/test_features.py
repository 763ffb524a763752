"""Tests for ditlab/features.py's real-digit floor and the shipped digits classifier (its training and
Inception are tested in test_evaluation.py)."""

import os

import numpy as np
import pytest
import torch

from ditlab import features
from ditlab.errors import UsageError
from ditlab.features import classifier_id, digits_data, digits_rgb, load_digits_classifier, real_digits


def test_real_digits_are_balanced_distinct_digits_of_the_data_set():
    images, labels = digits_rgb()
    picked, picked_labels = real_digits(305, seed=3)
    counts = np.bincount(picked_labels, minlength=10)
    assert counts.tolist() == [31] * 5 + [30] * 5  # 305 = 10 x 30 + 5: the remainder to the first classes
    # every picked image is a distinct digit of its class (found by brute force in the whole set)
    flat, found = images.reshape(len(images), -1), []
    for image, label in zip(picked.reshape(len(picked), -1), picked_labels):
        matches = np.flatnonzero((flat == image).all(axis=1) & (labels == label))
        assert len(matches) >= 1
        found.append(tuple(matches))
    assert len(set(found)) == len(found)  # without replacement
    again, _ = real_digits(305, seed=3)
    other, _ = real_digits(305, seed=4)
    assert np.array_equal(again, picked) and not np.array_equal(other, picked)


def test_real_digits_at_given_class_counts_match_them_without_replacement():
    """counts (a sample set's label counts) replace the balanced split: each class exactly as often, still
    distinct digits; counts that do not add up to num, or not ten of them, are refused with the reason."""
    images, labels = digits_rgb()
    counts = [0, 3, 17, 1, 9, 0, 40, 2, 5, 23]
    picked, picked_labels = real_digits(100, seed=1, counts=counts)
    assert np.bincount(picked_labels, minlength=10).tolist() == counts
    flat = images.reshape(len(images), -1)
    rows = [tuple(np.flatnonzero((flat == im).all(axis=1) & (labels == lab)))
            for im, lab in zip(picked.reshape(len(picked), -1), picked_labels)]
    assert all(rows) and len(set(rows)) == 100  # each a digit of the data set, of its class, none twice
    balanced, _ = real_digits(305, seed=3)
    given, _ = real_digits(305, seed=3, counts=[31] * 5 + [30] * 5)  # the balanced counts: the same draw
    assert np.array_equal(balanced, given)
    for bad in ([10] * 9, [11] * 10, [-1, 11] + [10] * 8):
        with pytest.raises(UsageError, match="summing to num=100"):
            real_digits(100, counts=bad)


def test_the_shipped_digits_classifier_is_the_default_and_recognises_held_out_digits():
    assert features.DIGITS_CLASSIFIER == os.path.join(os.path.dirname(features.__file__), "digits_classifier.pt")
    assert os.path.isfile(features.DIGITS_CLASSIFIER)  # shipped: else loading would quietly train a new one
    model = load_digits_classifier()
    images, labels = digits_data()
    held_out = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))[:360]  # training's split
    with torch.no_grad():
        accuracy = (model(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()
    assert accuracy >= 0.98


def test_classifier_id_follows_the_weights_not_the_file(tmp_path):
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(3)}
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"state_dict": state, "held_out_accuracy": 0.5}, tmp_path / "wrapped.pt")
    first = classifier_id(str(tmp_path / "bare.pt"))
    assert first == classifier_id(str(tmp_path / "wrapped.pt")) and len(first) == 12
    changed = {**state, "b.bias": torch.tensor([1.0, 1.0, 1.0 + 2 ** -20])}  # one element moved by 2**-20
    torch.save(changed, tmp_path / "changed.pt")
    assert classifier_id(str(tmp_path / "changed.pt")) != first
    torch.save({"a.weight": state["a.weight"].reshape(3, 2), "b.bias": state["b.bias"]}, tmp_path / "shape.pt")
    assert classifier_id(str(tmp_path / "shape.pt")) != first  # same bytes, another shape
