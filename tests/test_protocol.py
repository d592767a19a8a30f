"""Tests for the shipped protocol data and the split and labeled-image selection."""

import json
from importlib import resources

import numpy as np
import pytest

from cap_jax.data import protocol

SHIPPED = {
    "eurosat": ("EuroSAT", 10),
    "dtd": ("DTD", 47),
    "oxford_flowers102": ("Flowers102", 102),
    "resisc45": ("RESISC45", 45),
    "fgvc_aircraft": ("FGVCAircraft", 100),
}


@pytest.mark.parametrize("dataset", sorted(SHIPPED))
def test_split_classes_matches_every_shipped_split(dataset):
    stem, num_classes = SHIPPED[dataset]
    names = protocol.class_names(dataset)
    assert len(names) == num_classes
    assert len(set(names)) == num_classes
    table = json.loads(resources.files(protocol).joinpath(f"{stem}.json").read_text())
    assert sorted(table) == ["split_0", "split_200", "split_500"]
    for key, expected in table.items():
        seed = int(key.removeprefix("split_"))
        seen, unseen = protocol.split_classes(names, seed)
        assert seen == expected["seen"], (dataset, seed)
        assert unseen == expected["unseen"], (dataset, seed)
        assert len(seen) == int(num_classes * 0.62)


def test_split_equals_global_numpy_draw():
    np.random.seed(500)
    expected = np.random.choice(range(47), size=int(47 * 0.62), replace=False)
    seen, unseen = protocol.split_class_ids(47, 500)
    np.testing.assert_array_equal(seen, expected)
    np.testing.assert_array_equal(np.sort(np.concatenate([seen, unseen])), np.arange(47))


def test_split_leaves_global_state_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    protocol.split_class_ids(10, 500)
    assert np.random.rand() == expected


def test_sorted_unseen_option():
    names = protocol.class_names("eurosat")
    seen, unseen = protocol.split_classes(names, 500, sort_unseen=True)
    assert unseen == [
        "forest",
        "permanent crop land",
        "residential buildings or homes or apartments",
        "river",
    ]
    assert seen == protocol.protocol_split("EuroSAT", 500)[0]


def test_protocol_split_lookup():
    seen, unseen = protocol.protocol_split("Flowers102", 500)
    assert len(seen) == 63
    assert len(unseen) == 39
    assert protocol.split_seeds("dtd") == (500, 0, 200)
    with pytest.raises(ValueError, match="shipped seeds"):
        protocol.protocol_split("dtd", 1)
    with pytest.raises(ValueError, match="No shipped seen/unseen split"):
        protocol.protocol_split("fashion_mnist", 500)


def test_canonical_names_and_aliases():
    assert protocol.canonical_name("EuroSAT") == "eurosat"
    assert protocol.canonical_name("Flowers102") == "oxford_flowers102"
    assert protocol.canonical_name("CUB") == "caltech_birds2011"
    assert protocol.canonical_name("FGVC-Aircraft") == "fgvc_aircraft"
    assert protocol.canonical_name("fashion-mnist") == "fashion_mnist"
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'"):
        protocol.canonical_name("imagenet")


def test_class_names_of_fashion_mnist_and_cub(tmp_path):
    assert protocol.class_names("fashion_mnist")[0] == "T-shirt/top"
    with pytest.raises(ValueError, match="classes.txt"):
        protocol.class_names("cub")
    classes = tmp_path / "classes.txt"
    classes.write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n")
    assert protocol.cub_class_names(classes) == ("black footed albatross", "laysan albatross")
    classes.write_text("1 001.Black_footed_Albatross\n3 003.Sooty_Albatross\n")
    with pytest.raises(ValueError, match="out of sequence"):
        protocol.cub_class_names(classes)


def reference_select_labeled(labels, num_classes):
    # The reference's loop, written with the global generator.
    np.random.seed(0)
    chosen = []
    for class_id in range(num_classes):
        members = np.where(labels == class_id)[0]
        chosen.extend(np.random.choice(members, 2, replace=False))
    return np.array(chosen)


def test_select_labeled_matches_reference_loop():
    labels = np.random.default_rng(1).integers(0, 5, 200)
    expected = reference_select_labeled(labels, 5)
    chosen = protocol.select_labeled(labels)
    np.testing.assert_array_equal(chosen, expected)
    assert chosen.shape == (10,)
    np.testing.assert_array_equal(labels[chosen], np.repeat(np.arange(5), 2))


def test_select_labeled_rejects_small_class():
    labels = np.array([0, 0, 0, 1, 2, 2])
    with pytest.raises(ValueError, match="Class 1 has 1 training images"):
        protocol.select_labeled(labels)
    with pytest.raises(ValueError, match="Class 3 has 0"):
        protocol.select_labeled(np.array([0, 0, 1, 1, 2, 2]), num_classes=4, per_class=2)
