"""The benchmark protocol: class names, TRZSL seen/unseen splits, SSL labeled images.

The class lists and the seen/unseen splits for split seeds 500, 0 and 200 ship with the package
(`class_names/<Dataset>.txt` and `<Dataset>.json` in this folder). They follow the ELEVATER
splits as used by the CPL paper and "Enhancing CLIP with CLIP" (Menghini et al., 2023), which
CAP inherits. Split seed 500 is the one CAP reports.

- `split_classes` recomputes a split: `np.random.seed(seed)`, then
  `np.random.choice(range(C), size=int(C * 0.62), replace=False)` gives the seen classes in the
  order drawn. A private `RandomState(seed)` makes the same draw without touching numpy's
  global state. The unseen classes are the rest, in the order of Python's
  `set(range(C)) - set(seen)`, because the shipped splits list them in that order. For ints,
  CPython's set order follows the hash-table slots, so it is not always ascending (EuroSAT's
  seed 500 split lists "river" before "forest"). Pass `sort_unseen=True` for class order.
- `select_labeled` picks the few labeled images of the semi-supervised setting the way the
  reference code does: the generator is seeded once, then for each class in id order it draws
  `per_class` images of that class without replacement.

CUB's class order is that of `CUB_200_2011/classes.txt` (the part after the dot, underscores read
as spaces, lower case). It is not shipped; `cub_class_names` reads it from that file.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources

import numpy as np

SEEN_FRACTION = 0.62

# Canonical dataset name -> stem of its shipped protocol files.
_PROTOCOL_STEMS = {
    "eurosat": "EuroSAT",
    "dtd": "DTD",
    "oxford_flowers102": "Flowers102",
    "resisc45": "RESISC45",
    "fgvc_aircraft": "FGVCAircraft",
}

# Spellings accepted for each canonical name, compared after `_name_key`.
_ALIASES = {
    "fashion_mnist": ("fashionmnist",),
    "eurosat": ("eurosat", "eurosatrgb"),
    "dtd": ("dtd", "describabletextures"),
    "oxford_flowers102": ("oxfordflowers102", "flowers102", "flowers"),
    "caltech_birds2011": ("caltechbirds2011", "cub", "cub200", "cub2002011"),
    "resisc45": ("resisc45", "nwpuresisc45"),
    "fgvc_aircraft": ("fgvcaircraft", "aircraft"),
}

DATASETS = tuple(_ALIASES)


def _name_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_name(name: str) -> str:
    """Map a dataset name or alias ("EuroSAT", "flowers102", "CUB", ...) to its canonical name.

    Canonical names: fashion_mnist, eurosat, dtd, oxford_flowers102, caltech_birds2011,
    resisc45, fgvc_aircraft.
    """
    key = _name_key(name)
    for canonical, aliases in _ALIASES.items():
        if key in aliases:
            return canonical
    raise ValueError(f"Unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}.")


def _protocol_file(relative: str) -> str:
    return resources.files(__name__).joinpath(relative).read_text(encoding="utf-8")


def class_names(dataset: str) -> tuple[str, ...]:
    """Return the protocol's class names of `dataset`, in class-id order.

    Fashion-MNIST uses its own ten names. CUB's list is not shipped: read it from the dataset with
    `cub_class_names`.
    """
    name = canonical_name(dataset)
    if name == "fashion_mnist":
        from cap_jax.data.fashion_mnist import CLASS_NAMES

        return CLASS_NAMES
    if name == "caltech_birds2011":
        raise ValueError(
            "CUB's class names are not shipped; read them from CUB_200_2011/classes.txt with "
            "cap_jax.data.protocol.cub_class_names(path)."
        )
    text = _protocol_file(f"class_names/{_PROTOCOL_STEMS[name]}.txt")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def cub_class_name(folder_name: str) -> str:
    """Turn a CUB folder name such as "001.Black_footed_Albatross" into "black footed albatross"."""
    _, _, name = folder_name.strip().partition(".")
    return name.replace("_", " ").lower()


def cub_class_names(classes_txt: str | os.PathLike) -> tuple[str, ...]:
    """Read CUB's class names from `CUB_200_2011/classes.txt` ("<id> <NNN.Folder_Name>" lines).

    Class ids in the file are 1-based and must run 1..C in file order.
    """
    names = []
    with open(classes_txt, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[0].isdigit() or "." not in fields[1]:
                raise ValueError(
                    f"{classes_txt}:{line_number}: expected '<id> <NNN.Class_Name>', got "
                    f"{line.strip()!r}."
                )
            if int(fields[0]) != len(names) + 1:
                raise ValueError(
                    f"{classes_txt}:{line_number}: class id {fields[0]} out of sequence; "
                    f"expected {len(names) + 1}."
                )
            names.append(cub_class_name(fields[1]))
    return tuple(names)


def split_class_ids(
    num_classes: int, seed: int, *, sort_unseen: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the TRZSL seen and unseen class ids.

    Args:
        num_classes: C.
        seed: split seed (500, 0 or 200 in the protocol).
        sort_unseen: return the unseen ids ascending instead of in the shipped order.

    Returns:
        seen: int64 `[int(C * 0.62)]` in the order drawn. unseen: int64, the other ids in the
        order of `set(range(C)) - set(seen)` (the order of the shipped splits), or ascending.
    """
    if num_classes < 2:
        raise ValueError(f"A seen/unseen split needs at least 2 classes, got {num_classes}.")
    # RandomState(seed).choice makes the same draw as np.random.seed(seed); np.random.choice.
    rng = np.random.RandomState(seed)
    seen = rng.choice(range(num_classes), size=int(num_classes * SEEN_FRACTION), replace=False)
    seen = np.asarray(seen, dtype=np.int64)
    if sort_unseen:
        unseen = np.setdiff1d(np.arange(num_classes), seen)
    else:
        # The reference takes a set difference; CPython iterates a set of small ints in the
        # order of their hash-table slots, which the shipped splits record.
        unseen = list(set(range(num_classes)) - set(seen.tolist()))
    return seen, np.asarray(unseen, dtype=np.int64)


def split_classes(
    class_names: list[str] | tuple[str, ...], seed: int, *, sort_unseen: bool = False
) -> tuple[list[str], list[str]]:
    """Split class names into TRZSL seen and unseen names, ordered as `split_class_ids`."""
    seen, unseen = split_class_ids(len(class_names), seed, sort_unseen=sort_unseen)
    return [class_names[i] for i in seen], [class_names[i] for i in unseen]


def split_seeds(dataset: str) -> tuple[int, ...]:
    """Return the split seeds shipped for `dataset` (500, 0 and 200)."""
    return tuple(int(key.removeprefix("split_")) for key in _split_table(dataset))


def _split_table(dataset: str) -> dict:
    name = canonical_name(dataset)
    if name not in _PROTOCOL_STEMS:
        raise ValueError(
            f"No shipped seen/unseen split for {name}; compute one with split_classes."
        )
    return json.loads(_protocol_file(f"{_PROTOCOL_STEMS[name]}.json"))


def protocol_split(dataset: str, seed: int) -> tuple[list[str], list[str]]:
    """Return the shipped (seen, unseen) class names of `dataset` for split seed `seed`."""
    table = _split_table(dataset)
    key = f"split_{seed}"
    if key not in table:
        raise ValueError(
            f"No shipped split with seed {seed} for {dataset}; shipped seeds: "
            f"{split_seeds(dataset)}."
        )
    return list(table[key]["seen"]), list(table[key]["unseen"])


def select_labeled(
    labels: np.ndarray, *, per_class: int = 2, seed: int = 0, num_classes: int | None = None
) -> np.ndarray:
    """Pick the labeled images of the semi-supervised setting.

    As the reference: one generator seeded once with `seed` (`np.random.seed(seed)` there, a
    private `RandomState` here), then for each class in id order
    `choice(ids_of_that_class, per_class, replace=False)`.

    Args:
        labels: int `[N]` true labels of the training pool.
        per_class: labeled images per class.
        seed: seed of the draw (0 in the protocol).
        num_classes: C; default `labels.max() + 1`.

    Returns:
        int64 `[C * per_class]` image ids, class by class, in the order drawn.
    """
    labels = np.asarray(labels)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    rng = np.random.RandomState(seed)
    chosen = []
    for class_id in range(num_classes):
        members = np.flatnonzero(labels == class_id)
        if len(members) < per_class:
            raise ValueError(
                f"Class {class_id} has {len(members)} training images, fewer than the "
                f"{per_class} labeled images requested per class."
            )
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.concatenate(chosen).astype(np.int64)
