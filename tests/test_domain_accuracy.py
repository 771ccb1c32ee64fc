"""The demo's class-conditional accuracy (eval/domain.py): real digits score high with their own labels and
low with shifted ones; bad labels fail clearly; the harness reports it only when labels are given."""

import numpy as np
import pytest

from eval import domain, harness


@pytest.fixture(scope="module")
def digits():
    images, labels = domain.mnist_images()
    return images[:400], labels[:400]


def test_class_accuracy_of_real_digits(digits):
    images, labels = digits
    logits = domain.features(images)["logits"]
    assert domain.class_accuracy(logits, labels) >= 0.95  # the classifier on (training) digits
    assert domain.class_accuracy(logits, (labels + 1) % 10) <= 0.1  # the wrong label for every digit


def test_class_accuracy_rejects_bad_labels():
    logits = np.zeros((4, 10))
    with pytest.raises(ValueError, match="one per image"):
        domain.class_accuracy(logits, np.zeros(3, int))
    with pytest.raises(ValueError, match="class ids"):
        domain.class_accuracy(logits, np.asarray([0, 1, 2, 10]))


def test_harness_reports_it_with_labels(digits):
    images, labels = digits
    with_labels = harness.evaluate(images[:200], dataset_images=images[200:], labels=labels[:200])
    assert with_labels["mnist_class_acc"] >= 0.95
    assert "mnist_class_acc" not in harness.evaluate(images[:200], dataset_images=images[200:])
