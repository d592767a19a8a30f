"""cap_jax: CAP (concept alignment and confusion-aware calibrated margin) for CLIP, in JAX.

Public modules:
  pseudolabels  initial_leaderboard, epoch_leaderboard, main_sample_count, update_main_samples
  margin        class_prototypes, confusion_aware_margin
  losses        margin_cross_entropy, self_training_loss
  adapters      init_adapters, apply_adapter, adapters_from_state_dict
  concepts      detect_mismatched_classes, choose_description, align_main_samples
  schedules     learning_rate_schedule
  metrics       accuracy, per_class_accuracy, harmonic_mean, pseudolabel_balance
  clip          load (CLIP towers with MaPLe prompt slots, weight loading)
  prompts       init_prompt_params, class_prompt_inputs, prompted_text_features, ...
  train         train_step, compile_steps, make_optimizer, TrainState
  run           run (a whole CAP run from a config); the `cap-jax` command is cap_jax.cli
"""

from cap_jax import adapters, concepts, losses, margin, metrics, pseudolabels, schedules
from cap_jax.adapters import adapters_from_state_dict, apply_adapter, init_adapters
from cap_jax.concepts import align_main_samples, choose_description, detect_mismatched_classes
from cap_jax.losses import margin_cross_entropy, self_training_loss
from cap_jax.margin import class_prototypes, confusion_aware_margin
from cap_jax.pseudolabels import (
    epoch_leaderboard,
    initial_leaderboard,
    main_sample_count,
    update_main_samples,
)

__version__ = "0.1.0"

__all__ = [
    "adapters",
    "adapters_from_state_dict",
    "align_main_samples",
    "apply_adapter",
    "choose_description",
    "class_prototypes",
    "concepts",
    "confusion_aware_margin",
    "detect_mismatched_classes",
    "epoch_leaderboard",
    "init_adapters",
    "initial_leaderboard",
    "losses",
    "main_sample_count",
    "margin",
    "margin_cross_entropy",
    "metrics",
    "pseudolabels",
    "schedules",
    "self_training_loss",
    "update_main_samples",
]
