"""Datasets, the benchmark protocol, CLIP preprocessing and host-side batching."""

from cap_jax.data import protocol
from cap_jax.data.dataset import (
    ClassificationData,
    ImageDataset,
    ImageFiles,
    ImageReadError,
    ImageSequence,
    decode_image,
    subset_indices,
)
from cap_jax.data.fashion_mnist import load_fashion_mnist, read_idx
from cap_jax.data.loader import iterate_batches, prefetch
from cap_jax.data.sources import load_dataset
from cap_jax.data.transforms import CLIP_MEAN, CLIP_STD, clip_preprocess, strong_augment

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClassificationData",
    "ImageDataset",
    "ImageFiles",
    "ImageReadError",
    "ImageSequence",
    "clip_preprocess",
    "decode_image",
    "iterate_batches",
    "load_dataset",
    "load_fashion_mnist",
    "prefetch",
    "protocol",
    "read_idx",
    "strong_augment",
    "subset_indices",
]
