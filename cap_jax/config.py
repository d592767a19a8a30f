"""Run configuration: one flat dataclass, read from JSON, with command-line overrides.

A config file is a JSON object whose keys are fields of `RunConfig`. A key that is not a
field is an error, so a misspelt option never silently falls back to its default.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

PARADIGMS = ("UL", "SSL", "TRZSL")
DTYPES = ("float32", "bfloat16")
ALIGNMENT_MODES = ("off", "detect", "reference")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on. Defaults are the reference's CAP settings."""

    name: str = "cap"
    paradigm: str = "UL"
    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    skip_bad_images: bool = False
    label_offset: int = 0
    train_split: str = "train"

    model: str = "random:ViT-B/32"
    dtype: str = "float32"
    template: str = "a photo of a {}."
    n_ctx: int = 2
    prompt_depth: int = 8
    adapter_hidden: Optional[int] = None
    adapter_ratio: float = 0.01

    seed: int = 1
    split_seed: int = 500
    labeled_per_class: int = 2
    labeled_seed: int = 0

    epochs: int = 50
    iterations_per_epoch: int = 50
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.1
    warmup_epochs: int = 1

    threshold: float = 0.85
    n_main_samples: int = 16
    max_main_ratio: float = 0.8
    update_every: int = 5
    margin_scale: float = 12.0
    use_margin: bool = True
    shared_adapter: bool = False

    concept_alignment: str = "off"
    descriptions: Optional[str] = None
    alignment_top_k: Optional[int] = None

    eval_every: int = 10
    eval_batch_size: int = 64
    zero_shot_batch_size: int = 64
    cache_dir: Optional[str] = None

    def __post_init__(self):
        if self.paradigm not in PARADIGMS:
            raise ValueError(f"paradigm must be one of {PARADIGMS}, got {self.paradigm!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.concept_alignment not in ALIGNMENT_MODES:
            raise ValueError(
                f"concept_alignment must be one of {ALIGNMENT_MODES}, "
                f"got {self.concept_alignment!r}"
            )
        for key in ("epochs", "iterations_per_epoch", "batch_size", "n_ctx", "eval_every",
                    "update_every", "n_main_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs must be at least 0 and less than epochs ({self.epochs}), so the "
                f"cosine decay has steps left; got {self.warmup_epochs}")
        if self.prompt_depth < 1:
            raise ValueError(f"prompt_depth must be at least 1, got {self.prompt_depth}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(
                f"threshold must be in [0, 1] (1 keeps no pseudolabel), got {self.threshold}")
        if "{}" not in self.template:
            raise ValueError(f"template must contain '{{}}' for the class name: {self.template!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The value types each field accepts; `from __future__ import annotations` leaves the
# annotations as strings, so they are read from the defaults and names here.
def _accepted_types(field: dataclasses.Field) -> tuple[type, ...]:
    annotation = str(field.type)
    base = annotation.removeprefix("Optional[").removesuffix("]")
    types = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}[base]
    return types + ((type(None),) if annotation.startswith("Optional[") else ())


def check_types(values: dict[str, Any], source: str) -> None:
    """Raise ValueError for a value whose type does not fit its field (e.g. use_margin="maybe")."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for key, value in values.items():
        accepted = _accepted_types(fields[key])
        # bool is a subclass of int in Python, but `epochs=true` is a mistake.
        wrong_bool = isinstance(value, bool) and bool not in accepted
        if wrong_bool or not isinstance(value, accepted):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in accepted)
            raise ValueError(
                f"config key {key!r} in {source} must be {names}, got {value!r}; on the command "
                f"line write e.g. --set use_margin=false, --set epochs=5, --set model=random:tiny")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RunConfig))


def _coerce(key: str, text: str) -> Any:
    """Parse an override value for `key` from the command line: JSON if it parses, else text.

    A text field keeps the text as written, so `--set name=2024` stays the string "2024".
    """
    field = next(f for f in dataclasses.fields(RunConfig) if f.name == key)
    if bool in _accepted_types(field) and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if str in _accepted_types(field) and value is not None and not isinstance(value, str):
        return text
    return value


def _check_keys(values: dict[str, Any], source: str) -> None:
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown} in {source}; valid keys are: {', '.join(FIELD_NAMES)}"
        )


def config_dir() -> str:
    """Return the folder of the shipped configs (`experiments/configs` of the repository)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(here), "experiments", "configs")


def config_path_list() -> list:
    """Return the shipped config files, sorted by name."""
    import pathlib

    return sorted(pathlib.Path(config_dir()).glob("*.json"))


def resolve_config_path(name_or_path: str) -> str:
    """Return the JSON file for a config given as a path or as the name of a shipped config."""
    if os.path.isfile(name_or_path):
        return name_or_path
    candidate = os.path.join(config_dir(), name_or_path)
    for path in (candidate, candidate + ".json"):
        if os.path.isfile(path):
            return path
    shipped = sorted(p[:-5] for p in os.listdir(config_dir()) if p.endswith(".json")) if (
        os.path.isdir(config_dir())) else []
    raise FileNotFoundError(
        f"config {name_or_path!r} is neither a file nor a shipped config; shipped configs: "
        f"{', '.join(shipped) or 'none found'}"
    )


def load_config(name_or_path: Optional[str] = None, overrides: Optional[list[str]] = None,
                ) -> RunConfig:
    """Read a config file (or the defaults) and apply `key=value` overrides.

    Args:
      name_or_path: a JSON file, or the name of a file in `experiments/configs/`; None for the
        defaults.
      overrides: strings `key=value`; values are parsed as JSON when they parse (`5`, `true`,
        `null`, `0.5`), else taken as text.

    Raises:
      ValueError: on an unknown key, a malformed override or an invalid value.
    """
    values: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        with open(path) as f:
            try:
                values = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"config file {path} is not valid JSON: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must contain a JSON object")
        values.pop("_comment", None)
        _check_keys(values, path)
        check_types(values, path)
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must have the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        _check_keys({key: None}, "the command-line overrides")
        values[key] = _coerce(key, text)
        check_types({key: values[key]}, "the command-line overrides")
    return RunConfig(**values)


def save_config(config: RunConfig, path: str) -> None:
    with open(path, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
