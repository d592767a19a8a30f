"""Reading prepared TensorFlow Datasets (tfds) without TensorFlow.

What works without TensorFlow (tensorflow-datasets 4.9.10, checked with mock datasets in the
tests):

- Reading a dataset prepared in the `array_record` file format, through
  `tfds.builder_from_directory(...).as_data_source(...)`. Records are random-access.
- Reading a dataset prepared in the `tfrecord` format (the default when TensorFlow prepared
  it). tfds itself needs TensorFlow for that, so `TFRecordShards` here indexes the record
  offsets and tfds' NumPy example parser decodes each record. Only the length field of each
  record is CRC-checked. A corrupt payload shows up as an undecodable image instead.

What needs TensorFlow: preparing (downloading and converting) the datasets. The generators of
the tfds builders used here (eurosat, dtd, oxford_flowers102, caltech_birds2011, resisc45) call
`tf.io.gfile`. Prepare once where TensorFlow is installed, preferably with
`file_format="array_record"`, or read the original archives through `cap_jax.data.sources`.

Images are never decoded by tfds here. The image feature is read as encoded bytes and decoded
with PIL into uint8 RGB, so grey and RGB sources come out alike. A bad record raises
`ImageReadError` naming the dataset, split and record index.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from pathlib import Path

import numpy as np

from cap_jax.data.dataset import decode_image

logger = logging.getLogger(__name__)


def _crc32c_table() -> list[int]:
    # CRC-32C (Castagnoli), reflected polynomial 0x82F63B78.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """Return the CRC-32C of `data` (pure Python, meant for short inputs)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """Return the masked CRC-32C that TFRecord files store next to each length and payload."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TFRecordShards:
    """Random access to the records of TFRecord files, by offsets indexed once.

    A TFRecord file is a sequence of records, each stored as: uint64 little-endian payload
    length, uint32 masked CRC-32C of those 8 bytes, the payload, uint32 masked CRC-32C of the
    payload.

    Args:
        paths: shard files, read in this order.
        skip_take: per shard, `(skip, take)`: the records of that shard to expose
            (take -1: all after `skip`).
    """

    def __init__(self, paths: list[str], skip_take: list[tuple[int, int]] | None = None):
        self.paths = [os.fspath(path) for path in paths]
        skip_take = skip_take or [(0, -1)] * len(self.paths)
        self._file_ids = []
        self._offsets = []
        self._lengths = []
        for file_id, (path, (skip, take)) in enumerate(zip(self.paths, skip_take)):
            offsets, lengths = self._index(path)
            stop = len(offsets) if take < 0 else skip + take
            if stop > len(offsets):
                raise ValueError(
                    f"{path}: the dataset metadata expects at least {stop} records, the file "
                    f"has {len(offsets)}."
                )
            self._offsets.append(offsets[skip:stop])
            self._lengths.append(lengths[skip:stop])
            self._file_ids.append(np.full(stop - skip, file_id, dtype=np.int32))
        self._file_ids = np.concatenate(self._file_ids or [np.zeros(0, np.int32)])
        self._offsets = np.concatenate(self._offsets or [np.zeros(0, np.int64)])
        self._lengths = np.concatenate(self._lengths or [np.zeros(0, np.int64)])
        self._descriptors: dict[int, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _index(path: str) -> tuple[np.ndarray, np.ndarray]:
        offsets, lengths = [], []
        size = os.path.getsize(path)
        position = 0
        with open(path, "rb") as handle:
            while position < size:
                header = handle.read(12)
                if len(header) < 12:
                    raise ValueError(f"{path}: truncated record header at byte {position}.")
                (length,) = struct.unpack("<Q", header[:8])
                (length_crc,) = struct.unpack("<I", header[8:])
                if masked_crc32c(header[:8]) != length_crc:
                    raise ValueError(
                        f"{path}: invalid record length checksum at byte {position}; the file "
                        "is corrupt or not a TFRecord file."
                    )
                end = position + 12 + length + 4
                if end > size:
                    raise ValueError(
                        f"{path}: the record at byte {position} needs {length} bytes but the "
                        "file ends first (truncated)."
                    )
                offsets.append(position + 12)
                lengths.append(length)
                position = end
                handle.seek(position)
        return np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def _descriptor(self, file_id: int) -> int:
        with self._lock:
            if file_id not in self._descriptors:
                self._descriptors[file_id] = os.open(self.paths[file_id], os.O_RDONLY)
            return self._descriptors[file_id]

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"Record index {index} is outside 0..{len(self) - 1}.")
        file_id = int(self._file_ids[index])
        # os.pread leaves the file position alone, so threads can share one descriptor.
        return os.pread(
            self._descriptor(file_id), int(self._lengths[index]), int(self._offsets[index])
        )

    def close(self) -> None:
        with self._lock:
            for descriptor in self._descriptors.values():
                os.close(descriptor)
            self._descriptors.clear()


class TfdsImages:
    """The images of one split of a prepared tfds dataset, decoded with PIL on access."""

    def __init__(
        self,
        records,
        *,
        image_key: str,
        deserialize,
        description: str,
        indices: np.ndarray | None = None,
    ):
        self._records = records
        self._image_key = image_key
        self._deserialize = deserialize
        self._description = description
        self._indices = np.arange(len(records)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self._indices)

    def describe(self, index: int) -> str:
        return f"{self._description} record {int(self._indices[index])}"

    def example(self, index: int) -> dict:
        """Return record `index` as a dict of NumPy values, with the image still encoded."""
        return self._deserialize(self._records[int(self._indices[index])])

    def __getitem__(self, index: int) -> np.ndarray:
        encoded = self.example(index)[self._image_key]
        return decode_image(bytes(encoded), source=self.describe(index))

    def subset(self, indices: np.ndarray) -> TfdsImages:
        return TfdsImages(
            self._records,
            image_key=self._image_key,
            deserialize=self._deserialize,
            description=self._description,
            indices=self._indices[np.asarray(indices, dtype=np.int64)],
        )


def _import_tfds():
    import tensorflow_datasets as tfds  # A slow import, needed on this path only.

    return tfds


def find_prepared_dir(data_dir: str | os.PathLike, tfds_name: str) -> Path | None:
    """Return the newest prepared version folder of `tfds_name` (e.g. "eurosat/rgb") in `data_dir`.

    `data_dir` may also be the version folder itself (the one with `dataset_info.json`).
    Returns None when nothing prepared is found.
    """
    data_dir = Path(data_dir)
    if (data_dir / "dataset_info.json").is_file():
        return data_dir
    base = data_dir / tfds_name
    if not base.is_dir():
        return None
    versions = []
    for child in base.iterdir():
        parts = child.name.split(".")
        if (child / "dataset_info.json").is_file() and all(p.isdigit() for p in parts):
            versions.append((tuple(int(p) for p in parts), child))
    return max(versions)[1] if versions else None


def open_prepared_split(version_dir: Path, split: str, *, image_key: str = "image"):
    """Open one split of a prepared tfds dataset.

    Args:
        version_dir: the folder with `dataset_info.json` and the record shards.
        split: split name, e.g. "train".
        image_key: the image feature's name.

    Returns:
        `(images, examples_without_images, features)`: a `TfdsImages` sequence; a function
        `index -> dict` returning a record's other features (the image left encoded); and the
        tfds `FeaturesDict` (for class names).
    """
    tfds = _import_tfds()
    builder = tfds.builder_from_directory(os.fspath(version_dir))
    info = builder.info
    try:
        split_info = info.splits[split]  # Also resolves expressions like "train+validation".
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"{version_dir} has no split {split!r}; it has {sorted(info.splits)}."
        ) from error
    features = info.features
    if image_key not in features:
        raise ValueError(
            f"{version_dir}: no image feature {image_key!r}; features: {sorted(features)}."
        )
    decoders = {image_key: tfds.decode.SkipDecoding()}
    description = f"{info.full_name}:{split}"
    file_format = str(getattr(info.file_format, "value", info.file_format))
    if file_format == "array_record":
        # tfds parses the record and leaves the image encoded (SkipDecoding).
        records = builder.as_data_source(split=split, decoders=decoders)

        def deserialize(record):
            return record

    elif file_format == "tfrecord":
        instructions = split_info.file_instructions
        records = TFRecordShards(
            [os.fspath(instruction.filename) for instruction in instructions],
            [(instruction.skip, instruction.take) for instruction in instructions],
        )

        def deserialize(record):
            return features.deserialize_example_np(record, decoders=decoders)

    else:
        raise ValueError(
            f"{version_dir}: file format {file_format!r} is not supported without TensorFlow; "
            "prepare the dataset with file_format='array_record' or 'tfrecord'."
        )
    images = TfdsImages(
        records, image_key=image_key, deserialize=deserialize, description=description
    )
    return images, images.example, features


def read_dataset_info(version_dir: Path) -> dict:
    """Return the parsed `dataset_info.json` of a prepared dataset."""
    with open(version_dir / "dataset_info.json", encoding="utf-8") as handle:
        return json.load(handle)


def prepare(
    tfds_name: str, data_dir: str | os.PathLike | None, *, manual_dir: str | os.PathLike | None
) -> None:
    """Download and prepare a tfds dataset in the `array_record` format.

    The tfds builders used here read their downloads with `tf.io.gfile`, so this step needs
    TensorFlow (and tfds' optional `importlib_resources`). Without them it raises a RuntimeError
    that names the missing module and the ways around it.
    """
    tfds = _import_tfds()
    builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    manual_dir = None if manual_dir is None else os.fspath(manual_dir)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=config)
    except ModuleNotFoundError as error:
        raise RuntimeError(
            f"Preparing the tfds dataset {tfds_name} failed because the module {error.name!r} "
            "is missing. tfds builders read their downloads with tf.io.gfile, so preparing "
            "needs TensorFlow even though reading the prepared dataset does not. Prepare it "
            "once where TensorFlow is installed (file_format='array_record' keeps reading "
            "fast), or load the original archive with source='folder'."
        ) from error
