"""Concept alignment in a run: only the aligned classes' initial main samples change."""

import dataclasses
import json
import os

import numpy as np
import pytest

from cap_jax import alignment, clip, pseudolabels
from cap_jax.config import RunConfig


@dataclasses.dataclass
class NoLabels:
    labeled_ids: object = None
    seen: object = None


@pytest.fixture(scope="module")
def tiny_model():
    return clip.load("random:tiny")


def planted_zero_shot(num_classes=6, per_class=12, dim=32, seed=0):
    """Clustered unit image features; class 4's text points away from its cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_classes), per_class)
    images = centres[labels] + 0.05 * rng.normal(size=(labels.size, dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    text = centres.copy()
    text[4] = rng.normal(size=dim)
    text[4] /= np.linalg.norm(text[4])
    logits = 100.0 * images @ text.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return {"probs": probs.astype(np.float32), "image_features": images.astype(np.float32),
            "text_features": text.astype(np.float32)}, labels


def write_descriptions(tmp_path, entries):
    path = tmp_path / "descriptions.json"
    path.write_text(json.dumps(entries))
    return str(path)


def test_reference_mode_changes_only_listed_rows(tmp_path, tiny_model):
    zero_shot, _ = planted_zero_shot()
    names = [f"class {i}" for i in range(6)]
    board = pseudolabels.initial_leaderboard(zero_shot["probs"], 5)
    config = RunConfig(concept_alignment="reference", n_main_samples=5, model="random:tiny",
                       descriptions=write_descriptions(tmp_path, {
                           "class 2": ["a striped thing", "a round thing"]}))
    aligned, report = alignment.align_leaderboard(
        config, tiny_model, zero_shot, board, names, NoLabels(), str(tmp_path))
    different = [c for c in range(6) if not np.array_equal(aligned[c], board[c])]
    assert set(different) <= {2}
    assert report["summary"]["aligned"] == ["class 2"]
    assert report["changed_classes"] == [names[c] for c in different]
    assert os.path.isfile(tmp_path / "concepts.json")
    assert os.path.isfile(tmp_path / "concepts.png")


def test_detect_mode_reports_planted_class(tmp_path, tiny_model):
    zero_shot, _ = planted_zero_shot()
    names = [f"class {i}" for i in range(6)]
    board = pseudolabels.initial_leaderboard(zero_shot["probs"], 5)
    config = RunConfig(concept_alignment="detect", n_main_samples=5, model="random:tiny",
                       descriptions=write_descriptions(tmp_path, {"class 4": ["a blue shape"]}))
    aligned, report = alignment.align_leaderboard(
        config, tiny_model, zero_shot, board, names, NoLabels(), None)
    assert report["summary"]["detected"] == ["class 4"]
    assert report["summary"]["aligned"] == ["class 4"]
    for c in range(6):
        if c != 4:
            np.testing.assert_array_equal(aligned[c], board[c])
    assert (aligned[4] >= 0).sum() == 5


def test_labeled_images_never_aligned(tmp_path, tiny_model):
    zero_shot, _ = planted_zero_shot()
    names = [f"class {i}" for i in range(6)]
    board = pseudolabels.initial_leaderboard(zero_shot["probs"], 5)
    labeled = np.arange(0, 72, 3)
    config = RunConfig(concept_alignment="reference", n_main_samples=5, model="random:tiny",
                       descriptions=write_descriptions(tmp_path, {"class 1": ["a thing"]}))
    aligned, _ = alignment.align_leaderboard(
        config, tiny_model, zero_shot, board, names, NoLabels(labeled_ids=labeled), None)
    assert not np.isin(aligned[1], labeled).any()


def test_too_long_description_names_class(tmp_path, tiny_model):
    zero_shot, _ = planted_zero_shot()
    names = [f"class {i}" for i in range(6)]
    board = pseudolabels.initial_leaderboard(zero_shot["probs"], 5)
    config = RunConfig(concept_alignment="reference", n_main_samples=5, model="random:tiny",
                       descriptions=write_descriptions(tmp_path, {
                           "class 3": ["very " * 90 + "long"]}))
    with pytest.raises(ValueError, match="class 3"):
        alignment.align_leaderboard(config, tiny_model, zero_shot, board, names, NoLabels(),
                                    None)


def test_unknown_description_class_rejected(tmp_path, tiny_model):
    zero_shot, _ = planted_zero_shot()
    names = [f"class {i}" for i in range(6)]
    board = pseudolabels.initial_leaderboard(zero_shot["probs"], 5)
    config = RunConfig(concept_alignment="reference", model="random:tiny",
                       descriptions=write_descriptions(tmp_path, {"no such class": ["x"]}))
    with pytest.raises(ValueError, match="no such class"):
        alignment.align_leaderboard(config, tiny_model, zero_shot, board, names, NoLabels(),
                                    None)
