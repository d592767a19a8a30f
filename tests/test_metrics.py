import math

import numpy as np
import pytest

from cap_jax.metrics import (
    accuracy,
    harmonic_mean,
    per_class_accuracy,
    pseudolabel_balance,
    trzsl_accuracy,
)


def test_accuracy_and_per_class():
    predictions = np.array([0, 1, 1, 2, 2, 0])
    labels = np.array([0, 1, 2, 2, 2, 1])
    assert accuracy(predictions, labels) == pytest.approx(4 / 6)
    per_class = per_class_accuracy(predictions, labels, num_classes=4)
    np.testing.assert_allclose(per_class[:3], [1.0, 0.5, 2 / 3])
    assert math.isnan(per_class[3])


def test_accuracy_rejects_logits():
    with pytest.raises(ValueError, match="argmax"):
        accuracy(np.zeros((3, 2)), np.zeros(3, int))


def test_harmonic_mean():
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.32 / 1.2)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_trzsl_accuracy_splits_by_label():
    predictions = np.array([0, 1, 2, 2, 3])
    labels = np.array([0, 0, 2, 3, 3])
    scores = trzsl_accuracy(predictions, labels, seen=np.array([True, False, True, False]))
    assert scores["seen"] == pytest.approx(2 / 3)
    assert scores["unseen"] == pytest.approx(1 / 2)
    assert scores["harmonic_mean"] == pytest.approx(harmonic_mean(2 / 3, 1 / 2))
    assert trzsl_accuracy(predictions, labels, seen=[0, 2]) == scores


def test_balance_uniform_and_skewed():
    uniform = pseudolabel_balance([5, 5, 5, 5])
    assert uniform["min_over_max"] == 1.0
    assert uniform["normalized_entropy"] == pytest.approx(1.0)
    assert uniform["entropy"] == pytest.approx(math.log(4))
    skewed = pseudolabel_balance([10, 0, 0, 0])
    assert skewed["min_over_max"] == 0.0
    assert skewed["entropy"] == 0.0


def test_balance_all_zero_is_nan():
    result = pseudolabel_balance(np.zeros(3))
    assert all(math.isnan(v) for v in result.values())
    with pytest.raises(ValueError, match="non-negative"):
        pseudolabel_balance([1, -1])
