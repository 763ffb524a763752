"""Tests for ditlab/features.py's real-digit floor (the digits classifier and Inception are tested in
test_evaluation.py)."""

import numpy as np

from ditlab.features import digits_rgb, real_digits


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
