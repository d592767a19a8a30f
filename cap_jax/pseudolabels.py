"""Main samples: the initial zero-shot leaderboard, epoch candidates and their growth.

A leaderboard is an int32 array ``[C, K]`` whose row ``c`` lists the image ids of
class ``c``'s main samples, best first, padded with ``-1``. Image ids index the
unlabeled training pool (``0 .. N-1``).

The functions here run once per run or once per epoch on the host, so they use
numpy and Python loops. They follow the selection rules of the PyTorch CAP code,
including its quirks, so that the same inputs give the same main samples:

* the initial board offers an image that did not enter its predicted class's
  board to every other class, so one image can sit on several boards;
* a new epoch's candidates come first and can push earlier members out, and a
  previous member that is also a candidate is kept twice unless
  ``deduplicate=True`` is passed to :func:`update_main_samples`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = [
    "epoch_leaderboard",
    "initial_leaderboard",
    "main_sample_count",
    "update_main_samples",
]

# The reference caps the grown main-sample set of a class at 1000 images, so that
# large datasets do not turn the main stream into the whole unlabeled pool.
MAX_MAIN_SAMPLES_PER_CLASS = 1000


def _labeled_mask(labeled, num_images: int) -> np.ndarray:
    """Turn ``labeled`` (ids, a bool mask or None) into a bool mask ``[N]``."""
    mask = np.zeros(num_images, dtype=bool)
    if labeled is None:
        return mask
    labeled = np.asarray(labeled)
    if labeled.dtype == bool:
        if labeled.shape != (num_images,):
            raise ValueError(
                f"labeled as a bool mask must have shape ({num_images},) to match probs, "
                f"got {labeled.shape}"
            )
        return labeled.copy()
    if labeled.size == 0:
        return mask
    if labeled.ndim != 1 or not np.issubdtype(labeled.dtype, np.integer):
        raise ValueError(
            f"labeled must be a 1-D array of image ids or a bool mask, got dtype "
            f"{labeled.dtype} and shape {labeled.shape}"
        )
    if labeled.min() < 0 or labeled.max() >= num_images:
        raise ValueError(
            f"labeled image ids must lie in [0, {num_images}), got range "
            f"[{labeled.min()}, {labeled.max()}]"
        )
    mask[labeled] = True
    return mask


def _offer(board: list, entry: tuple, k: int, *, keep_sorted: bool) -> None:
    """Offer ``entry = (score, image_id)`` to one class's board, as the reference does.

    The board enters ``entry`` while it has fewer than ``k`` members, or when
    ``entry``'s score beats the score of the board's last member, which then
    drops out. The reference appends without sorting in its fallback branch
    (``keep_sorted=False``), so "last" is not always the worst member; this is
    reproduced on purpose.
    """
    if len(board) < k:
        board.append(entry)
        if keep_sorted:
            board.sort(reverse=True)
    elif board[-1][0] < entry[0]:
        board.append(entry)
        board.sort(reverse=True)
        del board[k:]


def initial_leaderboard(probs, k: int, *, labeled=None) -> np.ndarray:
    """Select the initial main samples of each class from zero-shot probabilities.

    Images are visited in id order; labeled images are skipped. An image with
    prediction ``p = argmax_c probs[i, c]`` enters the board of ``p`` while that
    board has fewer than ``k`` members, or when ``probs[i, p]`` beats the score
    of the board's last member (which drops out). Otherwise the image is offered
    to every other class in descending probability, and enters each board that
    has room or whose last member it beats. So an image can sit on several
    boards, and a class that zero-shot CLIP never predicts still gets members.

    Scores are compared as ``(score, image_id)`` pairs, so equal scores are
    ordered by the larger image id first, as the reference's tuple sort does.

    Args:
      probs: zero-shot class probabilities, float ``[N, C]`` (rows sum to 1).
      k: board size per class, ``k >= 1``.
      labeled: image ids ``[L]`` or a bool mask ``[N]`` of labeled images, which
        are never selected; ``None`` when every image is unlabeled.

    Returns:
      int32 ``[C, k]`` leaderboard, each row sorted by descending score and
      padded with ``-1`` when fewer than ``k`` images reached it.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [N, C], got {probs.shape}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    num_images, num_classes = probs.shape
    skip = _labeled_mask(labeled, num_images)

    boards: list[list[tuple[float, int]]] = [[] for _ in range(num_classes)]
    for image_id in range(num_images):
        if skip[image_id]:
            continue
        row = probs[image_id]
        predicted = int(np.argmax(row))
        board = boards[predicted]
        if len(board) < k or board[-1][0] < row[predicted]:
            _offer(board, (float(row[predicted]), image_id), k, keep_sorted=True)
            continue
        # Fallback: the predicted board is full and the image does not beat its last member.
        others = sorted(
            ((float(row[c]), c) for c in range(num_classes) if c != predicted), reverse=True
        )
        for score, c in others:
            _offer(boards[c], (score, image_id), k, keep_sorted=False)

    leaderboard = np.full((num_classes, k), -1, dtype=np.int32)
    for c, board in enumerate(boards):
        ids = [image_id for _, image_id in sorted(board, reverse=True)]
        leaderboard[c, : len(ids)] = ids
    return leaderboard


def epoch_leaderboard(
    pseudolabels,
    confidences,
    image_ids,
    *,
    num_classes: int,
    exclude: Iterable[int] = (),
) -> np.ndarray:
    """Rank an epoch's confident predictions into candidate main samples per class.

    Classes are visited in id order. Within a class, its predictions go by
    descending confidence (stable, so equal confidences keep input order). An
    image enters the first class that reaches it and is skipped afterwards, in
    that class and in every class with a larger id, so each image is a candidate
    of at most one class. Images in ``exclude`` (the current main samples) are
    never candidates.

    Args:
      pseudolabels: predicted class ids, int ``[P]`` (one row per confident
        prediction; an image can appear several times in an epoch).
      confidences: max softmax probability of each prediction, float ``[P]``.
      image_ids: the image id of each prediction, int ``[P]``.
      num_classes: ``C``.
      exclude: image ids that are never candidates.

    Returns:
      int32 ``[C, U]`` candidates, best first, ``-1`` padded, where ``U`` is the
      number of distinct ids in ``image_ids`` (the most one row can hold).
    """
    pseudolabels = np.asarray(pseudolabels)
    confidences = np.asarray(confidences)
    image_ids = np.asarray(image_ids)
    if not (pseudolabels.ndim == confidences.ndim == image_ids.ndim == 1) or not (
        pseudolabels.shape == confidences.shape == image_ids.shape
    ):
        raise ValueError(
            "pseudolabels, confidences and image_ids must be 1-D of one length, got "
            f"{pseudolabels.shape}, {confidences.shape} and {image_ids.shape}"
        )
    if pseudolabels.size and (pseudolabels.min() < 0 or pseudolabels.max() >= num_classes):
        raise ValueError(
            f"pseudolabels must lie in [0, {num_classes}), got range "
            f"[{pseudolabels.min()}, {pseudolabels.max()}]"
        )

    assigned_ids = {int(i) for i in np.asarray(list(exclude), dtype=np.int64).ravel()}
    width = int(np.unique(image_ids).size)
    leaderboard = np.full((num_classes, width), -1, dtype=np.int32)
    for c in range(num_classes):
        rows = np.flatnonzero(pseudolabels == c)
        order = rows[np.argsort(-confidences[rows], kind="stable")]
        position = 0
        for image_id in image_ids[order]:
            image_id = int(image_id)
            if image_id in assigned_ids:
                continue
            assigned_ids.add(image_id)
            leaderboard[c, position] = image_id
            position += 1
    return leaderboard


def main_sample_count(
    epoch: int,
    *,
    n_main_samples: int,
    max_main_ratio: float,
    epochs: int,
    unlabeled_per_class: int,
) -> int:
    """Return the per-class size of the main-sample set after the update at ``epoch``.

    The set grows linearly from ``n_main_samples`` at epoch 0 to its ceiling at
    70% of training, then stays there::

        ceiling = min(1000, int(unlabeled_per_class * max_main_ratio))
        k = n_main_samples + int((ceiling - n_main_samples) * min(1, epoch / (0.7 * epochs)))

    The 1000 cap is the reference's; it keeps the main stream from growing into
    the whole unlabeled pool on large datasets.

    Args:
      epoch: the epoch just finished (0-based).
      n_main_samples: initial board size ``k`` (16; 6 for Flowers102).
      max_main_ratio: the share of a class's unlabeled images the set may reach.
      epochs: total number of epochs.
      unlabeled_per_class: ``N // C``, the unlabeled images per class.

    Returns:
      The number of main samples per class, a Python int.
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    ceiling = min(MAX_MAIN_SAMPLES_PER_CLASS, int(unlabeled_per_class * max_main_ratio))
    progress = min(1.0, epoch / (epochs * 0.7))
    return int(n_main_samples + int((ceiling - n_main_samples) * progress))


def update_main_samples(previous, candidates, k: int, *, deduplicate: bool = False) -> np.ndarray:
    """Merge an epoch's candidates with the previous main samples, per class.

    Row ``c`` of the result is the valid entries of ``candidates[c]`` followed by
    the valid entries of ``previous[c]``, cut to ``k`` and ``-1`` padded. New
    candidates come first, so they can push earlier members out.

    A previous member that is also a candidate of the same class appears twice
    by default, because the reference never deduplicates. With
    ``deduplicate=True`` its second occurrence is dropped and the next previous
    member moves up. Candidates from :func:`epoch_leaderboard` with the current
    main samples in ``exclude`` never repeat a member, so both settings agree
    in the training loop.

    Args:
      previous: int ``[C, K]`` current main samples, ``-1`` padded.
      candidates: int ``[C, M]`` new candidates best first, ``-1`` padded.
      k: the new size per class (see :func:`main_sample_count`).
      deduplicate: drop repeated image ids within a row.

    Returns:
      int32 ``[C, k]`` new main samples.
    """
    previous = np.asarray(previous)
    candidates = np.asarray(candidates)
    if previous.ndim != 2 or candidates.ndim != 2 or previous.shape[0] != candidates.shape[0]:
        raise ValueError(
            "previous and candidates must have shapes [C, K] and [C, M] with one C, got "
            f"{previous.shape} and {candidates.shape}"
        )
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    k = int(k)

    merged = np.full((previous.shape[0], k), -1, dtype=np.int32)
    for c in range(previous.shape[0]):
        row = [int(i) for i in candidates[c] if i >= 0]
        row += [int(i) for i in previous[c] if i >= 0]
        if deduplicate:
            row = list(dict.fromkeys(row))
        row = row[:k]
        merged[c, : len(row)] = row
    return merged
