"""Common dataset representation used by the training loop.

An `ImageDataset` is one split: class names, images and integer labels. Images live either in
memory as a uint8 array (`[N, h, w]` grey or `[N, h, w, 3]` RGB) or in a sequence that decodes
one image at a time (image files, records of a prepared tfds dataset). `ClassificationData`
bundles the two splits of a benchmark: `train` is the unlabeled pool, whose labels are kept only
to measure pseudolabel accuracy, and `test` is the evaluation split.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import PIL.Image

logger = logging.getLogger(__name__)


class ImageReadError(OSError):
    """An image file or record that cannot be decoded; `source` names the file or record."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"Failed to read image {source}: {reason}")
        self.source = source
        self.reason = reason


@runtime_checkable
class ImageSequence(Protocol):
    """Random access to images decoded on demand.

    `__getitem__(i)` returns a uint8 array `[h, w, 3]` (RGB) for a Python int `i`, or raises
    `ImageReadError` naming the file or record.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


def decode_image(data: bytes | str | os.PathLike, *, source: str | None = None) -> np.ndarray:
    """Decode an encoded image (bytes or a file path) into a uint8 RGB array `[h, w, 3]`.

    Grey, palette and RGBA images are converted to RGB (alpha is dropped, as PIL's
    `convert("RGB")` does). A truncated file fails because PIL's `LOAD_TRUNCATED_IMAGES` stays off.

    Raises:
        ImageReadError: the file is missing, unreadable, truncated or not an image; the message
            names `source` (default: the path).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        name = source or "<bytes>"
        stream = io.BytesIO(data)
    else:
        name = source or os.fspath(data)
        stream = data
    try:
        with PIL.Image.open(stream) as image:
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        raise ImageReadError(name, f"{type(error).__name__}: {error}") from error


class ImageFiles:
    """Image files decoded lazily with PIL, in the order given."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [os.fspath(path) for path in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return decode_image(self.paths[index])

    def subset(self, indices: np.ndarray) -> ImageFiles:
        return ImageFiles([self.paths[i] for i in indices])

    def describe(self, index: int) -> str:
        return self.paths[index]


class _IndexedImages:
    """A view of another image sequence through an index array."""

    def __init__(self, base: ImageSequence, indices: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.base[int(self.indices[index])]

    def subset(self, indices: np.ndarray) -> _IndexedImages:
        return _IndexedImages(self.base, self.indices[np.asarray(indices, dtype=np.int64)])

    def describe(self, index: int) -> str:
        return describe_image(self.base, int(self.indices[index]))


def describe_image(images: ImageSequence, index: int) -> str:
    """Name image `index` of a sequence for messages: its path or record, else its index."""
    describe = getattr(images, "describe", None)
    return describe(index) if describe is not None else f"image {index}"


def _grey_to_rgb(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:
        return np.repeat(images[..., None], 3, axis=-1)
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return images


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """One split of a classification dataset.

    Attributes:
        class_names: names of classes 0..C-1, as the prompts use them.
        images: uint8 array `[N, h, w]` (grey), `[N, h, w, 1]` or `[N, h, w, 3]`, or an
            `ImageSequence` of length N that decodes images on demand. A list of file paths is
            wrapped into `ImageFiles`.
        labels: int32 `[N]`, class ids in 0..C-1.
    """

    class_names: tuple[str, ...]
    images: np.ndarray | ImageSequence
    labels: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(str(name) for name in self.class_names))
        images = self.images
        if isinstance(images, (list, tuple)):
            images = ImageFiles(images)
            object.__setattr__(self, "images", images)
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise ValueError(f"In-memory images must be uint8, got {images.dtype}.")
            valid_shape = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
            if not valid_shape:
                raise ValueError(
                    f"In-memory images must have shape [N, h, w], [N, h, w, 1] or [N, h, w, 3], "
                    f"got {images.shape}."
                )
        elif not isinstance(images, ImageSequence):
            raise TypeError(
                f"images must be a uint8 array, a list of file paths or an ImageSequence, "
                f"got {type(images).__name__}."
            )
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be a 1-D integer array, got shape {labels.shape} and dtype "
                f"{labels.dtype}."
            )
        if len(labels) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(labels)} labels.")
        num_classes = len(self.class_names)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"Labels must lie in 0..{num_classes - 1} for {num_classes} class names, got "
                f"the range {labels.min()}..{labels.max()}."
            )
        object.__setattr__(self, "labels", labels.astype(np.int32))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_memory(self) -> bool:
        """Whether the images are one uint8 array (so a batch comes back as one array)."""
        return isinstance(self.images, np.ndarray)

    def load_images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Load images by index as uint8 RGB.

        Args:
            indices: int `[B]`, image ids in 0..N-1.

        Returns:
            For in-memory images, a uint8 array `[B, h, w, 3]` (grey repeated into three
            channels). Otherwise a list of B uint8 arrays `[h_i, w_i, 3]`, as sizes can differ.

        Raises:
            IndexError: an index is outside 0..N-1.
            ImageReadError: an image cannot be decoded; the message names its file or record.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(
                f"Image indices must lie in 0..{len(self) - 1}, got {indices.min()}..."
                f"{indices.max()}."
            )
        if isinstance(self.images, np.ndarray):
            return _grey_to_rgb(self.images[indices])
        return [self.images[int(i)] for i in indices]

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """Return the dataset restricted to `indices` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if isinstance(self.images, np.ndarray):
            images = self.images[indices]
        elif hasattr(self.images, "subset"):
            images = self.images.subset(indices)
        else:
            images = _IndexedImages(self.images, indices)
        return ImageDataset(self.class_names, images, self.labels[indices])

    def describe_image(self, index: int) -> str:
        """Name image `index` for messages: its file or record when known."""
        if isinstance(self.images, np.ndarray):
            return f"image {index}"
        return describe_image(self.images, index)


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationData:
    """A benchmark: the unlabeled training pool and the labeled test split.

    Attributes:
        name: dataset name, e.g. "fashion_mnist".
        class_names: names of classes 0..C-1 (the same tuple as in both splits).
        train: the unlabeled pool. Its labels only measure pseudolabel accuracy (and select the
            few labeled images in the semi-supervised setting).
        test: the evaluation split.
    """

    name: str
    class_names: tuple[str, ...]
    train: ImageDataset
    test: ImageDataset

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(self.class_names))
        for split_name, split in (("train", self.train), ("test", self.test)):
            if split.class_names != self.class_names:
                raise ValueError(
                    f"The {split_name} split of {self.name} has other class names than the "
                    f"dataset: {split.class_names[:5]}... against {self.class_names[:5]}..."
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def subset_indices(
    labels: np.ndarray, size: int, *, seed: int = 0, stratified: bool = True
) -> np.ndarray:
    """Choose `size` image ids of a split, sorted ascending.

    Stratified (the default): each class gets a share proportional to its frequency, rounded by
    largest remainder (ties go to the lower class id), and its images are drawn uniformly
    without replacement with `np.random.default_rng(seed)`. Not stratified: the first `size`
    images in file order, `seed` unused.

    Args:
        labels: int `[N]` class ids of the split.
        size: number of images to keep, 1..N.
        seed: seed of the draw.
        stratified: proportional per-class draw (True) or first-n (False).

    Returns:
        int64 `[size]` sorted image ids.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if not 0 < size <= total:
        raise ValueError(f"A subset must have 1..{total} images, got {size}.")
    if not stratified:
        return np.arange(size, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (size / total)
    quotas = np.floor(exact).astype(np.int64)
    # Largest remainder; a stable sort on the negated remainder keeps ties in class order.
    leftover = size - int(quotas.sum())
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:leftover]] += 1
    chosen = []
    for class_id, quota in zip(classes, quotas):
        members = np.flatnonzero(labels == class_id)
        chosen.append(rng.choice(members, size=int(quota), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)
