"""A controlled benchmark: CAP on a simulated vision-language model with known flaws.

No pretrained CLIP is needed. The simulated model has unit image features in class clusters.
Its class text features are faithful for most classes. A few classes are *mismatched*: the
text feature lies in the orthogonal complement of every cluster centre, so zero-shot almost
never predicts the class. Some pairs are *confused*: two clusters lie close together, and the
text feature of the dominant class leans toward the other cluster, so zero-shot predicts the
dominant class for many images of the minority class. Because the truth is known, the
benchmark measures what each part of CAP is meant to do.

The frozen towers are replaced by these features (`FeatureTowers`). In place of the MaPLe
prompts, the trainable context is a residual linear map and offset on the class text features
and a residual linear map on the image features. All start at zero, so the untrained model is
the zero-shot model. The three CAP adapters train as in a real run. Everything else is the
code of a real run: `cap_jax.train.compile_steps` (the same train step, losses and margin),
`cap_jax.loop.run_epochs` (the same streams, main-sample updates and margin schedule),
`cap_jax.pseudolabels.initial_leaderboard` and `cap_jax.concepts` for concept alignment.

Methods (`METHODS`):
  * ``zero_shot``: the frozen model.
  * ``fpl``: FPL-style, the zero-shot top-k main samples, fixed, plain cross-entropy, no
    self-training (threshold 1 keeps no unlabeled pseudolabel).
  * ``grip``: GRIP-style, as ``fpl`` but the main samples are re-selected from the current
    model's top-k after the epochs where CAP updates them, with CAP's growth schedule.
  * ``cap``: CAP (alignment, margin, self-training, two image adapters).
  * ``cap_no_alignment``, ``cap_no_margin``, ``cap_shared_adapter``: CAP without one part.

What it does not show: anything about real images, real text or pretrained CLIP, and absolute
accuracies, which depend on the simulated noise levels. The flaws are built in by hand, so the
benchmark checks the mechanisms, not how often such flaws occur in real data.

Measurements that need a common definition across methods:
  * Pseudolabel balance is measured on the whole unlabeled pool after each epoch: the classes
    that the model's main branch (prompted towers plus the main image adapter and the text
    adapter) predicts with probability above CAP's threshold, counted per class. The counts
    that the train step reports (`confident_counts` of the loop's record) exist only for
    methods with self-training, so they are kept in each run's history but not compared.
  * Test accuracy uses the prompted towers without adapters, as a real run evaluates.

NOTE: the GRIP-style baseline runs the loop in segments between its main-sample updates,
because the loop grows the main samples only from the confident pseudolabels of the
self-training stream, which the baseline switches off. Resuming at an epoch boundary is exact
in the loop (every draw is seeded by seed and epoch), so the segments train as one run would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cap_jax import adapters as adapters_lib
from cap_jax import loop as loop_lib
from cap_jax import metrics as metrics_lib
from cap_jax import pseudolabels as pseudolabels_lib
from cap_jax import schedules as schedules_lib
from cap_jax import train as train_lib

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "FeatureSource",
    "FeatureTowers",
    "Method",
    "SimulatedWorld",
    "SimulationConfig",
    "StepCache",
    "align_leaderboard",
    "confident_counts",
    "csv_rows",
    "detect_mismatched",
    "init_prompts",
    "load_config",
    "make_world",
    "markdown_table",
    "method_by_name",
    "run_method",
    "summarize",
    "zero_shot_probabilities",
]


# ----------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """The simulated model and data, and the training schedule shared by every method.

    World:
      num_classes, dim: class count C and feature size D (D must exceed C, because mismatched
        text features are drawn from the orthogonal complement of the C cluster centres).
      train_per_class, test_per_class: images per class in the unlabeled pool and the test set.
      cluster_similarity: expected cosine between two cluster centres (a shared component).
      image_noise: norm of the Gaussian noise added to a centre before normalising an image.
      text_noise: norm of the noise added to a centre to make a faithful text feature.
      num_mismatched: classes whose text feature points away from every cluster.
      num_confused_pairs: pairs of close clusters whose zero-shot predictions favour one member.
      pair_similarity: cosine between the two cluster centres of a confused pair.
      text_pull: weight of the minority centre in the dominant member's text feature.
      description_noise: norm of the noise on the description feature of a class. Every class
        has one, close to its true centre, but concept alignment uses only those of the
        detected classes.
      strong_noise, strong_keep: the strong view multiplies a clean feature by a random 0/1 mask
        (each coordinate kept with probability `strong_keep`), adds noise of norm
        `strong_noise` and renormalises.
      logit_scale: the fixed logit scale (CLIP's is 100).

    Training (the meanings of `cap_jax.config.RunConfig`):
      epochs, iterations_per_epoch, batch_size, learning_rate, momentum, weight_decay,
      warmup_epochs, threshold, n_main_samples, max_main_ratio, update_every, margin_scale,
      adapter_ratio, adapter_hidden.
    """

    num_classes: int = 20
    dim: int = 64
    train_per_class: int = 200
    test_per_class: int = 100
    cluster_similarity: float = 0.3
    image_noise: float = 1.8
    text_noise: float = 0.5
    num_mismatched: int = 2
    num_confused_pairs: int = 3
    pair_similarity: float = 0.8
    text_pull: float = 0.8
    description_noise: float = 0.5
    strong_noise: float = 1.0
    strong_keep: float = 0.8
    logit_scale: float = 100.0

    epochs: int = 20
    iterations_per_epoch: int = 20
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.1
    warmup_epochs: int = 1
    threshold: float = 0.85
    n_main_samples: int = 16
    max_main_ratio: float = 0.8
    update_every: int = 5
    margin_scale: float = 12.0
    adapter_ratio: float = 0.01
    adapter_hidden: int = 16

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.dim <= self.num_classes:
            raise ValueError(
                f"dim ({self.dim}) must exceed num_classes ({self.num_classes}): mismatched "
                "text features lie in the complement of the cluster centres")
        used = self.num_mismatched + 2 * self.num_confused_pairs
        if self.num_mismatched < 0 or self.num_confused_pairs < 0 or used > self.num_classes:
            raise ValueError(
                f"num_mismatched ({self.num_mismatched}) + 2 * num_confused_pairs "
                f"({self.num_confused_pairs}) must lie in [0, num_classes={self.num_classes}]")
        if not 0.0 <= self.cluster_similarity < 1.0 or not 0.0 <= self.pair_similarity < 1.0:
            raise ValueError(
                "cluster_similarity and pair_similarity must lie in [0, 1), got "
                f"{self.cluster_similarity} and {self.pair_similarity}")
        if not 0.0 < self.strong_keep <= 1.0:
            raise ValueError(f"strong_keep must lie in (0, 1], got {self.strong_keep}")
        for key in ("train_per_class", "test_per_class", "epochs", "iterations_per_epoch",
                    "batch_size", "n_main_samples", "update_every", "adapter_hidden"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.n_main_samples > self.train_per_class:
            raise ValueError(
                f"n_main_samples ({self.n_main_samples}) exceeds train_per_class "
                f"({self.train_per_class})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> SimulationConfig:
    """Read a `SimulationConfig` from a JSON file (or the defaults) and apply `key=value` overrides.

    Values of overrides are parsed as JSON when they parse. An unknown key raises ValueError.
    """
    values: dict[str, Any] = {}
    if path:
        with open(path) as f:
            values.update(json.load(f))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    fields = {f.name for f in dataclasses.fields(SimulationConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(
            f"unknown simulation setting(s) {unknown}; valid keys are: {', '.join(sorted(fields))}")
    return SimulationConfig(**values)


# ----------------------------------------------------------------------------------------------
# The simulated world.


@dataclasses.dataclass
class SimulatedWorld:
    """Features and ground truth of one simulated task (all features unit, float32).

    Attributes:
      centers: [C, D] true cluster centres.
      text_features: [C, D] the frozen class text features (with the built-in flaws).
      descriptions: [C, D] description features, close to the true centres.
      train_features, train_labels: [N, D] and [N] the unlabeled pool (labels only to score).
      test_features, test_labels: [M, D] and [M].
      mismatched: [m] ids of the mismatched classes.
      confused_pairs: [P, 2] ids (dominant, minority) of each confused pair.
    """

    centers: np.ndarray
    text_features: np.ndarray
    descriptions: np.ndarray
    train_features: np.ndarray
    train_labels: np.ndarray
    test_features: np.ndarray
    test_labels: np.ndarray
    mismatched: np.ndarray
    confused_pairs: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.centers.shape[0]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _random_unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return _unit(rng.normal(size=shape))


def _images(rng: np.random.Generator, centers: np.ndarray, labels: np.ndarray,
            noise: float) -> np.ndarray:
    dim = centers.shape[1]
    # Noise of norm about `noise`: each coordinate has variance noise^2 / D.
    return _unit(centers[labels] + noise * rng.normal(size=(labels.size, dim)) / np.sqrt(dim))


def make_world(config: SimulationConfig, seed: int) -> SimulatedWorld:
    """Draw a simulated task: clusters, flawed text features, descriptions, pool and test set.

    Which classes are mismatched or confused is drawn at random, so class ids carry no meaning.
    """
    rng = np.random.default_rng([seed, 7919])
    num_classes, dim = config.num_classes, config.dim

    shared = _random_unit(rng, (dim,))
    own = _random_unit(rng, (num_classes, dim))
    s = config.cluster_similarity
    centers = _unit(np.sqrt(s) * shared + np.sqrt(1.0 - s) * own)

    order = rng.permutation(num_classes)
    mismatched = np.sort(order[:config.num_mismatched])
    pair_ids = order[config.num_mismatched:config.num_mismatched + 2 * config.num_confused_pairs]
    confused_pairs = pair_ids.reshape(-1, 2)

    # The minority centre of a pair sits at cosine `pair_similarity` from the dominant one.
    p = config.pair_similarity
    for dominant, minority in confused_pairs:
        away = centers[minority] - (centers[minority] @ centers[dominant]) * centers[dominant]
        away = away / np.linalg.norm(away)
        centers[minority] = _unit(p * centers[dominant] + np.sqrt(1.0 - p * p) * away)

    text = _unit(centers + config.text_noise * _random_unit(rng, (num_classes, dim)))
    for dominant, minority in confused_pairs:
        text[dominant] = _unit(centers[dominant] + config.text_pull * centers[minority]
                               + config.text_noise * _random_unit(rng, (dim,)))
    # A mismatched text feature has no component along any cluster centre.
    basis, _ = np.linalg.qr(centers.T.astype(np.float64), mode="complete")  # [D, D]
    complement = basis[:, num_classes:]  # [D, D - C]
    for c in mismatched:
        text[c] = _unit(complement @ rng.normal(size=dim - num_classes))

    descriptions = _unit(centers + config.description_noise * _random_unit(rng, (num_classes, dim)))

    train_labels = np.repeat(np.arange(num_classes), config.train_per_class)
    train_labels = train_labels[rng.permutation(train_labels.size)]
    test_labels = np.repeat(np.arange(num_classes), config.test_per_class)
    return SimulatedWorld(
        centers=centers.astype(np.float32),
        text_features=text.astype(np.float32),
        descriptions=descriptions,
        train_features=_images(rng, centers, train_labels, config.image_noise),
        train_labels=train_labels.astype(np.int64),
        test_features=_images(rng, centers, test_labels, config.image_noise),
        test_labels=test_labels.astype(np.int64),
        mismatched=mismatched.astype(np.int64),
        confused_pairs=confused_pairs.astype(np.int64),
    )


# ----------------------------------------------------------------------------------------------
# Towers and image source for the real train step.


@dataclasses.dataclass(frozen=True)
class FeatureTowers:
    """Simulated towers: the frozen features with a trainable residual context.

    `frozen` contains `text_features` [C, D]. The "images" are image feature vectors [B, D].
    `prompts` is the tree from `init_prompts`:
      text = t + t @ text.kernel + text.bias,   image = x + x @ image.kernel.
    """

    def text_features(self, frozen: Any, prompts: Any) -> jax.Array:
        text = frozen["text_features"].astype(jnp.float32)
        # [C, D] @ [D, D] -> [C, D]
        return text + text @ prompts["text"]["kernel"] + prompts["text"]["bias"]

    def image_features(self, frozen: Any, prompts: Any, images: jax.Array) -> jax.Array:
        images = images.astype(jnp.float32)
        # [B, D] @ [D, D] -> [B, D]
        return images + images @ prompts["image"]["kernel"]


def init_prompts(dim: int) -> dict[str, Any]:
    """Return the simulated context, all zeros, so the untrained towers are the frozen ones."""
    return {
        "text": {"kernel": jnp.zeros((dim, dim), jnp.float32),
                 "bias": jnp.zeros((dim,), jnp.float32)},
        "image": {"kernel": jnp.zeros((dim, dim), jnp.float32)},
    }


@dataclasses.dataclass
class FeatureSource:
    """Clean and strongly augmented views of simulated image features (a loop ImageSource)."""

    features: np.ndarray
    strong_noise: float
    strong_keep: float

    def clean(self, ids: np.ndarray) -> np.ndarray:
        return self.features[np.asarray(ids)]

    def strong(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        clean = self.features[np.asarray(ids)]
        keep = rng.random(clean.shape) < self.strong_keep
        noise = rng.normal(size=clean.shape) * (self.strong_noise / np.sqrt(clean.shape[1]))
        return _unit(clean * keep + noise)


def zero_shot_probabilities(features: np.ndarray, text_features: np.ndarray,
                            logit_scale: float) -> np.ndarray:
    """Return softmax(scale * x t^T) of unit features, float32 [N, C]."""
    logits = logit_scale * features @ text_features.T  # [N, D] @ [D, C] -> [N, C]
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Concept alignment.


def detect_mismatched(world: SimulatedWorld, *, logit_scale: float, seed: int = 0) -> np.ndarray:
    """Return the classes `cap_jax.concepts.detect_mismatched_classes` flags in `world`, int [m].

    Detection uses the pool's image features, the frozen text features and the zero-shot
    predictions, as a real run does. It does not depend on the method, so callers may reuse it.
    """
    from cap_jax import concepts

    probs = zero_shot_probabilities(world.train_features, world.text_features, logit_scale)
    report = concepts.detect_mismatched_classes(
        world.train_features, world.text_features, probs.argmax(axis=1), seed=seed)
    return np.asarray(report.class_ids, np.int64)


def align_leaderboard(world: SimulatedWorld, board: np.ndarray, detected: np.ndarray, *,
                      k: int) -> np.ndarray:
    """Replace the main samples of each detected class by the `k` images nearest its description.

    The retrieval is `cap_jax.concepts.align_main_samples` with the class's description feature
    (every simulated class has one, close to its true cluster centre).

    Returns:
      The new int [C, max(K, k)] board, -1 padded.
    """
    from cap_jax import concepts

    board = np.asarray(board, np.int64)
    if board.shape[1] < k:
        board = np.concatenate([board, np.full((board.shape[0], k - board.shape[1]), -1)], 1)
    board = board.copy()
    for c in np.asarray(detected, np.int64):
        row = np.full(board.shape[1], -1, np.int64)
        row[:k] = concepts.align_main_samples(world.descriptions[c], world.train_features, k)
        board[c] = row
    return board


# ----------------------------------------------------------------------------------------------
# Methods.


@dataclasses.dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
      name: short id used in tables.
      label: human-readable name.
      train: False for the frozen zero-shot model.
      self_training: use CAP's unlabeled loss at the configured threshold (else threshold 1,
        which keeps no unlabeled pseudolabel, so the main samples never grow in the loop).
      use_margin: the confusion-aware margin from the second epoch on.
      align: concept alignment of the initial main samples.
      regrow: re-select the main samples from the model's own top-k (GRIP-style) instead of
        growing them from confident pseudolabels.
      shared_adapter: one image adapter for both branches.
    """

    name: str
    label: str
    train: bool = True
    self_training: bool = True
    use_margin: bool = True
    align: bool = True
    regrow: bool = False
    shared_adapter: bool = False


METHODS: tuple[Method, ...] = (
    Method("zero_shot", "zero-shot", train=False, self_training=False, use_margin=False,
           align=False),
    Method("fpl", "FPL-style (fixed top-k, CE)", self_training=False, use_margin=False,
           align=False),
    Method("grip", "GRIP-style (growing top-k, CE)", self_training=False, use_margin=False,
           align=False, regrow=True),
    Method("cap", "CAP"),
    Method("cap_no_alignment", "CAP without alignment", align=False),
    Method("cap_no_margin", "CAP without margin", use_margin=False),
    Method("cap_shared_adapter", "CAP with one shared adapter", shared_adapter=True),
)


def method_by_name(name: str) -> Method:
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"unknown method {name!r}; known: {', '.join(m.name for m in METHODS)}")


# ----------------------------------------------------------------------------------------------
# Running one method.


class StepCache:
    """Compiled steps keyed by what they bind, so seeds and ablations reuse compilations."""

    def __init__(self, config: SimulationConfig, devices: list | None = None):
        self.config = config
        self.devices = list(devices or jax.local_devices())
        total_steps = config.epochs * config.iterations_per_epoch
        self.tx = train_lib.make_optimizer(
            learning_rate=config.learning_rate, momentum=config.momentum,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_epochs * config.iterations_per_epoch,
            total_steps=total_steps)
        self.towers = FeatureTowers()
        self._steps: dict[tuple, train_lib.CompiledSteps] = {}

    def get(self, threshold: float, shared_adapter: bool) -> train_lib.CompiledSteps:
        key = (float(threshold), bool(shared_adapter))
        if key not in self._steps:
            self._steps[key] = train_lib.compile_steps(
                towers=self.towers, tx=self.tx, threshold=threshold,
                adapter_ratio=self.config.adapter_ratio, shared_adapter=shared_adapter,
                devices=self.devices)
        return self._steps[key]


def _batch_for(num_devices: int, size: int) -> int:
    return max(num_devices, size - size % num_devices)


def _branch_probabilities(steps: train_lib.CompiledSteps, frozen_r: Any, params_r: Any,
                          features: np.ndarray, logit_scale: float,
                          feature_batch: int) -> np.ndarray:
    """Class probabilities of the main branch (prompted towers, main and text adapters)."""
    text = np.asarray(steps.text_features(frozen_r, params_r, True))[0]
    image = loop_lib.pooled_features(
        lambda images: steps.image_features(frozen_r, params_r, images, "visual"),
        lambda ids: features[ids], np.arange(features.shape[0]), batch_size=feature_batch,
        num_devices=steps.num_devices)
    return zero_shot_probabilities(image, text, logit_scale)


def _test_predictions(steps: train_lib.CompiledSteps, frozen_r: Any, params_r: Any,
                      features: np.ndarray, feature_batch: int) -> np.ndarray:
    """Predictions of the prompted towers without adapters, as a real run evaluates."""
    text = np.asarray(steps.text_features(frozen_r, params_r, False))[0]
    image = loop_lib.pooled_features(
        lambda images: steps.image_features(frozen_r, params_r, images, None),
        lambda ids: features[ids], np.arange(features.shape[0]), batch_size=feature_batch,
        num_devices=steps.num_devices)
    return np.argmax(image @ text.T, axis=-1)  # [M, D] @ [D, C] -> [M, C]


def confident_counts(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Count, per class, the rows whose top probability exceeds `threshold`: int [C]."""
    confident = probs.max(axis=1) > threshold
    return np.bincount(probs.argmax(axis=1)[confident], minlength=probs.shape[1])


def _scores(world: SimulatedWorld, predictions: np.ndarray, pool_probs: np.ndarray,
            threshold: float) -> dict[str, Any]:
    """Test accuracies by class group and the pool's pseudolabel balance."""
    num_classes = world.num_classes
    per_class = metrics_lib.per_class_accuracy(predictions, world.test_labels,
                                               num_classes=num_classes)
    counts = confident_counts(pool_probs, threshold)
    balance = metrics_lib.pseudolabel_balance(counts)
    pool_predictions = pool_probs.argmax(axis=1)
    confident = pool_probs.max(axis=1) > threshold
    pairs = world.confused_pairs
    return {
        "test_accuracy": metrics_lib.accuracy(predictions, world.test_labels),
        "mismatched_accuracy": float(np.mean(per_class[world.mismatched]))
        if world.mismatched.size else math.nan,
        "confused_accuracy": float(np.mean(per_class[pairs.ravel()])) if pairs.size else math.nan,
        "confused_minority_accuracy": float(np.mean(per_class[pairs[:, 1]]))
        if pairs.size else math.nan,
        "per_class_accuracy": per_class.tolist(),
        "pool_counts": counts.tolist(),
        "balance_min_over_max": balance["min_over_max"],
        "balance_entropy": balance["entropy"],
        "balance_normalized_entropy": balance["normalized_entropy"],
        "pseudolabel_accuracy": float(np.mean(
            pool_predictions[confident] == world.train_labels[confident]))
        if confident.any() else math.nan,
    }


def run_method(world: SimulatedWorld, method: Method, config: SimulationConfig, seed: int, *,
               cache: StepCache | None = None,
               detected: np.ndarray | None = None) -> dict[str, Any]:
    """Train (or, for zero-shot, only score) one method on one simulated world.

    Args:
      world: the simulated task.
      method: what to run.
      config: sizes and training schedule.
      seed: seeds the adapters' initialisation and every draw of the loop.
      cache: compiled steps to reuse across calls (one is made when None).
      detected: the classes detected as mismatched in `world` (from `detect_mismatched`),
        to reuse across methods; detected here when None and the method aligns.

    Returns:
      A dict of scores (see `_scores`) plus `method`, `seed`, `seconds`, `detected` (classes
      detected as mismatched, when the method aligns), `initial_main_sample_accuracy` and
      `history`: one entry per epoch with the pool's confident `pool_counts`, and for trained
      methods the loop's `loss`, `kept_fraction`, `confident_counts`, `main_samples` and
      `main_sample_accuracy`.
    """
    started = time.time()
    cache = cache or StepCache(config)
    num_classes = world.num_classes
    probs = zero_shot_probabilities(world.train_features, world.text_features,
                                    config.logit_scale)

    if not method.train:
        predictions = np.argmax(world.test_features @ world.text_features.T, axis=-1)
        result = _scores(world, predictions, probs, config.threshold)
        counts = result["pool_counts"]
        result["history"] = [{"epoch": e, "pool_counts": counts} for e in range(config.epochs)]
        result.update(method=method.name, seed=seed, detected=[],
                      initial_main_sample_accuracy=math.nan, seconds=time.time() - started)
        return result

    board = np.asarray(pseudolabels_lib.initial_leaderboard(probs, config.n_main_samples),
                       np.int64)
    if not method.align:
        detected = np.zeros(0, np.int64)
    elif detected is None:
        detected = detect_mismatched(world, logit_scale=config.logit_scale)
    if method.align:
        board = align_leaderboard(world, board, detected, k=config.n_main_samples)
    members, classes = loop_lib.board_members(board)
    initial_accuracy = float(np.mean(world.train_labels[members] == classes))

    threshold = config.threshold if method.self_training else 1.0
    steps = cache.get(threshold, method.shared_adapter)
    devices = cache.devices
    if config.batch_size % len(devices):
        raise ValueError(
            f"batch_size {config.batch_size} does not divide over {len(devices)} devices")
    feature_batch = _batch_for(len(devices), 256)

    adapter_rng = jax.random.fold_in(jax.random.key(seed), 1)
    params = {"prompts": init_prompts(config.dim),
              "adapters": adapters_lib.init_adapters(adapter_rng, config.dim,
                                                     hidden=config.adapter_hidden)}
    state_r = train_lib.replicate(train_lib.create_train_state(params, cache.tx), devices)
    frozen = {"text_features": world.text_features,
              "logit_scale": np.float32(config.logit_scale)}
    frozen_r = train_lib.replicate(frozen, devices)

    source = FeatureSource(world.train_features, config.strong_noise, config.strong_keep)
    streams = loop_lib.Streams(unlabeled_ids=np.arange(world.train_features.shape[0]),
                               pool_labels=world.train_labels)
    # With `regrow` the loop's own update fires only after epoch 0, where threshold 1 gives no
    # candidates, so it keeps the board. The re-selection happens between loop segments.
    settings = loop_lib.LoopSettings(
        epochs=config.epochs, iterations_per_epoch=config.iterations_per_epoch,
        batch_size=config.batch_size, seed=seed, n_main_samples=config.n_main_samples,
        max_main_ratio=config.max_main_ratio,
        update_every=config.epochs + 1 if method.regrow else config.update_every,
        margin_scale=config.margin_scale, use_margin=method.use_margin,
        eval_every=config.epochs, feature_batch_size=feature_batch)
    schedule = schedules_lib.learning_rate_schedule(
        config.learning_rate, warmup_steps=config.warmup_epochs * config.iterations_per_epoch,
        total_steps=config.epochs * config.iterations_per_epoch)
    history: list[dict[str, Any]] = []

    def on_epoch_end(state, next_loop_state, record):
        pool_probs = _branch_probabilities(steps, frozen_r, state.params, world.train_features,
                                           config.logit_scale, feature_batch)
        history.append({
            "epoch": int(record["epoch"]),
            "pool_counts": confident_counts(pool_probs, config.threshold).tolist(),
            "loss": float(record["loss"]),
            "kept_fraction": float(record["kept_fraction"]),
            "confident_counts": list(record["confident_counts"]),
            "main_samples": int(record["main_samples"]),
            "main_sample_accuracy": float(record["main_sample_accuracy"]),
        })

    loop_state = loop_lib.LoopState(epoch=0, leaderboard=board,
                                    counts=np.zeros(num_classes, np.int64))
    unlabeled_per_class = streams.unlabeled_ids.size // num_classes
    for end in _segment_ends(config, method):
        segment = dataclasses.replace(settings, epochs=end)
        state_r, loop_state = loop_lib.run_epochs(
            steps=steps, state_r=state_r, frozen_r=frozen_r, source=source, streams=streams,
            loop_state=loop_state, settings=segment, learning_rate=schedule,
            evaluate=None, on_epoch_end=on_epoch_end, prefetch=None, progress=False)
        if method.regrow and end < config.epochs:
            k = pseudolabels_lib.main_sample_count(
                end - 1, n_main_samples=config.n_main_samples,
                max_main_ratio=config.max_main_ratio, epochs=config.epochs,
                unlabeled_per_class=unlabeled_per_class)
            model_probs = _branch_probabilities(steps, frozen_r, state_r.params,
                                                world.train_features, config.logit_scale,
                                                feature_batch)
            board = np.asarray(pseudolabels_lib.initial_leaderboard(model_probs, k), np.int64)
            loop_state = dataclasses.replace(loop_state, leaderboard=board)

    predictions = _test_predictions(steps, frozen_r, state_r.params, world.test_features,
                                    feature_batch)
    pool_probs = _branch_probabilities(steps, frozen_r, state_r.params, world.train_features,
                                       config.logit_scale, feature_batch)
    result = _scores(world, predictions, pool_probs, config.threshold)
    result.update(method=method.name, seed=seed, detected=detected.tolist(),
                  initial_main_sample_accuracy=initial_accuracy, history=history,
                  seconds=time.time() - started)
    return result


def _segment_ends(config: SimulationConfig, method: Method) -> list[int]:
    """Epoch counts at which to stop the loop: the end, or after each GRIP-style update."""
    if not method.regrow:
        return [config.epochs]
    updates = [e + 1 for e in range(0, config.epochs - 1, config.update_every)]
    return sorted(set(updates + [config.epochs]))


# ----------------------------------------------------------------------------------------------
# Summaries.

SUMMARY_METRICS = (
    ("test_accuracy", "test acc."),
    ("mismatched_accuracy", "mismatched acc."),
    ("confused_accuracy", "confused-pair acc."),
    ("confused_minority_accuracy", "confused minority acc."),
    ("balance_min_over_max", "balance min/max"),
    ("balance_normalized_entropy", "balance entropy (norm.)"),
    ("pseudolabel_accuracy", "pseudolabel acc."),
)


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Average each method's scores over seeds: one row per method, in `METHODS` order.

    Each row contains `method`, `label`, `seeds`, and for every metric of `SUMMARY_METRICS` its
    `<metric>_mean` and `<metric>_std` over seeds (population standard deviation, NaN ignored).
    """
    rows = []
    for method in METHODS:
        runs = [r for r in results if r["method"] == method.name]
        if not runs:
            continue
        row: dict[str, Any] = {"method": method.name, "label": method.label, "seeds": len(runs)}
        for key, _ in SUMMARY_METRICS:
            values = np.array([r[key] for r in runs], np.float64)
            finite = values[np.isfinite(values)]
            row[f"{key}_mean"] = float(finite.mean()) if finite.size else math.nan
            row[f"{key}_std"] = float(finite.std()) if finite.size else math.nan
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Format summary rows as a markdown table of mean ± std."""
    header = ["method"] + [title for _, title in SUMMARY_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"]]
        for key, _ in SUMMARY_METRICS:
            mean, std = row[f"{key}_mean"], row[f"{key}_std"]
            cells.append("n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Return (header, rows) for a CSV file of the summary."""
    header = ["method", "seeds"]
    for key, _ in SUMMARY_METRICS:
        header += [f"{key}_mean", f"{key}_std"]
    table = [[row["method"], row["seeds"]] + [row[h] for h in header[2:]] for row in rows]
    return header, table
