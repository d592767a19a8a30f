"""Tests for dataset sources: image folders, archive layouts, tfds without TensorFlow, labels."""

import io
import json
import logging
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.io

from cap_jax.data import labels as labels_lib
from cap_jax.data import protocol, tfds_source
from cap_jax.data.dataset import ImageReadError
from cap_jax.data.sources import CLASS_ALIASES, holdout_split, load_dataset

EUROSAT_TFDS_LABELS = [
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
]


def png_bytes(value: int, size=(6, 5), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    color = value if mode == "L" else (value, value, value)
    PIL.Image.new(mode, size, color=color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(value))
    return path


def pixel_values(dataset, indices=None):
    indices = range(len(dataset)) if indices is None else indices
    return np.array([image[0, 0, 0] for image in dataset.load_images(list(indices))])


# ---------------------------------------------------------------------------------------------
# Label and class-name checks.


def test_check_labels_accepts_exact_cover():
    labels_lib.check_labels(np.array([0, 2, 1, 1]), ["a", "b", "c"], source="toy")


def test_check_labels_one_based():
    with pytest.raises(ValueError, match="run 1..3 .* look 1-based"):
        labels_lib.check_labels(np.array([1, 2, 3]), ["a", "b", "c"], source="toy")


def test_check_labels_out_of_range():
    with pytest.raises(ValueError, match=r"0..2 .* found -1, 5"):
        labels_lib.check_labels(np.array([0, 1, 2, 5, -1]), ["a", "b", "c"], source="toy")


def test_check_labels_missing_classes():
    with pytest.raises(ValueError, match="no image of 1 of its 3 classes: '1: b'"):
        labels_lib.check_labels(np.array([0, 2, 2]), ["a", "b", "c"], source="toy")


def test_check_labels_empty():
    with pytest.raises(ValueError, match="no images"):
        labels_lib.check_labels(np.array([], dtype=int), ["a"], source="toy")


def test_match_names_normalises_case_and_underscores():
    mapping = labels_lib.match_class_names(
        ["Sea_Ice", "beach", "AIRPLANE"], ["airplane", "beach", "sea ice"], source="toy"
    )
    np.testing.assert_array_equal(mapping, [2, 1, 0])


def test_match_names_duplicates_after_underscores():
    with pytest.raises(ValueError, match="Duplicate class names in toy.*'sea_ice' and 'Sea Ice'"):
        labels_lib.match_class_names(["sea_ice", "Sea Ice"], ["sea ice", "x"], source="toy")
    with pytest.raises(ValueError, match="Duplicate class names in the protocol"):
        labels_lib.match_class_names(["a"], ["a b", "A_B"], source="toy")


def test_match_names_reports_unknown_and_missing():
    with pytest.raises(ValueError) as info:
        labels_lib.match_class_names(
            ["forrest", "river"], ["forest", "river", "lake"], source="toy"
        )
    message = str(info.value)
    assert "'forrest' (closest: 'forest')" in message
    assert "protocol classes not found in toy: 'forest', 'lake'" in message


def test_tfds_label_names_map_onto_protocol():
    # The label lists of the installed tfds builders, read without TensorFlow.
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.oxford_flowers102 import (
        oxford_flowers102_dataset_builder as flowers,
    )
    from tensorflow_datasets.datasets.resisc45 import resisc45_dataset_builder as resisc45
    from tensorflow_datasets.image_classification import eurosat

    dtd_names = Path(tfds.__file__).parent / "image_classification/dtd_key_attributes.txt"
    sources = {
        "eurosat": eurosat._LABELS,
        "oxford_flowers102": flowers._NAMES,
        "resisc45": resisc45._LABELS,
        "dtd": dtd_names.read_text().split(),
    }
    for name, source_names in sources.items():
        target = protocol.class_names(name)
        mapping = labels_lib.match_class_names(
            source_names, target, source=name, aliases=CLASS_ALIASES.get(name)
        )
        assert sorted(mapping.tolist()) == list(range(len(target))), name
    assert list(eurosat._LABELS) == EUROSAT_TFDS_LABELS


# ---------------------------------------------------------------------------------------------
# Image folders.


def make_folder(root: Path, class_folders, per_class=3, start=0):
    value = start
    for folder in class_folders:
        for i in range(per_class):
            write_png(root / folder / f"img_{i}.png", value)
            value += 1
    return root


def test_image_folder_pool_split(tmp_path):
    make_folder(tmp_path, ["cat", "dog_breed", "emu"], per_class=5)
    data = load_dataset("pets", root=tmp_path, test_fraction=0.4, split_seed=1)
    assert data.name == "pets"
    assert data.class_names == ("cat", "dog breed", "emu")
    assert len(data.train) == 9
    assert len(data.test) == 6
    np.testing.assert_array_equal(np.bincount(data.test.labels), [2, 2, 2])
    # Values 0-4 are cats, 5-9 dogs, 10-14 emus.
    for split in (data.train, data.test):
        np.testing.assert_array_equal(pixel_values(split) // 5, split.labels)
    assert not set(pixel_values(data.train)) & set(pixel_values(data.test))


def test_image_folder_train_test_layout(tmp_path):
    make_folder(tmp_path / "train", ["b", "a"], per_class=2)
    make_folder(tmp_path / "test", ["a", "b"], per_class=1, start=100)
    data = load_dataset("image_folder", root=tmp_path, source="folder")
    assert data.class_names == ("a", "b")
    assert len(data.train) == 4
    assert len(data.test) == 2
    np.testing.assert_array_equal(pixel_values(data.test), [100, 101])


def test_image_folder_mismatched_train_test(tmp_path):
    make_folder(tmp_path / "train", ["a", "b"], per_class=1)
    make_folder(tmp_path / "test", ["a", "c"], per_class=1)
    with pytest.raises(ValueError, match=r"different class folders: \['b', 'c'\]"):
        load_dataset("image_folder", root=tmp_path)


def test_image_folder_duplicate_names(tmp_path):
    make_folder(tmp_path, ["sea_ice", "sea ice"], per_class=2)
    with pytest.raises(ValueError, match="Duplicate class names"):
        load_dataset("image_folder", root=tmp_path)


def test_numbered_folders_one_based(tmp_path):
    make_folder(tmp_path, ["1", "2", "3"], per_class=2)
    names = ["x", "y", "z"]
    with pytest.raises(ValueError, match="look 1-based"):
        load_dataset("numbers", root=tmp_path, class_names=names)
    data = load_dataset("numbers", root=tmp_path, class_names=names, label_offset=1)
    np.testing.assert_array_equal(pixel_values(data.train) // 2, data.train.labels)


def test_eurosat_folder_with_aliases(tmp_path):
    # EuroSAT's archive: 2750/<CamelCase class>/<image>; folders in the archive's order.
    make_folder(tmp_path / "2750", EUROSAT_TFDS_LABELS, per_class=2)
    data = load_dataset("EuroSAT", root=tmp_path)
    assert data.class_names == protocol.class_names("eurosat")
    folder_of_value = {
        2 * i + j: name for i, name in enumerate(EUROSAT_TFDS_LABELS) for j in (0, 1)
    }
    for split in (data.train, data.test):
        for value, label in zip(pixel_values(split), split.labels):
            expected = CLASS_ALIASES["eurosat"][folder_of_value[value]]
            assert data.class_names[label] == expected


def test_folder_names_not_in_protocol(tmp_path):
    folders = [*EUROSAT_TFDS_LABELS[:-1], "SeaLakes"]
    make_folder(tmp_path / "2750", folders, per_class=2)
    with pytest.raises(ValueError) as info:
        load_dataset("eurosat", root=tmp_path, source="folder")
    message = str(info.value)
    assert "'SeaLakes'" in message
    assert "protocol classes not found" in message
    assert "'lake or sea'" in message


def test_bad_image_raises_with_path(tmp_path):
    make_folder(tmp_path, ["a", "b"], per_class=3)
    bad = tmp_path / "a" / "img_1.png"
    bad.write_bytes(bad.read_bytes()[:30])
    data = load_dataset("toy", root=tmp_path, test_fraction=0.34)
    everything = [data.train, data.test]
    with pytest.raises(ImageReadError, match="img_1.png"):
        for split in everything:
            split.load_images(range(len(split)))


def test_skip_bad_images_logs_each(tmp_path, caplog):
    make_folder(tmp_path, ["a", "b"], per_class=4)
    for name in ("img_0.png", "img_2.png"):
        path = tmp_path / "a" / name
        path.write_bytes(b"not an image")
    caplog.set_level(logging.WARNING, logger="cap_jax.data.sources")
    data = load_dataset("toy", root=tmp_path, test_fraction=0.25, skip_bad_images=True)
    assert len(data.train) + len(data.test) == 6
    skipped = [r.getMessage() for r in caplog.records if "Skipping unreadable" in r.getMessage()]
    assert len(skipped) == 2
    assert any("img_0.png" in message for message in skipped)
    assert any("img_2.png" in message for message in skipped)
    for split in (data.train, data.test):
        assert len(split.load_images(range(len(split)))) == len(split)


def test_subsets_after_split(tmp_path):
    make_folder(tmp_path, ["a", "b"], per_class=10)
    data = load_dataset("toy", root=tmp_path, train_subset=6, test_subset=2, subset_seed=1)
    assert len(data.train) == 6
    assert len(data.test) == 2
    np.testing.assert_array_equal(np.bincount(data.train.labels), [3, 3])


def test_holdout_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [10, 4, 2])
    train, test = holdout_split(labels, 0.25, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[test]), [2, 1, 1])
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == len(labels)
    again = holdout_split(labels, 0.25, seed=0)
    np.testing.assert_array_equal(again[1], test)
    with pytest.raises(ValueError, match="at least 2"):
        holdout_split(np.array([0, 0, 1]), 0.5, seed=0)


def test_unknown_dataset_without_root():
    with pytest.raises(ValueError, match="Unknown dataset 'pets'"):
        load_dataset("pets")


def test_missing_dataset_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("resisc45", root=tmp_path / "absent")
    message = str(info.value)
    assert "resisc45" in message
    assert "NWPU-RESISC45" in message
    assert "manual" in message


# ---------------------------------------------------------------------------------------------
# Original archive layouts.


def test_cub_archive(tmp_path):
    base = tmp_path / "CUB_200_2011"
    folders = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    (base / "images").mkdir(parents=True)
    (base / "classes.txt").write_text("".join(f"{i + 1} {f}\n" for i, f in enumerate(folders)))
    images, class_labels, split = [], [], []
    for image_id in range(1, 9):
        class_id = 1 + (image_id - 1) % 2
        relative = f"{folders[class_id - 1]}/bird_{image_id}.png"
        write_png(base / "images" / relative, image_id)
        images.append(f"{image_id} {relative}\n")
        class_labels.append(f"{image_id} {class_id}\n")
        split.append(f"{image_id} {int(image_id <= 4)}\n")
    (base / "images.txt").write_text("".join(images))
    (base / "image_class_labels.txt").write_text("".join(class_labels))
    (base / "train_test_split.txt").write_text("".join(split))
    data = load_dataset("cub", root=tmp_path)
    assert data.name == "caltech_birds2011"
    assert data.class_names == ("black footed albatross", "laysan albatross")
    np.testing.assert_array_equal(pixel_values(data.train), [1, 2, 3, 4])
    np.testing.assert_array_equal(data.train.labels, [0, 1, 0, 1])
    np.testing.assert_array_equal(pixel_values(data.test), [5, 6, 7, 8])

    (base / "image_class_labels.txt").write_text("".join(class_labels).replace("1 1\n", "1 2\n", 1))
    with pytest.raises(ValueError, match="labeled 2 .* folder of 'black footed albatross'"):
        load_dataset("cub", root=tmp_path)


def test_dtd_archive(tmp_path):
    names = protocol.class_names("dtd")
    base = tmp_path / "dtd"
    (base / "labels").mkdir(parents=True)
    value = 0
    for split in ("train1", "val1", "test1"):
        lines = []
        for name in names:
            relative = f"{name}/{name}_{split}.png"
            write_png(base / "images" / relative, value % 256)
            lines.append(relative + "\n")
            value += 1
        (base / "labels" / f"{split}.txt").write_text("".join(lines))
    data = load_dataset("dtd", root=tmp_path, source="folder")
    assert len(data.train) == 47
    np.testing.assert_array_equal(data.train.labels, np.arange(47))
    np.testing.assert_array_equal(pixel_values(data.test), np.arange(94, 141))
    trainval = load_dataset("dtd", root=tmp_path, source="folder", train_split="trainval")
    assert len(trainval.train) == 94
    with pytest.raises(ValueError, match="train_split must be"):
        load_dataset("dtd", root=tmp_path, source="folder", train_split="all")


def test_flowers_archive(tmp_path):
    (tmp_path / "jpg").mkdir()
    labels = np.tile(np.arange(1, 103), 3)  # 1-based, in the protocol's class order
    for image_id in range(1, len(labels) + 1):
        (tmp_path / "jpg" / f"image_{image_id:05d}.jpg").write_bytes(png_bytes(image_id % 256))
    scipy.io.savemat(tmp_path / "imagelabels.mat", {"labels": labels[None, :]})
    ids = np.arange(1, 307)
    scipy.io.savemat(
        tmp_path / "setid.mat",
        {"trnid": ids[:102][None], "valid": ids[102:204][None], "tstid": ids[204:][None]},
    )
    data = load_dataset("flowers102", root=tmp_path)
    assert data.class_names == protocol.class_names("oxford_flowers102")
    np.testing.assert_array_equal(data.train.labels, np.arange(102))
    np.testing.assert_array_equal(data.test.labels, np.arange(102))
    assert len(load_dataset("flowers102", root=tmp_path, train_split="trainval").train) == 204


def test_fgvc_aircraft_archive(tmp_path):
    names = protocol.class_names("fgvc_aircraft")
    base = tmp_path / "fgvc-aircraft-2013b" / "data"
    (base / "images").mkdir(parents=True)
    image_id = 1000000
    for split in ("train", "val", "test"):
        lines = []
        for name in reversed(names):
            (base / "images" / f"{image_id}.jpg").write_bytes(png_bytes(image_id % 256))
            lines.append(f"{image_id} {name}\n")
            image_id += 1
        (base / f"images_variant_{split}.txt").write_text("".join(lines))
    data = load_dataset("FGVCAircraft", root=tmp_path)
    np.testing.assert_array_equal(data.train.labels, np.arange(99, -1, -1))
    assert data.train.images.paths[0].endswith("1000000.jpg")
    assert len(data.test) == 100


# ---------------------------------------------------------------------------------------------
# Prepared tfds datasets, read without TensorFlow.


def prepare_mock_tfds(data_dir, name, config, version, label_feature, splits, extra=None):
    """Prepare a mock tfds dataset in array_record format (PNG images, no TensorFlow)."""
    import tensorflow_datasets as tfds

    features = {"image": tfds.features.Image(shape=(None, None, 3)), "label": label_feature}
    features.update(extra or {})

    class Mock(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(rows) for split, rows in splits.items()}

        def _generate_examples(self, rows):
            yield from enumerate(rows)

    Mock.name = name
    builder = Mock(data_dir=str(data_dir), config=config, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder


def pil(value):
    return PIL.Image.open(io.BytesIO(png_bytes(value)))


@pytest.fixture(scope="module")
def eurosat_tfds(tmp_path_factory):
    import tensorflow_datasets as tfds

    data_dir = tmp_path_factory.mktemp("tfds")
    # Reversed label order, so the mapping onto the protocol must reorder.
    source_names = list(reversed(EUROSAT_TFDS_LABELS))
    rows = [{"image": pil(i), "label": i % 10} for i in range(40)]
    prepare_mock_tfds(
        data_dir,
        "eurosat",
        "rgb",
        "2.0.0",
        tfds.features.ClassLabel(names=source_names),
        {"train": rows},
    )
    return data_dir, source_names


def check_eurosat(data, source_names):
    assert data.class_names == protocol.class_names("eurosat")
    for split in (data.train, data.test):
        for value, label in zip(pixel_values(split), split.labels):
            expected = CLASS_ALIASES["eurosat"][source_names[value % 10]]
            assert data.class_names[label] == expected


def test_tfds_array_record_without_tensorflow(eurosat_tfds):
    data_dir, source_names = eurosat_tfds
    data = load_dataset("eurosat", root=data_dir, source="tfds")
    assert len(data.train) == 30
    assert len(data.test) == 10
    check_eurosat(data, source_names)
    assert "tensorflow" not in sys.modules
    assert data.train.describe_image(0).startswith("eurosat/rgb/2.0.0:train record")


def write_tfrecord(path, records):
    with open(path, "wb") as handle:
        for record in records:
            length = struct.pack("<Q", len(record))
            handle.write(length + struct.pack("<I", tfds_source.masked_crc32c(length)))
            handle.write(record + struct.pack("<I", tfds_source.masked_crc32c(record)))


def convert_to_tfrecord(version_dir: Path, target_dir: Path):
    import tensorflow_datasets as tfds

    shutil.copytree(version_dir, target_dir)
    info_path = target_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    builder = tfds.builder_from_directory(str(version_dir))
    for split in info["splits"]:
        raw = builder.as_data_source(
            split=split["name"], deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )
        shard = f"{info['name']}-{split['name']}.tfrecord-00000-of-00001"
        write_tfrecord(target_dir / shard, [raw[i] for i in range(len(raw))])
    for path in target_dir.glob("*.array_record-*"):
        path.unlink()
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))


def test_tfds_tfrecord_without_tensorflow(eurosat_tfds, tmp_path):
    data_dir, source_names = eurosat_tfds
    convert_to_tfrecord(data_dir / "eurosat/rgb/2.0.0", tmp_path / "eurosat/rgb/2.0.0")
    data = load_dataset("eurosat", root=tmp_path)
    reference = load_dataset("eurosat", root=data_dir)
    check_eurosat(data, source_names)
    np.testing.assert_array_equal(data.train.labels, reference.train.labels)
    np.testing.assert_array_equal(pixel_values(data.test), pixel_values(reference.test))
    assert "tensorflow" not in sys.modules


def test_tfrecord_corrupt_and_truncated(tmp_path):
    path = tmp_path / "data.tfrecord"
    write_tfrecord(path, [b"first", b"second record"])
    shards = tfds_source.TFRecordShards([str(path)])
    assert len(shards) == 2
    assert shards[1] == b"second record"
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        tfds_source.TFRecordShards([str(path)])
    path.write_bytes(data[:8] + b"\x00\x00\x00\x00" + data[12:])
    with pytest.raises(ValueError, match="checksum"):
        tfds_source.TFRecordShards([str(path)])


def test_crc32c_known_value():
    # The CRC-32C check value of "123456789" (Castagnoli polynomial).
    assert tfds_source.crc32c(b"123456789") == 0xE3069283


def test_tfds_dtd_trainval(tmp_path):
    import tensorflow_datasets as tfds

    names = [name.replace(" ", "_") for name in protocol.class_names("dtd")]
    splits = {
        split: [{"image": pil(offset + i), "label": i} for i in range(47)]
        for split, offset in (("train", 0), ("validation", 50), ("test", 100))
    }
    prepare_mock_tfds(tmp_path, "dtd", None, "3.0.1", tfds.features.ClassLabel(names=names), splits)
    data = load_dataset("dtd", root=tmp_path)
    assert len(data.train) == 47
    assert len(data.test) == 47
    trainval = load_dataset("dtd", root=tmp_path, train_split="trainval")
    assert len(trainval.train) == 94
    np.testing.assert_array_equal(np.bincount(trainval.train.labels), [2] * 47)
    assert set(pixel_values(trainval.train)) == set(range(47)) | set(range(50, 97))


def test_tfds_cub_names_from_label_name(tmp_path):
    import tensorflow_datasets as tfds

    label_names = ["black_footed_albatross", "laysan_albatross", "sooty_albatross"]
    splits = {
        split: [
            {"image": pil(i), "label": i % 3, "label_name": label_names[i % 3]} for i in range(6)
        ]
        for split in ("train", "test")
    }
    prepare_mock_tfds(
        tmp_path,
        "caltech_birds2011",
        None,
        "0.2.0",
        tfds.features.ClassLabel(num_classes=3),
        splits,
        extra={"label_name": tfds.features.Text()},
    )
    data = load_dataset("caltech_birds2011", root=tmp_path)
    assert data.class_names == ("black footed albatross", "laysan albatross", "sooty albatross")
    np.testing.assert_array_equal(pixel_values(data.train) % 3, data.train.labels)


def test_tfds_missing_classes_named(tmp_path):
    import tensorflow_datasets as tfds

    rows = [{"image": pil(i), "label": i % 9} for i in range(36)]
    prepare_mock_tfds(
        tmp_path,
        "eurosat",
        "rgb",
        "2.0.0",
        tfds.features.ClassLabel(names=EUROSAT_TFDS_LABELS),
        {"train": rows},
    )
    with pytest.raises(ValueError, match="no image of 1 of its 10 classes: '9: lake or sea'"):
        load_dataset("eurosat", root=tmp_path)


def test_tfds_prepare_without_tensorflow_explains(tmp_path):
    (tmp_path / "manual").mkdir()
    with pytest.raises(RuntimeError, match="needs TensorFlow"):
        load_dataset("resisc45", root=tmp_path, download=True, manual_dir=tmp_path / "manual")
