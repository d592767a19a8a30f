"""Fashion-MNIST from its idx files.

The idx format was published with MNIST. A file starts with a 4-byte magic number: two zero
bytes, the element type (0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64) and the number of dimensions. One big-endian int32 per dimension
follows, then the elements, big-endian and row-major. Fashion-MNIST's image files have magic
0x00000803 (`[N, 28, 28]` uint8) and its label files 0x00000801 (`[N]`).

Files may be gzipped or not; gzip is recognised by its first two bytes, not by the file name.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from cap_jax.data.dataset import ClassificationData, ImageDataset, subset_indices

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxFormatError(ValueError):
    """An idx file whose header or size is invalid."""


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise IdxFormatError(f"{path}: invalid or truncated gzip data ({error}).") from error
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (gzipped or not) into a numpy array in native byte order.

    Raises:
        FileNotFoundError: `path` does not exist.
        IdxFormatError: invalid magic number, unknown element type, or a data size that does not
            match the dimensions in the header.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IdxFormatError(f"{path}: {len(data)} bytes is too short for an idx header.")
    zero, type_code, ndim = data[:2], data[2], data[3]
    if zero != b"\x00\x00":
        raise IdxFormatError(
            f"{path}: invalid idx magic number 0x{data[:4].hex()}; an idx file starts with two "
            "zero bytes."
        )
    if type_code not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: unknown idx element type 0x{type_code:02x}.")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IdxFormatError(
            f"{path}: the header declares {ndim} dimensions but the file has only {len(data)} "
            "bytes."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        raise IdxFormatError(
            f"{path}: shape {shape} of {dtype} needs {expected} bytes of data, the file has "
            f"{actual} (truncated or corrupt)."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def _find_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) not found in {root}.")


def read_split(
    root: str | os.PathLike = DEFAULT_ROOT, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Read the images and labels of one Fashion-MNIST split.

    Args:
        root: folder with `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
            `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`.
        split: "train" (60000 images) or "test" (10000 images).

    Returns:
        images: uint8 `[N, 28, 28]`; labels: int32 `[N]` in 0..9.
    """
    if split not in _SPLIT_PREFIXES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST folder {root} not found. Install the Debian package with "
            "`apt-get install dataset-fashion-mnist` or pass the folder that holds the idx files."
        )
    prefix = _SPLIT_PREFIXES[split]
    images_path = _find_file(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_file(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxFormatError(
            f"{images_path}: expected uint8 images [N, h, w], got {images.dtype} {images.shape}."
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise IdxFormatError(
            f"{labels_path}: expected integer labels [N], got {labels.dtype} {labels.shape}."
        )
    if len(images) != len(labels):
        raise IdxFormatError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels."
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise IdxFormatError(
            f"{labels_path}: labels must lie in 0..{len(CLASS_NAMES) - 1}, got "
            f"{labels.min()}..{labels.max()}."
        )
    return images, labels.astype(np.int32)


def load_fashion_mnist(
    root: str | os.PathLike | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    subset_seed: int = 0,
    stratified: bool = True,
) -> ClassificationData:
    """Load Fashion-MNIST as `ClassificationData` with in-memory grey images `[N, 28, 28]`.

    Args:
        root: folder with the idx files; default `/usr/share/datasets/fashion-mnist`.
        train_subset: keep this many training images (None: all 60000).
        test_subset: keep this many test images (None: all 10000).
        subset_seed: seed of the subset draw, the same for both splits.
        stratified: proportional per-class draw (True) or the first n images (False); see
            `subset_indices`.
    """
    root = DEFAULT_ROOT if root is None else root
    splits = {}
    for split, size in (("train", train_subset), ("test", test_subset)):
        images, labels = read_split(root, split)
        if size is not None:
            keep = subset_indices(labels, size, seed=subset_seed, stratified=stratified)
            images, labels = images[keep], labels[keep]
        splits[split] = ImageDataset(CLASS_NAMES, images, labels)
    return ClassificationData("fashion_mnist", CLASS_NAMES, splits["train"], splits["test"])
