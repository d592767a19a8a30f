"""Batching and background prefetching on the host.

`prefetch` runs an iterable in a background thread so the next batch is decoded and augmented
while the accelerator computes on the current one. PIL releases the GIL while it decodes and
resizes, so the worker thread overlaps with the main thread. `iterate_batches` walks a dataset in
order with fixed-size batches and pads the last one, so a jitted function is traced for one
shape only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from cap_jax.data.dataset import ImageDataset

T = TypeVar("T")

_ITEM, _ERROR, _DONE = "item", "error", "done"
# How often a blocked worker checks whether the consumer has gone away, in seconds.
_POLL_SECONDS = 0.1


def prefetch(iterable: Iterable[T], size: int = 2) -> Iterator[T]:
    """Iterate over `iterable` in a background thread, keeping up to `size` items ready.

    Items arrive in the order the iterable produces them. An exception raised by the iterable is
    re-raised in the consumer (the same exception object, with its traceback) after the items
    produced before it. When the consumer stops early (breaks out of the loop or closes the
    generator), the worker stops at its next item. A worker blocked inside the iterable itself
    finishes that call first.

    Args:
        iterable: any iterable; it is consumed only by the worker thread.
        size: the maximum number of items waiting in the queue, at least 1.

    Yields:
        the items of `iterable`.
    """
    if size < 1:
        raise ValueError(f"The prefetch size must be at least 1, got {size}.")
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(message: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                items.put(message, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in iterable:
                if not put((_ITEM, item)):
                    return
        except BaseException as error:  # noqa: BLE001 -- handed to the consumer, which re-raises
            put((_ERROR, error))
        else:
            put((_DONE, None))

    worker = threading.Thread(target=work, name="cap_jax-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = items.get()
            if kind == _ITEM:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        stop.set()


def iterate_batches(
    dataset: ImageDataset,
    batch_size: int,
    preprocess: Callable[[np.ndarray | list[np.ndarray]], np.ndarray],
    *,
    indices: Sequence[int] | np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Walk a dataset in order, in batches of exactly `batch_size`.

    The last batch is padded: its missing entries have index -1, zero images and a False mask,
    so a jitted consumer is traced for one shape and drops padded rows with the mask.

    Args:
        dataset: the split to read.
        batch_size: images per batch, at least 1.
        preprocess: maps the output of `dataset.load_images` for B <= batch_size images to an
            array `[B, ...]`, e.g. `clip_preprocess`.
        indices: image ids to visit, in this order (default: all, 0..N-1).

    Yields:
        `(indices, images, valid)`: int32 `[batch_size]` image ids (-1 for padding), the
        preprocessed images `[batch_size, ...]`, and bool `[batch_size]`, True for real entries.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    order = np.arange(len(dataset)) if indices is None else np.asarray(indices).reshape(-1)
    for start in range(0, len(order), batch_size):
        batch_ids = order[start : start + batch_size]
        count = len(batch_ids)
        images = np.asarray(preprocess(dataset.load_images(batch_ids)))
        if images.shape[0] != count:
            raise ValueError(
                f"preprocess returned {images.shape[0]} images for a batch of {count}."
            )
        padded_ids = np.full(batch_size, -1, dtype=np.int32)
        padded_ids[:count] = batch_ids
        valid = np.zeros(batch_size, dtype=bool)
        valid[:count] = True
        if count < batch_size:
            padding = np.zeros((batch_size - count,) + images.shape[1:], dtype=images.dtype)
            images = np.concatenate([images, padding], axis=0)
        yield padded_ids, images, valid
