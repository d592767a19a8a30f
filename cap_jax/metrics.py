"""Evaluation metrics: accuracy, per-class accuracy, the TRZSL harmonic mean and
the balance of pseudolabel counts.

These run on the host after an evaluation pass, so they take numpy or jax
arrays and return numpy arrays or Python floats.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "harmonic_mean",
    "per_class_accuracy",
    "pseudolabel_balance",
    "trzsl_accuracy",
]


def _check_pair(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(
            "predictions and labels must be 1-D class ids of one length, got "
            f"{predictions.shape} and {labels.shape} (pass logits.argmax(-1) for logits)"
        )
    return predictions, labels


def accuracy(predictions, labels) -> float:
    """Return the share of samples whose predicted class id equals the label.

    Args:
      predictions: int ``[N]`` predicted class ids.
      labels: int ``[N]`` true class ids.

    Returns:
      float in ``[0, 1]``; NaN when ``N == 0``.
    """
    predictions, labels = _check_pair(predictions, labels)
    if labels.size == 0:
        return float("nan")
    return float(np.mean(predictions == labels))


def per_class_accuracy(predictions, labels, *, num_classes: int) -> np.ndarray:
    """Return the accuracy within each true class.

    Args:
      predictions: int ``[N]`` predicted class ids.
      labels: int ``[N]`` true class ids in ``[0, num_classes)``.
      num_classes: ``C``.

    Returns:
      float64 ``[C]``; NaN for a class with no sample (use ``np.nanmean`` to
      average).
    """
    predictions, labels = _check_pair(predictions, labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    totals = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[predictions == labels], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, correct / totals, np.nan)


def harmonic_mean(seen_accuracy: float, unseen_accuracy: float) -> float:
    """Return ``2 a b / (a + b)`` of seen and unseen accuracy, 0 when both are 0."""
    a = float(seen_accuracy)
    b = float(unseen_accuracy)
    if a + b == 0:
        return 0.0
    return 2.0 * a * b / (a + b)


def trzsl_accuracy(predictions, labels, *, seen) -> dict[str, float]:
    """Score transductive zero-shot learning: seen, unseen and their harmonic mean.

    Predictions range over all classes. ``seen`` is the accuracy over test
    samples whose label is a seen class, ``unseen`` over the others, each a
    plain per-sample accuracy.

    Args:
      predictions: int ``[N]`` predicted class ids.
      labels: int ``[N]`` true class ids.
      seen: bool ``[C]`` mask of seen classes, or int ids of the seen classes.

    Returns:
      ``{'seen': float, 'unseen': float, 'harmonic_mean': float}``.
    """
    predictions, labels = _check_pair(predictions, labels)
    seen = np.asarray(seen)
    seen_ids = np.flatnonzero(seen) if seen.dtype == bool else seen.astype(np.int64)
    is_seen = np.isin(labels, seen_ids)
    seen_acc = accuracy(predictions[is_seen], labels[is_seen])
    unseen_acc = accuracy(predictions[~is_seen], labels[~is_seen])
    return {
        "seen": seen_acc,
        "unseen": unseen_acc,
        "harmonic_mean": harmonic_mean(seen_acc, unseen_acc),
    }


def pseudolabel_balance(counts) -> dict[str, float]:
    """Measure how evenly pseudolabels spread over classes.

    With ``p_c = counts_c / sum(counts)``:

    * ``min_over_max = min(counts) / max(counts)``, 1 when balanced, 0 when a
      class gets none;
    * ``entropy = -sum_c p_c log p_c`` in nats (terms with ``p_c = 0`` count 0);
    * ``normalized_entropy = entropy / log(C)``, 1 when balanced (for ``C = 1``
      it is 1).

    Args:
      counts: ``[C]`` pseudolabels per class (non-negative).

    Returns:
      dict of the three floats; all NaN when every count is zero.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must have shape [C] with C >= 1, got {counts.shape}")
    if np.any(counts < 0):
        raise ValueError(f"counts must be non-negative, got minimum {counts.min()}")
    total = counts.sum()
    if total == 0:
        nan = float("nan")
        return {"min_over_max": nan, "entropy": nan, "normalized_entropy": nan}

    p = counts / total
    nonzero = p[p > 0]
    entropy = float(-np.sum(nonzero * np.log(nonzero)))
    normalized = entropy / np.log(counts.size) if counts.size > 1 else 1.0
    return {
        "min_over_max": float(counts.min() / counts.max()),
        "entropy": entropy,
        "normalized_entropy": float(normalized),
    }
