"""Margin cross-entropy and the confidence-masked self-training loss of CAP.

Both losses add a row of the confusion-aware margin (see
:mod:`cap_jax.margin`) to the logits before the softmax: a sample labeled
``y`` gets ``margin[y, j]`` added to the logit of every class ``j != y``, which
demands that its true-class logit win by that much. The diagonal is masked, so
the true class's own logit is unchanged.

Logits are cast to float32 before the margin is added, because a margin of
0.05 vanishes next to a logit of 30 in bfloat16. The functions are pure and
jittable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["margin_cross_entropy", "self_training_loss"]


def _check_logits(name: str, logits: jax.Array, margin: jax.Array) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} must have shape [B, C], got {logits.shape}")
    num_classes = logits.shape[1]
    if margin.shape != (num_classes, num_classes):
        raise ValueError(
            f"margin must have shape ({num_classes}, {num_classes}) to match {name} "
            f"{logits.shape}, got {margin.shape}"
        )


def _check_where(where, batch: int) -> jax.Array:
    if where is None:
        return jnp.ones((batch,), dtype=bool)
    where = jnp.asarray(where)
    if where.shape != (batch,):
        raise ValueError(f"where must have shape ({batch},), got {where.shape}")
    return where.astype(bool)


def _per_sample_margin_ce(logits: jax.Array, labels: jax.Array, margin: jax.Array) -> jax.Array:
    """``-log_softmax(logits + margin[labels] * (1 - eye)[labels])[labels]``, float32 ``[B]``."""
    num_classes = logits.shape[1]
    off_diagonal = 1.0 - jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [B, C]
    shifted = logits.astype(jnp.float32) + margin.astype(jnp.float32)[labels] * off_diagonal
    log_probs = jax.nn.log_softmax(shifted, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def margin_cross_entropy(logits, labels, margin, *, where=None) -> jax.Array:
    """Mean cross-entropy with a per-label additive margin on the other classes.

    ``loss_i = -log softmax(z_i)[y_i]`` with
    ``z_i[j] = logits[i, j] + margin[y_i, j] · [j != y_i]``; the result is the
    mean of ``loss_i`` over the samples where ``where`` is true (all by
    default). With a zero margin this is plain softmax cross-entropy.

    Args:
      logits: ``[B, C]`` unnormalised scores (any float dtype; used in float32).
      labels: int ``[B]`` class ids in ``[0, C)``.
      margin: float ``[C, C]``; row ``y`` is added for samples labeled ``y``.
      where: optional bool ``[B]``; false rows (batch padding) count for
        nothing and get zero gradient. A batch with no true row gives 0.

    Returns:
      float32 scalar loss.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    margin = jnp.asarray(margin)
    _check_logits("logits", logits, margin)
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {labels.shape}")
    valid = _check_where(where, logits.shape[0])

    # Padded rows may hold garbage; zeroing them first keeps NaN out of the gradient.
    logits = jnp.where(valid[:, None], logits, 0)
    losses = _per_sample_margin_ce(logits, labels, margin)
    total = jnp.sum(jnp.where(valid, losses, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def self_training_loss(strong_logits, weak_logits, margin, *, threshold: float, where=None):
    """Confidence-masked self-training loss on the strong view of unlabeled images.

    The weak (clean) view gives the targets, without gradient::

        p_i = softmax(weak_logits_i),  ŷ_i = argmax_j p_i[j],  kept_i = max_j p_i[j] > threshold

    and the loss is the margin cross-entropy of the strong view against ``ŷ``,
    averaged over kept samples: ``sum_i kept_i · CE_i / max(1, sum_i kept_i)``.
    It is 0, with a zero gradient, when no sample is kept.

    Args:
      strong_logits: ``[B, C]`` logits of the strongly augmented view (the
        gradient flows through these).
      weak_logits: ``[B, C]`` logits of the clean view; wrapped in
        ``stop_gradient``.
      margin: float ``[C, C]`` margin, applied by pseudolabel row.
      threshold: keep a sample when its max probability is strictly above
        this (0.85 in CAP; 0.5 for FGVCAircraft).
      where: optional bool ``[B]``; false rows (batch padding) are never kept.

    Returns:
      ``(loss, aux)``: float32 scalar loss and a dict with ``'pseudolabels'``
      int32 ``[B]``, ``'confidences'`` float32 ``[B]`` (max probability),
      ``'kept'`` float32 ``[B]`` (1.0 where kept) and ``'counts'`` int32 ``[C]``
      (kept samples per pseudolabel, for the next epoch's margin).
    """
    strong_logits = jnp.asarray(strong_logits)
    weak_logits = jnp.asarray(weak_logits)
    margin = jnp.asarray(margin)
    _check_logits("strong_logits", strong_logits, margin)
    if weak_logits.shape != strong_logits.shape:
        raise ValueError(
            f"weak_logits {weak_logits.shape} and strong_logits {strong_logits.shape} "
            "must have the same shape"
        )
    valid = _check_where(where, strong_logits.shape[0])

    # Pseudolabels are targets, not predictions to improve: no gradient to the weak view.
    probs = jax.nn.softmax(jax.lax.stop_gradient(weak_logits).astype(jnp.float32), axis=-1)
    pseudolabels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    confidences = jnp.max(probs, axis=-1)
    kept = (confidences > threshold) & valid

    strong_logits = jnp.where(valid[:, None], strong_logits, 0)
    losses = _per_sample_margin_ce(strong_logits, pseudolabels, margin)
    num_kept = jnp.sum(kept)
    loss = jnp.sum(jnp.where(kept, losses, 0.0)) / jnp.maximum(num_kept, 1).astype(jnp.float32)

    num_classes = strong_logits.shape[1]
    counts = jnp.sum(
        jax.nn.one_hot(pseudolabels, num_classes, dtype=jnp.int32) * kept[:, None], axis=0
    )
    aux = {
        "pseudolabels": pseudolabels,
        "confidences": confidences,
        "kept": kept.astype(jnp.float32),
        "counts": counts.astype(jnp.int32),
    }
    return loss, aux
