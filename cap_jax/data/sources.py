"""Benchmark datasets from public sources, selected by name: `load_dataset`.

Sources, chosen by `source` ("auto" picks the first that is present):

- "idx": Fashion-MNIST's idx files (`cap_jax.data.fashion_mnist`).
- "tfds": a dataset prepared by TensorFlow Datasets (eurosat/rgb, dtd, oxford_flowers102,
  caltech_birds2011, resisc45) under `root` (a tfds data_dir, default `$TFDS_DATA_DIR` or
  `~/tensorflow_datasets`). Reading needs no TensorFlow, preparing does (`download=True`). See
  `cap_jax.data.tfds_source` for what works without it.
- "folder": the original archive's layout (CUB, DTD, Flowers102, FGVC-Aircraft) or an image
  folder `ROOT/<class>/<image>` (EuroSAT's `2750/`, RESISC45's `NWPU-RESISC45/`, or any other
  dataset by passing a name that is not a known benchmark), see `cap_jax.data.layouts`.

Labels are mapped to the protocol's class names and order (`cap_jax.data.protocol`), then checked
to cover 0..C-1 in each split. Sources whose names differ from the protocol's go through alias
tables. EuroSAT's folders are CamelCase, and three tfds Flowers102 names differ from the
protocol's.

Datasets without a test split (EuroSAT, RESISC45 and one-pool image folders) are split here,
stratified, with `test_fraction` and `split_seed`.
NOTE: that split is ours. It is not the split files of the PyTorch reference, so test accuracies
on these datasets are comparable in distribution only, not image for image.

NOTE: the unlabeled pool is the source's train split by default (`train_split="trainval"` adds
the validation split). Which of the two the PyTorch reference used for DTD, Flowers102 and
FGVC-Aircraft is not confirmed here. DTD uses fold 1 of its ten folds, as tfds does.

Opening a tfds split parses every record once to collect the labels (the images stay encoded),
which takes one pass over the files.

Images are decoded lazily. An unreadable or truncated image raises `ImageReadError` with its
path (or tfds record) when it is read. With `skip_bad_images=True` every image is decoded once at
load time and the bad ones are dropped, each logged as a warning. That costs one full pass over
the images.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cap_jax.data import labels as labels_lib
from cap_jax.data import layouts, protocol, tfds_source
from cap_jax.data.dataset import (
    ClassificationData,
    ImageDataset,
    ImageReadError,
    subset_indices,
)
from cap_jax.data.fashion_mnist import load_fashion_mnist

logger = logging.getLogger(__name__)

# Canonical dataset name -> tfds name (with config).
TFDS_NAMES = {
    "eurosat": "eurosat/rgb",
    "dtd": "dtd",
    "oxford_flowers102": "oxford_flowers102",
    "caltech_birds2011": "caltech_birds2011",
    "resisc45": "resisc45",
}

# Source class name -> protocol class name, where they differ beyond case and '_' vs ' '.
CLASS_ALIASES = {
    "eurosat": {
        "AnnualCrop": "annual crop land",
        "Forest": "forest",
        "HerbaceousVegetation": "brushland or shrubland",
        "Highway": "highway or road",
        "Industrial": "industrial buildings or commercial buildings",
        "Pasture": "pasture land",
        "PermanentCrop": "permanent crop land",
        "Residential": "residential buildings or homes or apartments",
        "River": "river",
        "SeaLake": "lake or sea",
    },
    "oxford_flowers102": {
        "globe-flower": "globe flower",
        "pink-yellow dahlia?": "pink and yellow dahlia",
        "ball moss": "air plant",
    },
}

# tfds splits that make up the train pool and the test split.
_TFDS_SPLITS = {
    "dtd": {"train": "train", "trainval": "train+validation", "test": "test"},
    "oxford_flowers102": {"train": "train", "trainval": "train+validation", "test": "test"},
    "caltech_birds2011": {"train": "train", "test": "test"},
    "eurosat": {"pool": "train"},
    "resisc45": {"pool": "train"},
}

# Subfolders that hold the class folders in the original archives.
_FOLDER_ROOTS = {
    "eurosat": ("2750", "EuroSAT_RGB", "EuroSAT"),
    "resisc45": ("NWPU-RESISC45",),
}

_RESISC45_MANUAL = (
    "tfds resisc45 needs a manual download: get NWPU-RESISC45.rar (see the tfds catalog page of "
    "resisc45), extract it so that <manual_dir>/NWPU-RESISC45/airplane/airplane_001.jpg exists "
    "(manual_dir defaults to <data_dir>/downloads/manual), then call load_dataset('resisc45', "
    "download=True, manual_dir=...) where TensorFlow is installed. Without TensorFlow, pass "
    "root=<folder that contains NWPU-RESISC45> to read the extracted images directly."
)


def _default_tfds_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR", Path.home() / "tensorflow_datasets"))


def holdout_split(
    labels: np.ndarray, test_fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split a pool into train and test ids, stratified.

    Each class sends `round(n_c * test_fraction)` of its images to test, clipped to 1..n_c-1,
    drawn with `np.random.default_rng(seed)`. Returns sorted int64 (train_ids, test_ids).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for class_id in np.unique(labels):
        members = np.flatnonzero(labels == class_id)
        if len(members) < 2:
            raise ValueError(
                f"Class {class_id} has {len(members)} image; a train/test split needs at least 2."
            )
        count = int(np.clip(round(len(members) * test_fraction), 1, len(members) - 1))
        chosen = rng.permutation(members)
        test.append(chosen[:count])
        train.append(chosen[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _drop_unreadable(dataset: ImageDataset, *, source: str) -> ImageDataset:
    """Decode every image once and drop those that fail, logging each skipped one."""
    images = dataset.images
    if isinstance(images, np.ndarray):
        return dataset

    def readable(index: int) -> bool:
        try:
            images[index]
        except ImageReadError as error:
            logger.warning("Skipping unreadable image in %s: %s", source, error)
            return False
        return True

    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        keep = np.fromiter(pool.map(readable, range(len(dataset))), dtype=bool, count=len(dataset))
    if keep.all():
        return dataset
    logger.warning("Skipped %d of %d images in %s.", int((~keep).sum()), len(dataset), source)
    return dataset.subset(np.flatnonzero(keep))


def _tfds_split(
    version_dir: Path, split: str, name: str, class_names: Sequence[str] | None
) -> tuple[tuple[str, ...], ImageDataset]:
    images, example, features = tfds_source.open_prepared_split(version_dir, split)
    source = f"tfds {TFDS_NAMES[name]} split {split!r}"
    # Reading the labels parses every record once; the images stay encoded.
    records = [example(i) for i in range(len(images))]
    source_labels = np.asarray([record["label"] for record in records], dtype=np.int64)
    if name == "caltech_birds2011":
        # CUB's ClassLabel has no names; ids follow classes.txt and label_name is the folder
        # name after the dot, in lower case.
        names = {}
        for record, label in zip(records, source_labels):
            text = record["label_name"]
            names[int(label)] = text.decode() if isinstance(text, bytes) else str(text)
        if class_names is None:
            if sorted(names) != list(range(len(names))):
                raise ValueError(f"{source}: CUB label ids are not contiguous from 0.")
            class_names = tuple(names[i].replace("_", " ") for i in range(len(names)))
        labels = source_labels
    else:
        source_names = list(features["label"].names)
        mapping = labels_lib.match_class_names(
            source_names, class_names, source=source, aliases=CLASS_ALIASES.get(name)
        )
        labels = mapping[source_labels]
    labels_lib.check_labels(labels, class_names, source=source)
    return tuple(class_names), ImageDataset(class_names, images, labels)


def _load_tfds(
    name: str,
    data_dir: Path,
    class_names: Sequence[str] | None,
    *,
    train_split: str,
    download: bool,
    manual_dir,
) -> dict[str, ImageDataset] | None:
    tfds_name = TFDS_NAMES[name]
    version_dir = tfds_source.find_prepared_dir(data_dir, tfds_name)
    if version_dir is None and download:
        tfds_source.prepare(tfds_name, data_dir, manual_dir=manual_dir)
        version_dir = tfds_source.find_prepared_dir(data_dir, tfds_name)
    if version_dir is None:
        return None
    table = _TFDS_SPLITS[name]
    if "pool" in table:
        requested = {"pool": table["pool"]}
    else:
        if train_split not in table:
            raise ValueError(
                f"train_split {train_split!r} is not available for {name}; choose from "
                f"{sorted(k for k in table if k != 'test')}."
            )
        requested = {"train": table[train_split], "test": table["test"]}
    splits = {}
    for key, split in requested.items():
        class_names, splits[key] = _tfds_split(version_dir, split, name, class_names)
    return splits


def _load_files(
    name: str,
    root: Path,
    class_names: Sequence[str] | None,
    *,
    train_split: str,
    label_offset: int,
) -> tuple[tuple[str, ...], dict[str, ImageDataset]]:
    if name == "caltech_birds2011":
        class_names, file_splits = layouts.read_cub(root)
    elif name == "dtd":
        file_splits = layouts.read_dtd(root, class_names, train_split=train_split)
    elif name == "oxford_flowers102":
        file_splits = layouts.read_flowers102(root, class_names, train_split=train_split)
    elif name == "fgvc_aircraft":
        file_splits = layouts.read_fgvc_aircraft(root, class_names, train_split=train_split)
    else:
        folder = root
        for candidate in _FOLDER_ROOTS.get(name, ()):
            if (root / candidate).is_dir():
                folder = root / candidate
                break
        class_names, file_splits = layouts.read_image_folder(
            folder, class_names, aliases=CLASS_ALIASES.get(name), label_offset=label_offset
        )
    class_names = tuple(class_names)
    return class_names, {
        split: ImageDataset(class_names, files.paths, files.labels)
        for split, files in file_splits.items()
    }


def _not_found_message(name: str, root: Path | None, data_dir: Path) -> str:
    lines = [f"Dataset {name} not found."]
    if name in TFDS_NAMES:
        lines.append(
            f"No prepared tfds dataset {TFDS_NAMES[name]} under {data_dir} (pass root=<tfds "
            "data_dir>, or download=True where TensorFlow is installed)."
        )
    if root is not None:
        lines.append(f"No readable {name} files under {root} either.")
    else:
        lines.append("Or pass root=<folder with the original archive or an image folder>.")
    if name == "resisc45":
        lines.append(_RESISC45_MANUAL)
    return " ".join(lines)


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    source: str = "auto",
    class_names: Sequence[str] | None = None,
    train_split: str = "train",
    train_subset: int | None = None,
    test_subset: int | None = None,
    subset_seed: int = 0,
    stratified: bool = True,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    label_offset: int = 0,
    skip_bad_images: bool = False,
    download: bool = False,
    manual_dir: str | os.PathLike | None = None,
) -> ClassificationData:
    """Load a benchmark as `ClassificationData` in the protocol's class order.

    Args:
        name: a benchmark (fashion_mnist, eurosat, dtd, oxford_flowers102, caltech_birds2011,
            resisc45, fgvc_aircraft, or an alias such as "Flowers102" or "CUB"), or any other
            name for an image folder at `root` (then `source` must be "folder" or "auto").
        root: where the data is: the idx folder (Fashion-MNIST), a tfds data_dir or prepared
            version folder, the extracted original archive, or an image folder.
        source: "auto", "idx", "tfds" or "folder" (see the module docstring).
        class_names: class names in class-id order. Default: the protocol's list (CUB: its
            classes.txt; other image folders: the sorted folder names).
        train_split: "train", or "trainval" to add the validation split to the unlabeled pool
            (DTD, Flowers102, FGVC-Aircraft).
        train_subset: keep this many pool images (None: all).
        test_subset: keep this many test images (None: all).
        subset_seed: seed of the subset draws.
        stratified: proportional per-class subsets (True) or the first n images (False).
        test_fraction: share of each class held out for test where the source has no test split.
        split_seed: seed of that hold-out.
        label_offset: subtracted from numbered class folders (1 for folders named 1..C).
        skip_bad_images: decode every image at load time and drop unreadable ones (logged),
            instead of raising `ImageReadError` when a bad image is read.
        download: prepare the tfds dataset when it is missing (needs TensorFlow).
        manual_dir: tfds manual download folder (RESISC45).

    Returns:
        `ClassificationData` whose `train` is the unlabeled pool and `test` the evaluation split.

    Raises:
        FileNotFoundError: the data is not found. The message lists the places searched and how
            to provide the data.
        ValueError: class names or labels that do not match the protocol, naming what is off.
    """
    if source not in ("auto", "idx", "tfds", "folder"):
        raise ValueError(f"source must be 'auto', 'idx', 'tfds' or 'folder', got {source!r}.")
    try:
        name = protocol.canonical_name(name)
    except ValueError:
        if source not in ("auto", "folder") or root is None:
            raise
        source = "folder"
    root_path = None if root is None else Path(root)

    if name == "fashion_mnist":
        if source not in ("auto", "idx"):
            raise ValueError(f"Fashion-MNIST is read from idx files, not source={source!r}.")
        return load_fashion_mnist(
            root,
            train_subset=train_subset,
            test_subset=test_subset,
            subset_seed=subset_seed,
            stratified=stratified,
        )
    if source == "idx":
        raise ValueError(f"source='idx' is only for Fashion-MNIST, not {name}.")

    if class_names is None and name in protocol.DATASETS and name != "caltech_birds2011":
        class_names = protocol.class_names(name)

    splits = None
    data_dir = root_path if root_path is not None else _default_tfds_dir()
    if name in TFDS_NAMES and source in ("auto", "tfds"):
        splits = _load_tfds(
            name,
            data_dir,
            class_names,
            train_split=train_split,
            download=download,
            manual_dir=manual_dir,
        )
        if splits is None and source == "tfds":
            raise FileNotFoundError(_not_found_message(name, None, data_dir))
        if splits is not None:
            class_names = next(iter(splits.values())).class_names
    if splits is None:
        if source == "tfds":
            raise ValueError(f"{name} has no tfds source; use source='folder'.")
        if root_path is None or not root_path.exists():
            raise FileNotFoundError(_not_found_message(name, root_path, data_dir))
        class_names, splits = _load_files(
            name, root_path, class_names, train_split=train_split, label_offset=label_offset
        )

    if "pool" in splits:
        pool = splits["pool"]
        train_ids, test_ids = holdout_split(pool.labels, test_fraction, seed=split_seed)
        splits = {"train": pool.subset(train_ids), "test": pool.subset(test_ids)}
    for split, size in (("train", train_subset), ("test", test_subset)):
        if size is not None:
            keep = subset_indices(
                splits[split].labels, size, seed=subset_seed, stratified=stratified
            )
            splits[split] = splits[split].subset(keep)
        if skip_bad_images:
            splits[split] = _drop_unreadable(splits[split], source=f"{name} {split}")
    return ClassificationData(name, tuple(class_names), splits["train"], splits["test"])
