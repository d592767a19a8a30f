"""Mapping of a source's class names and labels onto the protocol's, with checks.

Every loader maps the labels of its source (folder names, tfds ClassLabel names, ids in
annotation files) to the protocol's class order, then checks that the labels of each split cover
0..C-1 exactly. A mismatch stops the run with a message that names the problem: 1-based labels,
missing classes, or names that do not match (with the closest protocol names as hints).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import numpy as np

# The number of offending names or ids an error message lists before "and N more".
_MAX_LISTED = 10


def normalize_class_name(name: str) -> str:
    """Return the comparison key of a class name: lower case, '_' as ' ', single spaces."""
    return " ".join(name.replace("_", " ").lower().split())


def _listing(items: Sequence) -> str:
    shown = ", ".join(repr(item) for item in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f" and {len(items) - _MAX_LISTED} more"
    return shown


def check_unique_names(names: Sequence[str], *, source: str) -> None:
    """Raise ValueError when two names are equal after `normalize_class_name`."""
    seen: dict[str, str] = {}
    duplicates = []
    for name in names:
        key = normalize_class_name(name)
        if key in seen:
            duplicates.append(f"{seen[key]!r} and {name!r}")
        else:
            seen[key] = name
    if duplicates:
        raise ValueError(
            f"Duplicate class names in {source} (compared in lower case with '_' read as ' '): "
            f"{'; '.join(duplicates[:_MAX_LISTED])}."
        )


def match_class_names(
    source_names: Sequence[str],
    target_names: Sequence[str],
    *,
    source: str,
    aliases: Mapping[str, str] | None = None,
) -> np.ndarray:
    """Map each source class name to the id of the same class in `target_names`.

    Names are compared after `normalize_class_name`. `aliases` maps a source name (also compared
    normalised) to its target name, for sources that name a class differently (EuroSAT's
    "SeaLake" is the protocol's "lake or sea").

    Args:
        source_names: class names as the source has them, in the source's id order.
        target_names: the protocol's class names, in class-id order.
        source: the source, for messages (e.g. "tfds eurosat/rgb").
        aliases: source name -> target name.

    Returns:
        int64 `[len(source_names)]`: target class id of each source class.

    Raises:
        ValueError: duplicate names on either side, source names without a target, or target
            classes that no source name provides.
    """
    check_unique_names(target_names, source="the protocol's class list")
    check_unique_names(source_names, source=source)
    alias_keys = {normalize_class_name(k): v for k, v in (aliases or {}).items()}
    target_ids = {normalize_class_name(name): i for i, name in enumerate(target_names)}
    mapping = np.full(len(source_names), -1, dtype=np.int64)
    unmatched = []
    for source_id, name in enumerate(source_names):
        key = normalize_class_name(name)
        key = normalize_class_name(alias_keys.get(key, key))
        if key in target_ids:
            mapping[source_id] = target_ids[key]
        else:
            unmatched.append(name)
    missing = sorted(set(range(len(target_names))) - set(mapping.tolist()))
    if unmatched or missing:
        problems = []
        if unmatched:
            hints = []
            for name in unmatched[:_MAX_LISTED]:
                close = difflib.get_close_matches(
                    normalize_class_name(name), list(target_ids), n=1, cutoff=0.6
                )
                hints.append(f"{name!r}" + (f" (closest: {close[0]!r})" if close else ""))
            problems.append(f"class names not in the protocol: {', '.join(hints)}")
        if missing:
            problems.append(
                f"protocol classes not found in {source}: "
                f"{_listing([target_names[i] for i in missing])}"
            )
        raise ValueError(
            f"The class names of {source} do not match the protocol's {len(target_names)} "
            f"classes; {'; '.join(problems)}."
        )
    return mapping


def check_labels(labels: np.ndarray, class_names: Sequence[str], *, source: str) -> None:
    """Check that integer labels cover exactly 0..C-1, each class at least once.

    Raises:
        ValueError: naming what is off: labels that look 1-based (1..C), labels outside 0..C-1,
            or classes without any image.
    """
    labels = np.asarray(labels)
    num_classes = len(class_names)
    if len(labels) == 0:
        raise ValueError(f"{source} has no images.")
    low, high = int(labels.min()), int(labels.max())
    if low >= 1 and high == num_classes:
        raise ValueError(
            f"The labels of {source} run {low}..{high} for {num_classes} classes; they look "
            "1-based. Subtract 1 so they run 0..C-1 (for numbered class folders, set "
            "label_offset=1, e.g. `cap-jax run ... --set label_offset=1`)."
        )
    if low < 0 or high >= num_classes:
        outside = np.unique(labels[(labels < 0) | (labels >= num_classes)])
        raise ValueError(
            f"The labels of {source} must lie in 0..{num_classes - 1} for {num_classes} classes; "
            f"found {_listing(outside.tolist())}."
        )
    counts = np.bincount(labels, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if len(missing):
        raise ValueError(
            f"{source} has no image of {len(missing)} of its {num_classes} classes: "
            f"{_listing([f'{i}: {class_names[i]}' for i in missing])}."
        )
