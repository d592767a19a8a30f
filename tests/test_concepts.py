import json
from pathlib import Path

import numpy as np
import pytest

from cap_jax.concepts import (
    align_main_samples,
    choose_description,
    detect_mismatched_classes,
    spherical_kmeans,
)
from cap_jax.data.descriptions import DESCRIPTIONS_DIR, available_datasets, load_descriptions

CLASS_NAME_DIR = Path(__file__).parents[1] / "cap_jax" / "data" / "protocol" / "class_names"


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted_features(seed, *, num_classes=20, dim=32, per_class=30, mismatched=7, rare=3):
    """Tight image clusters with text features near them, except the mismatched class.

    The mismatched class's text feature is orthogonal to every cluster centre and
    zero-shot CLIP predicts it twice. The ``rare`` class is also rarely predicted,
    but its text feature matches its cluster, so it must not be reported.
    """
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(num_classes, dim)))
    labels = np.repeat(np.arange(num_classes), per_class)
    image_features = centres[labels] + 0.15 / np.sqrt(dim) * rng.normal(size=(labels.size, dim))
    text_features = centres + 0.3 / np.sqrt(dim) * rng.normal(size=(num_classes, dim))
    away = rng.normal(size=dim)
    basis, _ = np.linalg.qr(centres.T)  # [dim, num_classes], orthonormal
    text_features[mismatched] = away - basis @ (basis.T @ away)
    text_features = _unit(text_features)

    predictions = labels.copy()
    members = np.flatnonzero(labels == mismatched)
    predictions[members[2:]] = (mismatched + 1) % num_classes
    members = np.flatnonzero(labels == rare)
    predictions[members[3:]] = (rare + 1) % num_classes
    return _unit(image_features), text_features, predictions, centres


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_detector_finds_planted_class(seed):
    mismatched = (5 * seed + 7) % 20
    image_features, text_features, predictions, centres = planted_features(
        seed, mismatched=mismatched, rare=(mismatched + 9) % 20
    )
    report = detect_mismatched_classes(image_features, text_features, predictions, seed=seed)
    np.testing.assert_array_equal(report.class_ids, [mismatched])
    np.testing.assert_array_equal(report.zero_shot_counts, [2])
    assert report.remaining_class_ids.size == 2
    assert report.least_predicted_class_ids.size == 2
    assert sorted(report.removal_order.tolist() + report.remaining_class_ids.tolist()) == list(
        range(20)
    )
    # The mismatched class's text feature matches no cluster.
    assert abs(float(report.cluster_similarity[0])) < 0.3
    assert report.cluster_sizes[0] == 30
    assert report.remaining_cluster_sizes.tolist() == [30, 30]
    # The clusters left are the planted class's own images and one other class's.
    closest = np.max(report.remaining_centroids @ centres[mismatched])
    assert closest > 0.95


def test_detector_is_deterministic():
    image_features, text_features, predictions, _ = planted_features(4)
    first = detect_mismatched_classes(image_features, text_features, predictions, seed=3)
    second = detect_mismatched_classes(image_features, text_features, predictions, seed=3)
    for field in first.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field), err_msg=field)


def test_detector_reports_nothing_when_all_match():
    image_features, text_features, predictions, centres = planted_features(5)
    text_features[7] = centres[7]  # repair the planted class
    report = detect_mismatched_classes(image_features, text_features, predictions)
    # Class 7 is still rarely predicted, but its name now matches its cluster.
    assert 7 not in report.class_ids.tolist()
    assert report.class_ids.size == 0


def test_detector_rejects_bad_input():
    image_features, text_features, predictions, _ = planted_features(6)
    with pytest.raises(ValueError, match="feature size"):
        detect_mismatched_classes(image_features[:, :5], text_features, predictions)
    with pytest.raises(ValueError, match="at least one image per class"):
        detect_mismatched_classes(image_features[:10], text_features, predictions[:10])
    with pytest.raises(ValueError, match="zero_shot_predictions"):
        detect_mismatched_classes(image_features, text_features, predictions[:5])
    with pytest.raises(ValueError, match="lie in"):
        detect_mismatched_classes(image_features, text_features, predictions + 20)


def test_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(4, 16)))
    labels = np.repeat(np.arange(4), 25)
    points = _unit(centres[labels] + 0.05 * rng.normal(size=(100, 16)))
    centroids, assignments = spherical_kmeans(points, 4, rng=np.random.default_rng(1))
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)
    # Each true cluster maps to exactly one found cluster.
    for c in range(4):
        assert np.unique(assignments[labels == c]).size == 1
    assert np.unique(assignments).size == 4


def test_kmeans_rejects_too_many_clusters():
    with pytest.raises(ValueError, match="num_clusters"):
        spherical_kmeans(np.eye(3), 4, rng=np.random.default_rng(0))


def test_choose_description_closest_to_centroid():
    descriptions = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert choose_description(descriptions, np.array([0.1, 0.2, 3.0])) == 2
    centroids = np.array([[0.9, 0.0, 0.1], [0.0, 0.0, -1.0]])
    assert choose_description(descriptions, centroids) == 0
    with pytest.raises(ValueError, match=r"\[M, D\]"):
        choose_description(descriptions, np.ones(4))


def test_align_main_samples_top_k_excluding_labeled():
    image_features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    ids = align_main_samples(np.array([1.0, 0.0]), image_features, 3, exclude=[0])
    np.testing.assert_array_equal(ids, [1, 3, 2])
    assert ids.dtype == np.int32
    padded = align_main_samples(np.array([1.0, 0.0]), image_features, 4, exclude=[0, 1, 2])
    np.testing.assert_array_equal(padded, [3, 4, -1, -1])


def test_shipped_descriptions_load():
    assert set(available_datasets()) >= {"RESISC45", "DTD", "Flowers102", "CUB", "FGVCAircraft"}
    descriptions = load_descriptions("flowers102")
    assert "bishop of llandaff" in descriptions
    assert load_descriptions(DESCRIPTIONS_DIR / "DTD.json") == load_descriptions("DTD")
    for name in available_datasets():
        for class_name, texts in load_descriptions(name).items():
            assert texts, (name, class_name)


def test_shipped_description_classes_exist():
    for name in available_datasets():
        class_file = CLASS_NAME_DIR / f"{name}.txt"
        if not class_file.exists():
            continue  # CUB's class list is read from the dataset itself.
        class_names = set(class_file.read_text().splitlines())
        missing = set(load_descriptions(name)) - class_names
        assert not missing, f"{name}: {sorted(missing)} are not class names"


def test_shipped_descriptions_fit_clip_context():
    from cap_jax.clip.tokenizer import openai_tokenizer, tokenize

    tokenizer = openai_tokenizer()
    for name in available_datasets():
        texts = [text for texts in load_descriptions(name).values() for text in texts]
        tokens = tokenize(tokenizer, texts)  # raises for more than 77 tokens
        lengths = (tokens != tokenizer.pad_token_id).sum(axis=1)
        assert lengths.max() <= 40, name


def test_load_descriptions_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_descriptions("NoSuchDataset")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_descriptions(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": []}))
    with pytest.raises(ValueError, match="non-empty list"):
        load_descriptions(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_descriptions(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a cat": "a small furry animal"}))
    assert load_descriptions(good) == {"a cat": ["a small furry animal"]}
