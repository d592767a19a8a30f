"""Readers for image files on disk: image folders and the original dataset archives.

Each reader returns, per split, the image paths and labels in the protocol's class order. It
checks only the annotation files and that the listed images exist. Images are decoded later, on
demand.

Layouts:
- image folder: `ROOT/<class>/<image>` (one pool, split later) or `ROOT/train/<class>/<image>` and
  `ROOT/test/<class>/<image>`. Images may sit in subfolders of a class folder.
- CUB-200-2011: `CUB_200_2011/` with `classes.txt`, `images.txt`, `image_class_labels.txt`,
  `train_test_split.txt` and `images/`.
- DTD: `dtd/` with `images/<class>/` and `labels/{train,val,test}1.txt` (fold 1, as tfds uses).
- Oxford Flowers 102: `jpg/`, `imagelabels.mat` (labels 1..102) and `setid.mat` (1-based image
  ids in `trnid`, `valid`, `tstid`). The labels follow the protocol's class order.
- FGVC-Aircraft 2013b: `fgvc-aircraft-2013b/data/` with `images/`, `variants.txt` and
  `images_variant_{train,val,trainval,test}.txt` (variant labels).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cap_jax.data import labels as labels_lib
from cap_jax.data.protocol import cub_class_name, cub_class_names

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


@dataclasses.dataclass
class FileSplit:
    """Image files of one split with labels in the protocol's class order."""

    paths: list[str]
    labels: np.ndarray


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(root: Path) -> list[str]:
    return sorted(
        child.name for child in root.iterdir() if child.is_dir() and not child.name.startswith(".")
    )


def _images_under(folder: Path) -> list[str]:
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        found.extend(os.path.join(directory, name) for name in sorted(files) if _is_image(name))
    return found


def _scan_folder(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Return (class folder names, image paths, folder index of each image)."""
    folders = _class_folders(root)
    if not folders:
        raise FileNotFoundError(
            f"No class folders in {root}; expected ROOT/<class>/<image> or ROOT/train/<class>/ "
            "and ROOT/test/<class>/."
        )
    paths, folder_ids = [], []
    for folder_id, folder in enumerate(folders):
        images = _images_under(root / folder)
        paths.extend(images)
        folder_ids.extend([folder_id] * len(images))
    if not paths:
        raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
    return folders, paths, np.asarray(folder_ids, dtype=np.int64)


def _folder_labels(
    folders: list[str],
    folder_ids: np.ndarray,
    class_names: Sequence[str],
    *,
    source: str,
    aliases: Mapping[str, str] | None,
    label_offset: int,
) -> np.ndarray:
    if all(folder.isdigit() for folder in folders):
        # Numbered folders are class ids; check_labels explains ids that look 1-based.
        ids = np.asarray([int(folder) - label_offset for folder in folders], dtype=np.int64)
        labels = ids[folder_ids]
        labels_lib.check_labels(labels, class_names, source=source)
        return labels
    mapping = labels_lib.match_class_names(folders, class_names, source=source, aliases=aliases)
    return mapping[folder_ids]


def read_image_folder(
    root: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    aliases: Mapping[str, str] | None = None,
    label_offset: int = 0,
) -> tuple[tuple[str, ...], dict[str, FileSplit]]:
    """Read an image-folder layout.

    Args:
        root: `ROOT` with `<class>/<image>` folders, or with `train/` and `test/` folders of that
            form.
        class_names: the protocol's class names; folder names are matched to them (normalised,
            through `aliases`). None: the classes are the sorted folder names with '_' read as
            ' '. Folders named by numbers are taken as class ids minus `label_offset`.
        aliases: folder name -> class name, for folders named differently from the protocol.
        label_offset: subtracted from numbered folder names (1 for folders numbered from 1).

    Returns:
        `(class_names, splits)`: splits has "train" and "test", or only "pool" when the folder
        has no train/test split.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} not found.")
    layout = {"pool": root}
    if (root / "train").is_dir() and (root / "test").is_dir():
        layout = {"train": root / "train", "test": root / "test"}
    scanned = {split: _scan_folder(folder) for split, folder in layout.items()}
    if class_names is None:
        folder_sets = {split: tuple(result[0]) for split, result in scanned.items()}
        if len(set(folder_sets.values())) > 1:
            raise ValueError(
                f"The train and test folders of {root} have different class folders: "
                f"{sorted(set(folder_sets['train']) ^ set(folder_sets['test']))}."
            )
        folders = next(iter(folder_sets.values()))
        class_names = tuple(name.replace("_", " ") for name in folders)
        labels_lib.check_unique_names(class_names, source=f"the class folders of {root}")
    class_names = tuple(class_names)
    splits = {}
    for split, (folders, paths, folder_ids) in scanned.items():
        labels = _folder_labels(
            folders,
            folder_ids,
            class_names,
            source=f"the class folders of {layout[split]}",
            aliases=aliases,
            label_offset=label_offset,
        )
        splits[split] = FileSplit(paths, labels)
    return class_names, splits


def _find_dir(root: Path, candidates: Sequence[str], marker: str) -> Path | None:
    """Return the first of root/candidate (or root itself) that contains `marker`."""
    for candidate in ("", *candidates):
        folder = root / candidate if candidate else root
        if (folder / marker).exists():
            return folder
    return None


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"Annotation file {path} not found.")
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def _check_exist(paths: Sequence[str]) -> None:
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image files listed by the annotations are missing, e.g. {missing[0]}."
        )


def read_cub(root: str | os.PathLike) -> tuple[tuple[str, ...], dict[str, FileSplit]]:
    """Read CUB-200-2011 from its archive layout (ROOT or ROOT/CUB_200_2011).

    Class names come from `classes.txt` (see `cub_class_names`); labels in
    `image_class_labels.txt` are 1-based there and become 0-based here. The split is
    `train_test_split.txt` (1: train, 0: test).
    """
    base = _find_dir(Path(root), ["CUB_200_2011"], "classes.txt")
    if base is None:
        raise FileNotFoundError(
            f"CUB_200_2011/classes.txt not found under {root}; pass the folder that contains "
            "CUB_200_2011 (extracted from CUB_200_2011.tgz)."
        )
    class_names = cub_class_names(base / "classes.txt")
    labels_lib.check_unique_names(class_names, source=f"{base / 'classes.txt'}")
    images = dict(line.split(maxsplit=1) for line in _read_lines(base / "images.txt"))
    class_ids = dict(line.split() for line in _read_lines(base / "image_class_labels.txt"))
    is_train = dict(line.split() for line in _read_lines(base / "train_test_split.txt"))
    splits = {"train": ([], []), "test": ([], [])}
    for image_id, relative in images.items():
        if image_id not in class_ids or image_id not in is_train:
            raise ValueError(
                f"CUB image {image_id} ({relative}) has no entry in image_class_labels.txt or "
                "train_test_split.txt."
            )
        folder = relative.split("/")[0]
        split = "train" if is_train[image_id] == "1" else "test"
        label = int(class_ids[image_id]) - 1
        if 0 <= label < len(class_names) and cub_class_name(folder) != class_names[label]:
            raise ValueError(
                f"CUB image {relative} is labeled {label + 1} ({class_names[label]!r}) but lies "
                f"in the folder of {cub_class_name(folder)!r}."
            )
        splits[split][0].append(os.fspath(base / "images" / relative))
        splits[split][1].append(label)
    result = {}
    for split, (paths, split_labels) in splits.items():
        split_labels = np.asarray(split_labels, dtype=np.int64)
        labels_lib.check_labels(split_labels, class_names, source=f"CUB {split}")
        _check_exist(paths)
        result[split] = FileSplit(paths, split_labels)
    return class_names, result


def _train_files(train_split: str, names: Mapping[str, str]) -> list[str]:
    if train_split == "train":
        return [names["train"]]
    if train_split == "trainval":
        return [names["train"], names["val"]]
    raise ValueError(f"train_split must be 'train' or 'trainval', got {train_split!r}.")


def read_dtd(
    root: str | os.PathLike, class_names: Sequence[str], *, train_split: str = "train"
) -> dict[str, FileSplit]:
    """Read DTD from its archive layout (ROOT or ROOT/dtd), split fold 1."""
    base = _find_dir(Path(root), ["dtd"], "labels")
    if base is None:
        raise FileNotFoundError(
            f"dtd/labels/ not found under {root}; pass the folder that contains dtd/ (extracted "
            "from dtd-r1.0.1.tar.gz)."
        )
    files = {"train": "train1.txt", "val": "val1.txt", "test": "test1.txt"}
    parts = {"train": _train_files(train_split, files), "test": [files["test"]]}
    result = {}
    for split, names in parts.items():
        relative = [line for name in names for line in _read_lines(base / "labels" / name)]
        folders = sorted({line.split("/")[0] for line in relative})
        mapping = labels_lib.match_class_names(folders, class_names, source=f"DTD {split} folders")
        folder_id = {folder: i for i, folder in enumerate(folders)}
        labels = np.asarray([mapping[folder_id[line.split("/")[0]]] for line in relative])
        paths = [os.fspath(base / "images" / line) for line in relative]
        _check_exist(paths)
        result[split] = FileSplit(paths, labels.astype(np.int64))
    return result


def read_flowers102(
    root: str | os.PathLike, class_names: Sequence[str], *, train_split: str = "train"
) -> dict[str, FileSplit]:
    """Read Oxford Flowers 102 from its files (`jpg/`, `imagelabels.mat`, `setid.mat`)."""
    base = _find_dir(Path(root), ["flowers-102", "flowers102"], "imagelabels.mat")
    if base is None:
        raise FileNotFoundError(
            f"imagelabels.mat not found under {root}; pass the folder with jpg/, "
            "imagelabels.mat and setid.mat."
        )
    import scipy.io  # Only this layout needs scipy.

    image_labels = np.asarray(scipy.io.loadmat(base / "imagelabels.mat")["labels"]).reshape(-1)
    set_ids = scipy.io.loadmat(base / "setid.mat")
    # The .mat labels are 1-based in the protocol's class order.
    labels_lib.check_labels(image_labels - 1, class_names, source=f"{base / 'imagelabels.mat'}")
    keys = {"train": "trnid", "val": "valid", "test": "tstid"}
    parts = {"train": _train_files(train_split, keys), "test": [keys["test"]]}
    result = {}
    for split, names in parts.items():
        ids = np.concatenate([np.asarray(set_ids[key]).reshape(-1) for key in names])
        paths = [os.fspath(base / "jpg" / f"image_{int(i):05d}.jpg") for i in ids]
        labels = (image_labels[ids - 1] - 1).astype(np.int64)
        labels_lib.check_labels(labels, class_names, source=f"Flowers102 {split}")
        _check_exist(paths)
        result[split] = FileSplit(paths, labels)
    return result


_FGVC_LINE = re.compile(r"^(\S+)\s+(.+)$")


def read_fgvc_aircraft(
    root: str | os.PathLike, class_names: Sequence[str], *, train_split: str = "train"
) -> dict[str, FileSplit]:
    """Read FGVC-Aircraft 2013b at the variant level (ROOT, ROOT/data or
    ROOT/fgvc-aircraft-2013b/data)."""
    base = _find_dir(Path(root), ["data", "fgvc-aircraft-2013b/data"], "images_variant_test.txt")
    if base is None:
        raise FileNotFoundError(
            f"images_variant_test.txt not found under {root}; pass the folder extracted from "
            "fgvc-aircraft-2013b.tar.gz."
        )
    files = {
        "train": "images_variant_train.txt",
        "val": "images_variant_val.txt",
        "test": "images_variant_test.txt",
    }
    parts = {"train": _train_files(train_split, files), "test": [files["test"]]}
    result = {}
    for split, names in parts.items():
        entries = []
        for name in names:
            for line in _read_lines(base / name):
                match = _FGVC_LINE.match(line)
                if match is None:
                    raise ValueError(
                        f"{base / name}: expected '<image id> <variant>', got {line!r}."
                    )
                entries.append(match.groups())
        variants = sorted({variant for _, variant in entries})
        mapping = labels_lib.match_class_names(
            variants, class_names, source=f"FGVC-Aircraft {split} variants"
        )
        variant_id = {variant: i for i, variant in enumerate(variants)}
        labels = np.asarray([mapping[variant_id[variant]] for _, variant in entries])
        paths = [os.fspath(base / "images" / f"{image_id}.jpg") for image_id, _ in entries]
        _check_exist(paths)
        result[split] = FileSplit(paths, labels.astype(np.int64))
    return result
