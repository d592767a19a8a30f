"""Concept alignment in a run: detect mismatched classes and give them main samples.

Runs once, after the zero-shot pass and the initial leaderboard. The classes to align are the
detected ones (`concept_alignment="detect"`) or those listed in the description file
(`concept_alignment="reference"`, the fixed class list of the PyTorch CAP code, to compare
with the published numbers). For each of them that has a description, the description
closest to the class's image cluster retrieves the class's initial main samples by cosine
similarity over the unlabeled pool's zero-shot image features. The labeled images are never
retrieved. Other rows of the
leaderboard stay as they were.

Writes `concepts.json` (detected classes with evidence, chosen descriptions, the rows that
changed) and `concepts.png` (zero-shot prediction counts per class, mismatched classes marked)
into the run directory.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import numpy as np

from cap_jax import concepts

log = logging.getLogger(__name__)

# Description files shipped for the benchmarks, by the dataset names the loaders use.
SHIPPED_DESCRIPTIONS = {
    "resisc45": "RESISC45", "dtd": "DTD", "flowers102": "Flowers102",
    "oxford_flowers102": "Flowers102", "cub": "CUB", "caltech_birds2011": "CUB",
    "fgvc_aircraft": "FGVCAircraft", "fgvcaircraft": "FGVCAircraft",
}


def _descriptions_for(config: Any, dataset_name: str) -> dict[str, list[str]]:
    from cap_jax.data.descriptions import load_descriptions

    if config.descriptions:
        return load_descriptions(config.descriptions)
    shipped = SHIPPED_DESCRIPTIONS.get(dataset_name.lower())
    if shipped is None:
        log.warning("no description file for dataset %s: pass descriptions=<file.json>; "
                    "detected classes keep their zero-shot main samples", dataset_name)
        return {}
    return load_descriptions(shipped)


def encode_descriptions(model: Any, class_name: str, texts: list[str]) -> np.ndarray:
    """Unit text features [M, D] of a class's descriptions; a too-long text names the class."""
    try:
        features = np.array(model.encode_texts(texts), np.float32)
    except ValueError as error:
        raise ValueError(f"a description of class {class_name!r} is too long: {error}") from error
    return features / np.linalg.norm(features, axis=-1, keepdims=True)


def align_leaderboard(config: Any, model: Any, zero_shot: dict[str, np.ndarray],
                      leaderboard: np.ndarray, class_names: list[str], paradigm: Any,
                      workdir: Optional[str], dataset_name: str = "") -> tuple[np.ndarray, dict]:
    """Replace the initial main samples of the classes to align; return (board, report).

    Args:
      config: the run config (`concept_alignment`, `descriptions`, `alignment_top_k`,
        `n_main_samples`, `seed`).
      model: the CLIP model, to encode descriptions.
      zero_shot: the training pool's zero-shot pass: `probs` [N, C], `image_features` [N, D]
        unit, `text_features` [C, D] unit.
      leaderboard: [C, K] initial main samples.
      class_names: the C class names.
      paradigm: labeled ids (never retrieved) and seen classes (never aligned).
      workdir: where to write `concepts.json` and `concepts.png`, or None.
      dataset_name: selects the shipped description file when the config names none.
    """
    num_images, num_classes = zero_shot["probs"].shape
    labeled = paradigm.labeled_ids if paradigm.labeled_ids is not None else np.zeros(0, int)
    pool = np.setdiff1d(np.arange(num_images), labeled)
    predictions = np.argmax(zero_shot["probs"], axis=-1)
    log.info("concept alignment: detecting mismatched classes over %d images", pool.size)
    detection = concepts.detect_mismatched_classes(
        zero_shot["image_features"][pool], zero_shot["text_features"], predictions[pool],
        seed=config.seed)
    detected = [int(c) for c in detection.class_ids]
    descriptions = _descriptions_for(config, dataset_name)
    unknown = sorted(set(descriptions) - set(class_names))
    if unknown:
        raise ValueError(f"descriptions name classes that are not in the dataset: {unknown}")

    if config.concept_alignment == "reference":
        targets = [class_names.index(name) for name in descriptions]
    else:
        targets = detected
    if paradigm.seen is not None:
        targets = [c for c in targets if not paradigm.seen[c]]

    centroid_of = {int(c): detection.centroids[i] for i, c in enumerate(detection.class_ids)}
    k = config.alignment_top_k or config.n_main_samples
    board = np.asarray(leaderboard, np.int64).copy()
    if k > board.shape[1]:
        board = np.concatenate(
            [board, np.full((board.shape[0], k - board.shape[1]), -1, np.int64)], axis=1)
    aligned = {}
    for c in sorted(set(targets)):
        name = class_names[c]
        texts = descriptions.get(name)
        if not texts:
            log.warning("class %r is to be aligned but has no description; it keeps its "
                        "zero-shot main samples", name)
            continue
        features = encode_descriptions(model, name, texts)
        if c in centroid_of:
            chosen = concepts.choose_description(features, centroid_of[c])
        else:
            chosen = concepts.choose_description(features, detection.remaining_centroids)
        members = concepts.align_main_samples(
            features[chosen], zero_shot["image_features"], k, exclude=labeled)
        row = np.full(board.shape[1], -1, np.int64)
        row[:members.size] = members
        board[c] = row
        aligned[name] = {"class_id": c, "description": texts[chosen],
                         "main_samples": [int(i) for i in members if i >= 0]}
    changed = [int(c) for c in range(num_classes)
               if not np.array_equal(board[c], _pad(leaderboard, board.shape[1])[c])]

    report = {
        "mode": config.concept_alignment,
        "detected": [
            {"class_id": int(c), "class_name": class_names[int(c)],
             "zero_shot_predictions": int(detection.zero_shot_counts[i]),
             "cluster_similarity": float(detection.cluster_similarity[i]),
             "cluster_size": int(detection.cluster_sizes[i])}
            for i, c in enumerate(detection.class_ids)],
        "remaining_classes": [class_names[int(c)] for c in detection.remaining_class_ids],
        "least_predicted_classes": [class_names[int(c)]
                                    for c in detection.least_predicted_class_ids],
        "aligned": aligned,
        "changed_classes": [class_names[c] for c in changed],
        "zero_shot_prediction_counts": np.bincount(
            predictions[pool], minlength=num_classes).tolist(),
    }
    report["summary"] = {"detected": [d["class_name"] for d in report["detected"]],
                         "aligned": sorted(aligned), "changed_classes": report["changed_classes"]}
    log.info("concept alignment: detected %s; aligned %s", report["summary"]["detected"],
             report["summary"]["aligned"])
    if workdir:
        with open(os.path.join(workdir, "concepts.json"), "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        plot_prediction_counts(report["zero_shot_prediction_counts"], class_names, detected,
                               os.path.join(workdir, "concepts.png"))
    return board, report


def _pad(board: np.ndarray, width: int) -> np.ndarray:
    board = np.asarray(board, np.int64)
    if board.shape[1] >= width:
        return board
    return np.concatenate([board, np.full((board.shape[0], width - board.shape[1]), -1)], axis=1)


def plot_prediction_counts(counts: list[int], class_names: list[str], mismatched: list[int],
                           path: str) -> None:
    """Bar chart of zero-shot predictions per class, mismatched classes in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["tab:red" if c in set(mismatched) else "tab:blue" for c in range(len(counts))]
    figure, axis = plt.subplots(figsize=(max(6, 0.25 * len(counts)), 4))
    axis.bar(np.arange(len(counts)), counts, color=colors)
    axis.set_xlabel("class")
    axis.set_ylabel("zero-shot predictions")
    axis.set_title("Zero-shot predictions per class (red: detected concept mismatch)")
    if len(counts) <= 60:
        axis.set_xticks(np.arange(len(counts)))
        axis.set_xticklabels(class_names, rotation=90, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
