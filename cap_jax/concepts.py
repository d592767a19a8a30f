"""Concept-mismatch detection and concept-aligned main samples.

A class suffers concept mismatch when its name does not point CLIP at the
images of the class. Its images form a visual cluster of their own, but its
text feature lies near no such cluster, so zero-shot CLIP almost never predicts
it. CAP finds such classes by elimination. It clusters the image features
into as many clusters as classes are left, removes the class and cluster that
match each other most confidently, and repeats. The classes that nothing
matched at the end, and that zero-shot CLIP also predicts rarely, are reported
as mismatched. For each of them a short visual description (see
:mod:`cap_jax.data.descriptions`) can stand in for the class name when the
initial main samples are retrieved.

Everything here runs once per run on the host, in numpy, and is deterministic
for a given ``seed``.

NOTE: the elimination runs one k-means per removed class, about ``0.9 C``
runs, each ``O(n_init · iterations · N · C · D)``. For 200 classes, 6k images
of dimension 512 and about 20 iterations that is an estimated 10^13
floating-point operations, minutes on a CPU. Lower ``n_init`` if it is too slow.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "MismatchReport",
    "align_main_samples",
    "choose_description",
    "detect_mismatched_classes",
    "spherical_kmeans",
]

# OpenAI CLIP clips its learned logit scale at 100 in training; the released models sit there.
CLIP_LOGIT_SCALE = 100.0


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


@dataclasses.dataclass(frozen=True)
class MismatchReport:
    """Result of :func:`detect_mismatched_classes`.

    Attributes:
      class_ids: int ``[M]`` mismatched classes, ascending.
      zero_shot_counts: int ``[M]`` zero-shot predictions of each.
      cluster_similarity: float ``[M]`` cosine similarity of the class's text
        feature to its best-matching final cluster centroid.
      cluster_sizes: int ``[M]`` images in that cluster.
      centroids: float ``[M, D]`` that cluster's unit centroid (to choose a
        description with :func:`choose_description`).
      remaining_class_ids: int ``[R]`` classes left after elimination,
        ``R = ceil(C / 10)``, ascending.
      least_predicted_class_ids: int ``[R]`` the ``R`` classes zero-shot CLIP
        predicts least often (ties go to the smaller class id).
      removal_order: int ``[C - R]`` classes in the order elimination removed them.
      remaining_centroids: float ``[R, D]`` unit centroids of the final
        clustering of the images left.
      remaining_cluster_sizes: int ``[R]`` images in each of those clusters.

    A mismatched class's text feature is by definition close to no cluster, so
    when ``R > 1`` its pairing with a cluster above is weak evidence. Passing
    all ``remaining_centroids`` to :func:`choose_description` lets the
    descriptions pick the cluster instead.
    """

    class_ids: np.ndarray
    zero_shot_counts: np.ndarray
    cluster_similarity: np.ndarray
    cluster_sizes: np.ndarray
    centroids: np.ndarray
    remaining_class_ids: np.ndarray
    least_predicted_class_ids: np.ndarray
    removal_order: np.ndarray
    remaining_centroids: np.ndarray
    remaining_cluster_sizes: np.ndarray


def _kmeans_plus_plus(features: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``k`` seed centroids by k-means++ with the cosine distance ``1 - x·c``."""
    num_points = features.shape[0]
    chosen = [int(rng.integers(num_points))]
    # float64, so that the sampling probabilities sum to 1 within numpy's tolerance.
    distance = np.maximum(1.0 - features @ features[chosen[0]], 0.0).astype(np.float64)  # [N]
    for _ in range(1, k):
        weights = distance**2
        total = weights.sum()
        if total > 0:
            index = int(rng.choice(num_points, p=weights / total))
        else:
            # Every point coincides with a chosen one; any unchosen point will do.
            unchosen = np.setdiff1d(np.arange(num_points), chosen)
            index = int(unchosen[rng.integers(unchosen.size)])
        chosen.append(index)
        distance = np.minimum(distance, np.maximum(1.0 - features @ features[index], 0.0))
    return features[chosen].copy()


def _lloyd(features: np.ndarray, centroids: np.ndarray, max_iter: int):
    """Run spherical Lloyd iterations; return unit centroids, assignments and inertia."""
    k = centroids.shape[0]
    assignments = None
    for _ in range(max_iter):
        similarity = features @ centroids.T  # [N, D] @ [D, k] -> [N, k]
        new_assignments = np.argmax(similarity, axis=1)
        if assignments is not None and np.array_equal(new_assignments, assignments):
            break
        assignments = new_assignments
        one_hot = np.zeros((features.shape[0], k), dtype=features.dtype)
        one_hot[np.arange(features.shape[0]), assignments] = 1.0
        sums = one_hot.T @ features  # [k, N] @ [N, D] -> [k, D]
        sizes = one_hot.sum(axis=0)
        for empty in np.flatnonzero(sizes == 0):
            # Reseed an empty cluster with the point farthest from its own centroid.
            fit = similarity[np.arange(features.shape[0]), assignments]
            farthest = int(np.argmin(fit))
            sums[empty] = features[farthest]
            similarity[farthest, assignments[farthest]] = np.inf
        centroids = _unit(sums)

    similarity = features @ centroids.T
    assignments = np.argmax(similarity, axis=1)
    inertia = float(np.sum(1.0 - similarity[np.arange(features.shape[0]), assignments]))
    return centroids, assignments, inertia


def spherical_kmeans(
    features,
    num_clusters: int,
    *,
    rng: np.random.Generator,
    n_init: int = 3,
    max_iter: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster unit vectors by cosine similarity (spherical k-means).

    Each run seeds with k-means++ under the distance ``1 - cos``, then
    alternates assigning each point to its most similar centroid and setting
    each centroid to the normalised mean of its points, until assignments stop
    changing or ``max_iter``. The run with the smallest ``sum_i (1 - cos(x_i,
    c_{a_i}))`` is returned (the first one on ties).

    Args:
      features: ``[N, D]`` features (normalised here).
      num_clusters: ``k``, ``1 <= k <= N``.
      rng: the random generator; the result is a function of its state.
      n_init: independent seedings to try.
      max_iter: Lloyd iterations per seeding.

    Returns:
      ``(centroids, assignments)``: unit float ``[k, D]`` and int ``[N]``.
    """
    features = _unit(np.asarray(features, dtype=np.float32))
    if features.ndim != 2 or not 1 <= num_clusters <= features.shape[0]:
        raise ValueError(
            f"need features [N, D] with 1 <= num_clusters <= N, got {features.shape} and "
            f"num_clusters={num_clusters}"
        )
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be positive, got {n_init} and {max_iter}")
    best = None
    for _ in range(n_init):
        seeds = _kmeans_plus_plus(features, num_clusters, rng)
        centroids, assignments, inertia = _lloyd(features, seeds, max_iter)
        if best is None or inertia < best[2]:
            best = (centroids, assignments, inertia)
    return best[0], best[1]


def _log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis that keeps ``log p`` distinct when ``p`` rounds to 1.

    ``log p_top = -log1p(sum_{j != top} exp(x_j - x_top))``; summing the other
    terms apart from the top one's ``exp(0) = 1`` keeps them from being lost
    next to it.
    """
    top = np.argmax(logits, axis=-1)
    rows = np.arange(logits.shape[0])
    shifted = logits - logits[rows, top][:, None]
    others = np.exp(shifted)
    others[rows, top] = 0.0
    return shifted - np.log1p(others.sum(axis=-1, keepdims=True))


def detect_mismatched_classes(
    image_features,
    text_features,
    zero_shot_predictions,
    *,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 100,
    logit_scale: float = CLIP_LOGIT_SCALE,
) -> MismatchReport:
    """Find classes whose name matches no visual cluster (concept mismatch).

    Starting from all ``C`` classes and all images, repeat while more than
    ``R = ceil(C / 10)`` classes are left:

    1. cluster the remaining images into as many clusters as classes are left
       (:func:`spherical_kmeans`);
    2. for each class ``c`` left, ``P[c, :] = softmax_k(logit_scale · cos(t_c, μ_k))``
       over the clusters ``k``;
    3. remove the pair ``(c, k)`` with the largest ``P[c, k]`` (the first in
       row-major order on ties): class ``c`` and the images of cluster ``k``.

    The mismatched classes are those left that are also among the ``R``
    classes zero-shot CLIP predicts least often. For evidence, the images left
    are clustered once more into ``R`` clusters and each class is paired with
    the centroid most similar to its text feature.

    Args:
      image_features: ``[N, D]`` CLIP image features of the unlabeled pool
        (normalised here), ``N >= C``.
      text_features: ``[C, D]`` class text features (normalised here).
      zero_shot_predictions: int ``[N]`` zero-shot predicted class of each image.
      seed: seed of the k-means++ seeding; equal inputs and seed give equal results.
      n_init: k-means seedings per clustering.
      max_iter: Lloyd iterations per seeding.
      logit_scale: temperature inverse of the softmax over clusters (CLIP's 100).

    Returns:
      A :class:`MismatchReport`.
    """
    image_features = _unit(np.asarray(image_features, dtype=np.float32))
    text_features = _unit(np.asarray(text_features, dtype=np.float64))
    zero_shot_predictions = np.asarray(zero_shot_predictions)
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            "image_features and text_features must be [N, D] and [C, D], got "
            f"{image_features.shape} and {text_features.shape}"
        )
    num_images, dim = image_features.shape
    num_classes = text_features.shape[0]
    if text_features.shape[1] != dim:
        raise ValueError(
            f"image_features {image_features.shape} and text_features {text_features.shape} "
            "must have the same feature size"
        )
    if num_images < num_classes:
        raise ValueError(
            f"need at least one image per class to cluster: {num_images} images, "
            f"{num_classes} classes"
        )
    if zero_shot_predictions.shape != (num_images,):
        raise ValueError(
            f"zero_shot_predictions must have shape ({num_images},), got "
            f"{zero_shot_predictions.shape}"
        )
    if zero_shot_predictions.min() < 0 or zero_shot_predictions.max() >= num_classes:
        raise ValueError(
            f"zero_shot_predictions must lie in [0, {num_classes}), got range "
            f"[{zero_shot_predictions.min()}, {zero_shot_predictions.max()}]"
        )

    rng = np.random.default_rng(seed)
    num_left = math.ceil(num_classes / 10)
    classes = np.arange(num_classes)
    images = np.arange(num_images)
    removal_order = []
    while classes.size > num_left:
        if images.size < classes.size:
            raise ValueError(
                f"only {images.size} images are left to cluster for {classes.size} classes; "
                "the image features have too few distinct points for concept detection"
            )
        centroids, assignments = spherical_kmeans(
            image_features[images], classes.size, rng=rng, n_init=n_init, max_iter=max_iter
        )
        logits = logit_scale * (text_features[classes] @ centroids.T)  # [c, D] @ [D, k] -> [c, k]
        # The largest log-probability is the largest probability, but at logit scale 100
        # many probabilities round to 1.0 while their logarithms still differ.
        log_probs = _log_softmax_rows(logits)
        class_row, cluster = np.unravel_index(int(np.argmax(log_probs)), log_probs.shape)
        removal_order.append(int(classes[class_row]))
        classes = np.delete(classes, class_row)
        images = images[assignments != cluster]

    counts = np.bincount(zero_shot_predictions, minlength=num_classes)
    least_predicted = np.sort(np.argsort(counts, kind="stable")[:num_left])
    mismatched = np.intersect1d(classes, least_predicted)

    if images.size < classes.size:
        raise ValueError(
            f"only {images.size} images are left to cluster for {classes.size} classes; "
            "the image features have too few distinct points for concept detection"
        )
    centroids, assignments = spherical_kmeans(
        image_features[images], classes.size, rng=rng, n_init=n_init, max_iter=max_iter
    )
    similarity = text_features[mismatched] @ centroids.T  # [M, D] @ [D, R] -> [M, R]
    best = np.argmax(similarity, axis=1)
    sizes = np.bincount(assignments, minlength=classes.size)
    return MismatchReport(
        class_ids=mismatched.astype(np.int64),
        zero_shot_counts=counts[mismatched].astype(np.int64),
        cluster_similarity=similarity[np.arange(mismatched.size), best].astype(np.float32),
        cluster_sizes=sizes[best].astype(np.int64),
        centroids=centroids[best].astype(np.float32),
        remaining_class_ids=classes.astype(np.int64),
        least_predicted_class_ids=least_predicted.astype(np.int64),
        removal_order=np.asarray(removal_order, dtype=np.int64),
        remaining_centroids=centroids.astype(np.float32),
        remaining_cluster_sizes=sizes.astype(np.int64),
    )


def choose_description(description_features, centroid) -> int:
    """Return the index of the description whose feature is most similar to ``centroid``.

    ``argmax_m max_k cos(d_m, μ_k)``: with one centroid ``[D]`` this is the
    description closest to it. With several ``[K, D]`` (the clusters a class
    may own) it is the description closest to any of them.

    Args:
      description_features: ``[M, D]`` text features of a class's descriptions
        (normalised here).
      centroid: ``[D]`` or ``[K, D]`` image cluster centroids (normalised here).

    Returns:
      index in ``[0, M)``; the first one on ties.
    """
    description_features = np.asarray(description_features, dtype=np.float64)
    centroids = np.asarray(centroid, dtype=np.float64)
    if centroids.ndim == 1:
        centroids = centroids[None, :]
    if (
        description_features.ndim != 2
        or centroids.ndim != 2
        or centroids.shape[1] != description_features.shape[1]
    ):
        raise ValueError(
            "description_features must be [M, D] and centroid [D] or [K, D], got "
            f"{description_features.shape} and {np.shape(centroid)}"
        )
    if description_features.shape[0] == 0 or centroids.shape[0] == 0:
        raise ValueError(
            f"need at least one description and one centroid, got "
            f"{description_features.shape} and {centroids.shape}"
        )
    similarity = _unit(description_features) @ _unit(centroids).T  # [M, D] @ [D, K] -> [M, K]
    return int(np.argmax(similarity.max(axis=1)))


def align_main_samples(description_feature, image_features, k: int, *, exclude=()) -> np.ndarray:
    """Retrieve the ``k`` images most similar to a description as a class's main samples.

    Args:
      description_feature: ``[D]`` text feature of the chosen description
        (normalised here).
      image_features: ``[N, D]`` image features of the pool (normalised here).
      k: number of images.
      exclude: image ids never returned (the labeled images).

    Returns:
      int32 ``[k]`` image ids by descending cosine similarity (the smaller id
      first on ties), ``-1`` padded when fewer than ``k`` images are allowed.
    """
    description_feature = np.asarray(description_feature, dtype=np.float64)
    image_features = np.asarray(image_features, dtype=np.float64)
    if image_features.ndim != 2 or description_feature.shape != image_features.shape[1:]:
        raise ValueError(
            "description_feature must be [D] and image_features [N, D], got "
            f"{description_feature.shape} and {image_features.shape}"
        )
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    similarity = _unit(image_features) @ _unit(description_feature)  # [N, D] @ [D] -> [N]
    allowed = np.ones(image_features.shape[0], dtype=bool)
    exclude = np.asarray(list(exclude), dtype=np.int64)
    allowed[exclude] = False
    candidates = np.flatnonzero(allowed)
    order = candidates[np.argsort(-similarity[candidates], kind="stable")][: int(k)]
    ids = np.full(int(k), -1, dtype=np.int32)
    ids[: order.size] = order
    return ids
