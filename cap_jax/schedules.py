"""Learning-rate schedule of CAP: linear warm-up, then cosine decay to zero."""

from __future__ import annotations

import optax

__all__ = ["learning_rate_schedule"]


def learning_rate_schedule(
    base_lr: float, *, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Build the per-step learning rate: linear warm-up from 0, then cosine decay to 0.

    ``lr(t) = base_lr · t / warmup_steps`` for ``t < warmup_steps``, then
    ``lr(t) = base_lr · (1 + cos(π (t - warmup_steps) / (total_steps - warmup_steps))) / 2``,
    which reaches 0 at ``t = total_steps``. In CAP the warm-up is one epoch
    (50 steps) of 50 epochs. This is ``optax.warmup_cosine_decay_schedule``,
    whose ``decay_steps`` counts the warm-up too.

    Args:
      base_lr: the peak learning rate (0.01 in CAP).
      warmup_steps: steps of linear warm-up, ``>= 0``.
      total_steps: all training steps, ``> warmup_steps``.

    Returns:
      An optax schedule, step count to learning rate (jittable).
    """
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(
            "need 0 <= warmup_steps < total_steps, got "
            f"warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=base_lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0,
    )
