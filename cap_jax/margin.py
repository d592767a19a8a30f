"""Class prototypes and the confusion-aware calibrated margin.

At the start of each epoch after the first, CAP builds a margin matrix
``margin[y, j]`` that is added to the logit of class ``j`` for a sample labeled
``y`` (see :func:`cap_jax.losses.margin_cross_entropy`). Its size grows with
how similar the classes ``y`` and ``j`` are (text or image side, whichever is
larger) and with how rarely ``y`` was pseudolabeled in the last epoch, so rare
and confusable classes get a wider decision margin.

Both functions are pure, jittable and float32 throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["class_prototypes", "confusion_aware_margin"]

_FACTORS = ("reference", "paper")


def _unit(x: jax.Array) -> jax.Array:
    """L2-normalise the last axis; a zero vector stays zero instead of NaN."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(norm > 0, norm, 1.0)


def class_prototypes(image_features, leaderboard, text_features) -> jax.Array:
    """Compute each class's visual prototype from its main samples.

    ``v_c = normalize(mean_{i in board_c} normalize(x_i))``; a class whose board
    contains no image (all ``-1``) uses its unit text feature ``normalize(t_c)``.

    Args:
      image_features: ``[N, D]`` features of the unlabeled pool (unit or not;
        each is normalised here before averaging).
      leaderboard: int ``[C, K]`` image ids per class, ``-1`` padded.
      text_features: ``[C, D]`` class text features (unit or not).

    Returns:
      float32 ``[C, D]`` unit prototypes.
    """
    image_features = jnp.asarray(image_features)
    leaderboard = jnp.asarray(leaderboard)
    text_features = jnp.asarray(text_features)
    if image_features.ndim != 2 or text_features.ndim != 2 or leaderboard.ndim != 2:
        raise ValueError(
            "image_features, leaderboard and text_features must be 2-D, got "
            f"{image_features.shape}, {leaderboard.shape} and {text_features.shape}"
        )
    if leaderboard.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"leaderboard {leaderboard.shape} and text_features {text_features.shape} "
            "must have one row per class"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image_features {image_features.shape} and text_features "
            f"{text_features.shape} must have the same feature size"
        )

    image_features = _unit(image_features.astype(jnp.float32))
    text_features = _unit(text_features.astype(jnp.float32))
    valid = leaderboard >= 0  # [C, K]
    members = image_features[jnp.where(valid, leaderboard, 0)]  # [C, K, D]
    total = jnp.sum(members * valid[..., None], axis=1)  # [C, D]
    count = jnp.sum(valid, axis=1, keepdims=True)  # [C, 1]
    mean = total / jnp.maximum(count, 1)
    return jnp.where(count > 0, _unit(mean), text_features)


def confusion_aware_margin(
    text_features,
    prototypes,
    counts,
    *,
    scale: float,
    seen=None,
    factor: str = "reference",
) -> jax.Array:
    """Compute the confusion-aware calibrated margin matrix ``[C, C]``.

    With unit text features ``T`` and unit prototypes ``V``::

        S = max(T Tᵀ, V Vᵀ)                                   (elementwise)
        S'[c, j] = m_c + (S[c, j] - m_c) (1 - m_c) / (M_c - m_c)
                   with m_c = min_j S[c, j], M_c = max_j S[c, j]
        r_c = counts_c / max(counts), and r_c = 1 for seen classes
        Δ = (max_c r_c - min_c r_c) · scale
        margin[c, j] = f(r_c) · Δ · S'[c, j]

    ``f(r) = (1 - r) / (1 + r)`` by default, as in the PyTorch CAP code, or
    ``f(r) = 1 - r`` with ``factor="paper"``, as the CAP paper writes it. Each
    row of ``S`` is thus stretched so its maximum is 1 while its minimum stays.
    The matrix is not masked: its diagonal is usually non-zero and entries can
    be negative. :func:`cap_jax.losses.margin_cross_entropy` masks the diagonal.

    Degenerate inputs give finite outputs:

    * ``counts`` all zero (no confident pseudolabel last epoch): the margin is
      zero everywhere, also with seen classes.
    * a constant row of ``S`` (``M_c == m_c``) is left unchanged, so for unit
      features (whose diagonal is 1) it stays all ones.

    Args:
      text_features: ``[C, D]`` class text features (unit or not; normalised here).
      prototypes: ``[C, D]`` visual prototypes from :func:`class_prototypes`
        (unit or not; normalised here).
      counts: ``[C]`` confident pseudolabels per class in the last epoch (int or float).
      scale: the margin scale (12 by default in CAP; 14 for FGVCAircraft).
      seen: optional bool ``[C]``; in TRZSL, seen classes get ``r = 1`` and so a
        zero row.
      factor: ``"reference"`` or ``"paper"``, the per-class factor ``f`` above.

    Returns:
      float32 ``[C, C]`` margin; row ``y`` applies to samples labeled ``y``.
    """
    text_features = jnp.asarray(text_features)
    prototypes = jnp.asarray(prototypes)
    counts = jnp.asarray(counts)
    if text_features.ndim != 2 or prototypes.shape != text_features.shape:
        raise ValueError(
            "text_features and prototypes must both have shape [C, D], got "
            f"{text_features.shape} and {prototypes.shape}"
        )
    num_classes = text_features.shape[0]
    if counts.shape != (num_classes,):
        raise ValueError(f"counts must have shape ({num_classes},), got {counts.shape}")
    if seen is not None and jnp.shape(seen) != (num_classes,):
        raise ValueError(f"seen must have shape ({num_classes},), got {jnp.shape(seen)}")
    if factor not in _FACTORS:
        raise ValueError(f"factor must be one of {_FACTORS}, got {factor!r}")

    text_features = _unit(text_features.astype(jnp.float32))
    prototypes = _unit(prototypes.astype(jnp.float32))
    text_similarity = text_features @ text_features.T  # [C, D] @ [D, C] -> [C, C]
    visual_similarity = prototypes @ prototypes.T  # [C, D] @ [D, C] -> [C, C]
    similarity = jnp.maximum(text_similarity, visual_similarity)

    row_min = jnp.min(similarity, axis=1, keepdims=True)
    row_max = jnp.max(similarity, axis=1, keepdims=True)
    spread = row_max - row_min
    # A constant row has spread 0; dividing by 1 there leaves it unchanged.
    stretch = (1.0 - row_min) / jnp.where(spread > 0, spread, 1.0)
    similarity = row_min + (similarity - row_min) * stretch

    counts = counts.astype(jnp.float32)
    max_count = jnp.max(counts)
    ratio = counts / jnp.where(max_count > 0, max_count, 1.0)  # [C]
    if seen is not None:
        ratio = jnp.where(jnp.asarray(seen, dtype=bool), 1.0, ratio)
    delta = (jnp.max(ratio) - jnp.min(ratio)) * jnp.float32(scale)
    if factor == "reference":
        class_factor = (1.0 - ratio) / (1.0 + ratio)
    else:
        class_factor = 1.0 - ratio

    margin = class_factor[:, None] * delta * similarity
    return jnp.where(max_count > 0, margin, 0.0).astype(jnp.float32)
