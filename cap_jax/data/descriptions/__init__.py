"""Short visual descriptions of classes whose names CLIP misreads (concept mismatch).

A description file is JSON mapping a class name, as the dataset's class list
spells it, to one or more descriptions::

    {"chaparral": ["an aerial view of dry hillsides covered in dense, low evergreen shrubs"]}

Each description must fit CLIP's 77-token context with its start and end
tokens, because the tokenizer rejects longer ones. This package ships files
for a few classes of RESISC45, DTD, Flowers102, CUB and FGVCAircraft (the
classes listed in each file). Users can pass their own file instead.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["DESCRIPTIONS_DIR", "available_datasets", "load_descriptions"]

DESCRIPTIONS_DIR = Path(__file__).parent


def available_datasets() -> list[str]:
    """Return the dataset names with a shipped description file, sorted."""
    return sorted(path.stem for path in DESCRIPTIONS_DIR.glob("*.json"))


def _resolve(path_or_dataset_name) -> Path:
    path = Path(path_or_dataset_name)
    if path.is_file():
        return path
    if path.suffix == ".json" or len(path.parts) > 1:
        raise FileNotFoundError(f"description file not found: {path}")
    by_lower_name = {name.lower(): name for name in available_datasets()}
    name = by_lower_name.get(str(path_or_dataset_name).lower())
    if name is None:
        raise FileNotFoundError(
            f"no description file for dataset {path_or_dataset_name!r}; shipped: "
            f"{available_datasets()}. Pass the path of a JSON file instead."
        )
    return DESCRIPTIONS_DIR / f"{name}.json"


def load_descriptions(path_or_dataset_name) -> dict[str, list[str]]:
    """Read a description file, given its path or a shipped dataset's name.

    Args:
      path_or_dataset_name: a path to a JSON file, or a dataset name such as
        ``"Flowers102"`` (case-insensitive) for the shipped file.

    Returns:
      class name to a non-empty list of descriptions, in file order (a bare
      string in the file counts as a list of one).

    Raises:
      FileNotFoundError: no such file or shipped dataset.
      ValueError: the file is not a JSON object of class name to a non-empty
        list of non-empty strings.
    """
    path = _resolve(path_or_dataset_name)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON in description file {path}: {error}") from error
    if not isinstance(content, dict):
        # The file's content is invalid data, not a wrong argument type.
        raise ValueError(  # noqa: TRY004
            f"description file {path} must be a JSON object of class name to a list of "
            f"descriptions, got {type(content).__name__}"
        )

    descriptions = {}
    for class_name, texts in content.items():
        if isinstance(texts, str):
            texts = [texts]
        valid = (
            isinstance(texts, list)
            and len(texts) > 0
            and all(isinstance(text, str) and text.strip() for text in texts)
        )
        if not valid:
            raise ValueError(
                f"description file {path}: class {class_name!r} must map to a non-empty list "
                f"of non-empty strings, got {texts!r}"
            )
        descriptions[class_name] = list(texts)
    return descriptions
