"""The CAP epoch loop: streams, margin, main-sample updates, evaluation hooks.

Host-side logic around the compiled step of `cap_jax.train`. It does no file I/O itself: the
caller passes image sources and callbacks for evaluation and for the end of each epoch
(metrics, checkpoints). Everything an epoch draws is seeded by (seed, epoch, iteration), so a
run resumed at an epoch boundary repeats exactly what the uninterrupted run would have done.

Differences from the PyTorch reference, kept on purpose:
  * Every stream yields full batches (main samples cycle through reshuffled orders instead of
    ending on a short batch), so the step is compiled once.
  * The stream orders are drawn afresh each epoch from the seed instead of continuing one
    endless iterator, which makes resuming exact without saving iterator state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterator, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from cap_jax import margin as margin_lib
from cap_jax import pseudolabels as pseudolabels_lib
from cap_jax import train as train_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss or logits, an epoch's margin or the parameters are not finite.

    The run stops before the checkpoint of that epoch, so the last checkpoint on disk contains
    finite parameters.
    """


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in leaves]))


class ImageSource(Protocol):
    """Model-ready inputs of a pool of images, addressed by integer ids."""

    def clean(self, ids: np.ndarray) -> np.ndarray:
        """Return the clean (evaluation) view of the images `ids`, stacked."""

    def strong(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return strongly augmented views of the images `ids`, stacked."""


@dataclasses.dataclass
class LoopState:
    """The host-side state that the next epoch needs, saved with every checkpoint.

    Attributes:
      epoch: the next epoch to run.
      leaderboard: [C, K] int main samples per class (pool ids, best first, -1 padded).
      counts: [C] int confident pseudolabels per class in the last finished epoch.
    """

    epoch: int
    leaderboard: np.ndarray
    counts: np.ndarray


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Hyperparameters of the epoch loop (bound from the run config)."""

    epochs: int
    iterations_per_epoch: int
    batch_size: int
    seed: int
    n_main_samples: int
    max_main_ratio: float
    update_every: int
    margin_scale: float
    use_margin: bool = True
    eval_every: int = 10
    feature_batch_size: int = 64


@dataclasses.dataclass
class Streams:
    """Pool ids of the images each stream draws from.

    Attributes:
      unlabeled_ids: [U] pool ids of the unlabeled images.
      labeled_ids: [L] pool ids of the labeled images, or None (UL).
      labeled_labels: [L] their class ids.
      seen: [C] bool, classes whose leaderboard is fixed (TRZSL seen classes), or None.
      pool_labels: [N] true labels of the pool where known, used only to report pseudolabel
        accuracy; None when unknown.
    """

    unlabeled_ids: np.ndarray
    labeled_ids: Optional[np.ndarray] = None
    labeled_labels: Optional[np.ndarray] = None
    seen: Optional[np.ndarray] = None
    pool_labels: Optional[np.ndarray] = None


def board_members(leaderboard: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (pool ids, class ids) of every leaderboard entry, row by row."""
    classes, slots = np.nonzero(leaderboard >= 0)
    return leaderboard[classes, slots].astype(np.int64), classes.astype(np.int64)


def _cycle(order_fn: Callable[[], np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Yield index batches from successive orders, a full batch every time."""
    buffer = np.zeros(0, np.int64)
    while True:
        while buffer.size < batch_size:
            buffer = np.concatenate([buffer, order_fn()])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def epoch_batches(source: ImageSource, streams: Streams, leaderboard: np.ndarray,
                  settings: LoopSettings, epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield the host batches of one epoch: main samples, unlabeled weak/strong, labeled."""
    rng = np.random.default_rng([settings.seed, epoch])
    main_rng, unlabeled_rng, labeled_rng = rng.spawn(3)
    main_board = leaderboard
    if streams.seen is not None:
        # Seen classes' boards hold labeled images for the prototypes only; those images train
        # through the labeled stream.
        main_board = np.where(streams.seen[:, None], -1, leaderboard)
    main_ids, main_labels = board_members(main_board)
    if main_ids.size == 0:
        raise ValueError("the main-sample leaderboard is empty: no class has a main sample")
    batch = settings.batch_size
    main_iter = _cycle(lambda: main_rng.permutation(main_ids.size), batch)
    if streams.unlabeled_ids.size < batch:
        raise ValueError(
            f"only {streams.unlabeled_ids.size} unlabeled images for a batch of {batch}")
    unlabeled_iter = _cycle(lambda: unlabeled_rng.permutation(streams.unlabeled_ids), batch)
    labeled_iter = None
    if streams.labeled_ids is not None:
        labeled_iter = _cycle(lambda: labeled_rng.permutation(streams.labeled_ids.size), batch)

    for iteration in range(settings.iterations_per_epoch):
        picks = next(main_iter)
        unlabeled = next(unlabeled_iter)
        augment_rng = np.random.default_rng([settings.seed, epoch, iteration, 1])
        host = {
            "main_images": source.clean(main_ids[picks]),
            "main_labels": main_labels[picks].astype(np.int32),
            "weak_images": source.clean(unlabeled),
            "strong_images": source.strong(unlabeled, augment_rng),
            "unlabeled_ids": unlabeled.astype(np.int32),
        }
        if labeled_iter is not None:
            chosen = next(labeled_iter)
            host["labeled_images"] = source.clean(streams.labeled_ids[chosen])
            host["labeled_labels"] = streams.labeled_labels[chosen].astype(np.int32)
        yield host


def pooled_features(compute: Callable[[np.ndarray], Any], load: Callable[[np.ndarray], Any],
                    ids: np.ndarray, *, batch_size: int, num_devices: int) -> np.ndarray:
    """Run a pmapped feature function over `ids` in fixed-size batches; return [len(ids), D].

    The last batch is padded by repeating its first id so the compiled function gets one shape.
    """
    if batch_size % num_devices:
        raise ValueError(f"feature batch {batch_size} does not divide over {num_devices} devices")
    outputs = []
    for start in range(0, ids.size, batch_size):
        chunk = ids[start:start + batch_size]
        padded = np.concatenate([chunk, np.full(batch_size - chunk.size, chunk[0])])
        images = load(padded)
        images = images.reshape((num_devices, batch_size // num_devices) + images.shape[1:])
        features = compute(images)
        outputs.append(np.asarray(features).reshape(batch_size, -1)[:chunk.size])
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def epoch_margin(steps: train_lib.CompiledSteps, frozen_r: Any, params_r: Any,
                 source: ImageSource, leaderboard: np.ndarray, counts: np.ndarray,
                 settings: LoopSettings, seen: Optional[np.ndarray]) -> np.ndarray:
    """Compute the confusion-aware margin at the start of an epoch.

    Prototypes average the main samples' unit features (prompted image tower and main adapter);
    the class features come from the prompted text tower without adapter.
    """
    num_classes = leaderboard.shape[0]
    text = np.asarray(steps.text_features(frozen_r, params_r, False))[0]
    member_ids = np.unique(leaderboard[leaderboard >= 0])
    if member_ids.size:
        features = pooled_features(
            lambda images: steps.image_features(frozen_r, params_r, images, "visual"),
            source.clean, member_ids, batch_size=settings.feature_batch_size,
            num_devices=steps.num_devices)
    else:
        # One zero row to gather from: class_prototypes cannot index an empty array, and every
        # class without members falls back to its text feature anyway.
        features = np.zeros((1, text.shape[1]), np.float32)
    position = {int(i): p for p, i in enumerate(member_ids)}
    local_board = np.vectorize(lambda i: position.get(int(i), -1), otypes=[np.int64])(
        leaderboard) if leaderboard.size else leaderboard
    prototypes = margin_lib.class_prototypes(features, local_board, text)
    margin = margin_lib.confusion_aware_margin(
        text, prototypes, counts, scale=settings.margin_scale, seen=seen)
    margin = np.asarray(margin, np.float32)
    if margin.shape != (num_classes, num_classes):
        raise ValueError(f"margin has shape {margin.shape}, expected {(num_classes,) * 2}")
    return margin


def update_leaderboard(leaderboard: np.ndarray, confident: dict[str, np.ndarray], epoch: int,
                       settings: LoopSettings, unlabeled_per_class: int,
                       seen: Optional[np.ndarray]) -> np.ndarray:
    """Grow each class's main samples from this epoch's confident predictions.

    New candidates come first, best first, then the previous members, cut to the schedule's k.
    Seen classes (TRZSL) keep their boards of labeled images.
    """
    num_classes = leaderboard.shape[0]
    current = leaderboard[leaderboard >= 0]
    candidates = pseudolabels_lib.epoch_leaderboard(
        confident["pseudolabels"], confident["confidences"], confident["ids"],
        num_classes=num_classes, exclude=current)
    k = pseudolabels_lib.main_sample_count(
        epoch, n_main_samples=settings.n_main_samples, max_main_ratio=settings.max_main_ratio,
        epochs=settings.epochs, unlabeled_per_class=unlabeled_per_class)
    updated = np.asarray(pseudolabels_lib.update_main_samples(
        np.asarray(leaderboard), np.asarray(candidates), k))
    if seen is not None and seen.any():
        width = max(updated.shape[1], leaderboard.shape[1])
        updated = _pad_columns(updated, width)
        fixed = _pad_columns(leaderboard, width)
        updated[seen] = fixed[seen]
    return updated


def _pad_columns(board: np.ndarray, width: int) -> np.ndarray:
    board = np.asarray(board, np.int64)
    if board.shape[1] >= width:
        return board.copy()
    pad = np.full((board.shape[0], width - board.shape[1]), -1, np.int64)
    return np.concatenate([board, pad], axis=1)


def run_epochs(*, steps: train_lib.CompiledSteps, state_r: Any, frozen_r: Any,
               source: ImageSource, streams: Streams, loop_state: LoopState,
               settings: LoopSettings, learning_rate: Callable[[int], float],
               evaluate: Optional[Callable[[Any], dict]] = None,
               on_epoch_end: Optional[Callable[[Any, LoopState, dict], None]] = None,
               prefetch: Optional[Callable[[Iterator], Iterator]] = None,
               progress: bool = True) -> tuple[Any, LoopState]:
    """Train from `loop_state.epoch` to `settings.epochs`.

    Args:
      steps: compiled steps from `cap_jax.train.compile_steps`.
      state_r: the replicated train state.
      frozen_r: replicated frozen inputs (CLIP parameters, prompt inputs, logit scale).
      source: the training pool's images.
      streams: pool ids of each stream.
      loop_state: where to start; not modified.
      settings: loop hyperparameters.
      learning_rate: schedule, step -> learning rate (for the log only).
      evaluate: called with the replicated params after epochs `eval_every - 1, ...` and the
        last; returns a dict merged into that epoch's record.
      on_epoch_end: called with (state_r, next loop state, record) after every epoch; the run
        uses it to write metrics and checkpoints.
      prefetch: wraps the host batch iterator (a background thread in real runs).
      progress: show a progress bar over the iterations of each epoch.

    Returns:
      The final replicated state and loop state.

    Raises:
      NonFiniteLossError: when a step's loss or logits are not finite; the state of the last
        finished epoch is what `on_epoch_end` saw last.
    """
    from tqdm.auto import tqdm

    num_classes = loop_state.leaderboard.shape[0]
    num_devices = steps.num_devices
    unlabeled_per_class = streams.unlabeled_ids.size // max(
        1, num_classes - (int(streams.seen.sum()) if streams.seen is not None else 0))
    leaderboard = loop_state.leaderboard
    counts = loop_state.counts

    for epoch in range(loop_state.epoch, settings.epochs):
        started = time.time()
        params_r = state_r.params
        if epoch > 0 and settings.use_margin:
            margin = epoch_margin(steps, frozen_r, params_r, source, leaderboard, counts,
                                  settings, streams.seen)
        else:
            margin = np.zeros((num_classes, num_classes), np.float32)
        if not np.isfinite(margin).all():
            raise NonFiniteLossError(
                f"the margin at the start of epoch {epoch} is not finite; the parameters or "
                f"features of the main samples hold NaN or infinity")
        margin_r = np.broadcast_to(margin, (num_devices,) + margin.shape)

        batches = epoch_batches(source, streams, leaderboard, settings, epoch)
        if prefetch is not None:
            batches = prefetch(batches)
        sums = {"loss": 0.0, "main_loss": 0.0, "labeled_loss": 0.0, "unlabeled_loss": 0.0,
                "kept_fraction": 0.0}
        epoch_counts = np.zeros(num_classes, np.int64)
        confident = {"pseudolabels": [], "confidences": [], "ids": []}
        pending = None

        def collect(item):
            nonlocal epoch_counts
            iteration, ids, metrics = item
            loss = float(metrics["loss"][0])
            if not np.isfinite(loss) or not bool(metrics["logits_finite"][0]):
                raise NonFiniteLossError(
                    f"the loss ({loss}) or the logits are not finite at epoch {epoch}, "
                    f"iteration {iteration}; lower learning_rate or check the input images")
            for key in sums:
                sums[key] += float(metrics[key][0])
            epoch_counts += np.asarray(metrics["counts"][0], np.int64)
            kept = np.asarray(metrics["kept"]).reshape(-1) > 0
            confident["pseudolabels"].append(np.asarray(metrics["pseudolabels"]).reshape(-1)[kept])
            confident["confidences"].append(np.asarray(metrics["confidences"]).reshape(-1)[kept])
            confident["ids"].append(ids[kept])

        bar = tqdm(total=settings.iterations_per_epoch, desc=f"epoch {epoch}",
                   disable=not progress, leave=False)
        for iteration, host in enumerate(batches):
            ids = host.pop("unlabeled_ids")
            device_batch = train_lib.shard(host, num_devices)
            state_r, metrics = steps.train(state_r, frozen_r, device_batch, margin_r)
            # Read the previous step's metrics while this one runs.
            if pending is not None:
                collect(pending)
            pending = (iteration, ids, metrics)
            bar.update(1)
        collect(pending)
        bar.close()

        iterations = settings.iterations_per_epoch
        record = {key: value / iterations for key, value in sums.items()}
        confident = {key: np.concatenate(value) for key, value in confident.items()}
        record.update(_pseudolabel_report(confident, epoch_counts, streams, leaderboard))
        record["epoch"] = epoch
        # Largest margin between different classes (the loss ignores the diagonal).
        off_diagonal = margin[~np.eye(num_classes, dtype=bool)]
        record["margin_max"] = float(np.abs(off_diagonal).max()) if off_diagonal.size else 0.0
        record["learning_rate"] = float(learning_rate((epoch + 1) * iterations - 1))
        if record["kept_fraction"] == 0.0:
            log.warning("epoch %d: no unlabeled sample was above the confidence threshold", epoch)
        if not bool(_all_finite(state_r.params)):
            raise NonFiniteLossError(
                f"the parameters are not finite after epoch {epoch}, iteration "
                f"{settings.iterations_per_epoch - 1}; lower learning_rate")

        if epoch % settings.update_every == 0:
            leaderboard = update_leaderboard(leaderboard, confident, epoch, settings,
                                             unlabeled_per_class, streams.seen)
        counts = epoch_counts
        record["main_samples"] = int((leaderboard >= 0).sum())

        last = epoch + 1 == settings.epochs
        if evaluate is not None and ((epoch + 1) % settings.eval_every == 0 or last):
            record.update(evaluate(state_r.params))
        record["seconds"] = time.time() - started
        next_state = LoopState(epoch=epoch + 1, leaderboard=leaderboard, counts=counts)
        if on_epoch_end is not None:
            on_epoch_end(state_r, next_state, record)
    final = LoopState(epoch=max(loop_state.epoch, settings.epochs), leaderboard=leaderboard,
                      counts=counts)
    return state_r, final


def _pseudolabel_report(confident: dict[str, np.ndarray], counts: np.ndarray, streams: Streams,
                        leaderboard: np.ndarray) -> dict[str, Any]:
    """Per-epoch pseudolabel statistics: counts, balance and, when labels are known, accuracy."""
    from cap_jax import metrics as metrics_lib

    report: dict[str, Any] = {"confident_counts": counts.tolist()}
    report.update({f"balance_{k}": v for k, v in metrics_lib.pseudolabel_balance(counts).items()})
    if streams.pool_labels is not None:
        truth = streams.pool_labels
        if confident["ids"].size:
            report["pseudolabel_accuracy"] = float(
                np.mean(truth[confident["ids"]] == confident["pseudolabels"]))
        else:
            report["pseudolabel_accuracy"] = math.nan
        ids, classes = board_members(leaderboard)
        report["main_sample_accuracy"] = float(np.mean(truth[ids] == classes)) if ids.size else (
            math.nan)
    return report
