"""tf.data input pipelines over the index (the TensorFlow training path; data.batches holds
the same batches as numpy arrays for any backend): batches of index rows, read at the rows' byte offsets.

Video level yields features [B, 1152] float32; frame level yields the stored
quantized frames, uint8 [B, T, 1152], with T the longest video selected (at most
max_frames), so every batch has the same static shape, and num_frames [B]. Padding
frames are zero bytes; the models dequantize on the device (models.Dequantize) and
zero the padding there, as the starter's resize_axis does after dequantization.
Labels are dense multi-hot [B, num_classes].

Two entry points:
- make_dataset: one pass over some index rows (evaluation, prediction);
- make_training_stream: the training batches of epochs [start_epoch, end_epoch),
  each epoch a permutation of the rows drawn with its own seed (a function of the
  run's seed and the epoch number only), so a run resumed at epoch e / batch b
  sees exactly the batches an uninterrupted run would have seen from that point on.

A batch is a list of row positions; reader.VideoBatches / FrameBatches check its
records in place, in the memory-mapped shards at the offsets the index found,
against the index's CRCs, and copy the features out of them where the index
located them. Batches are built one at a time, ahead of the consumer. Shuffling
is a full permutation of the selected rows each epoch (the starter shuffles
files, then a buffer of a few batches), and only the selected records are ever
read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import tensorflow as tf

from yt8m_qrnn.data.batches import (  # noqa: F401  (the TensorFlow path shares them)
    MAX_FRAMES, BatchReader, epoch_seed, label_matrix, row_order, steps_per_epoch, subset_rows,
)
from yt8m_qrnn.records.features import FEATURE_DIM



class _Pipeline:
    """What every pass over a set of index rows shares: the batch reader and the batch layout."""

    def __init__(self, data_root: Path, rows: pd.DataFrame, level: str, version: int, num_classes: int,
                 batch_size: int, max_frames: int, with_ids: bool):
        reader = BatchReader(data_root, rows, level, version, num_classes, max_frames)
        self.level, self.count, self.batch_size, self.with_ids = level, reader.count, batch_size, with_ids
        self.ids = tf.constant(reader.ids)
        self.read = reader.read
        if level == "video":
            self.shape, self.dtype = [FEATURE_DIM], tf.float32
        else:
            self.shape, self.dtype = [reader.frames, FEATURE_DIM], tf.uint8
        self.num_classes = num_classes

    def batches(self, epochs: tf.data.Dataset, seed_of_epoch: Callable[[int], int | None],
                skip: int = 0) -> tf.data.Dataset:
        """The batches of the given epochs but the first `skip`, each epoch's rows in the order
        row_order(rows, seed_of_epoch(epoch)), read ahead of the consumer, in order."""
        def table(epoch) -> np.ndarray:
            """The epoch's row positions, a batch per row; the last batch is padded with -1."""
            order = row_order(self.count, seed_of_epoch(int(epoch)))
            padded = np.full(steps_per_epoch(self.count, self.batch_size) * self.batch_size, -1, np.int64)
            padded[:len(order)] = order
            return padded.reshape(-1, self.batch_size)

        def epoch_batches(epoch):
            rows = tf.numpy_function(table, [epoch], tf.int64, stateful=False)
            return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(rows, [None, self.batch_size]))

        # One batch read at a time, ahead of the consumer: the reader holds the GIL but for its copies, so calls
        # in parallel only hand the GIL back and forth (measured once with the bench's input pipeline code, not
        # kept: 2 cores, batch 64, 1 call 63% / 112% of the raw read on 30 / 228-frame videos, 2 calls 49% / 100%,
        # AUTOTUNE 27% / 72%)
        return epochs.flat_map(epoch_batches).skip(skip).map(self._load, num_parallel_calls=1)

    def _load(self, positions):
        positions = tf.boolean_mask(positions, positions >= 0)
        features, num_frames, labels = tf.numpy_function(self.read, [positions], (self.dtype, tf.int32, tf.float32),
                                                         stateful=False)
        inputs = {"features": tf.ensure_shape(features, [None, *self.shape])}
        if self.level == "frame":
            inputs["num_frames"] = tf.ensure_shape(num_frames, [None])
        labels = tf.ensure_shape(labels, [None, self.num_classes])
        return (tf.gather(self.ids, positions), inputs, labels) if self.with_ids else (inputs, labels)


def make_dataset(
    data_root: Path,
    rows: pd.DataFrame,
    level: str,
    version: int,
    num_classes: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    max_frames: int = MAX_FRAMES,
    with_ids: bool = False,
) -> tf.data.Dataset:
    """Batches of the videos in `rows` (index rows of one level), one pass, in row order unless shuffled.

    Yields ({"features"[, "num_frames" at frame level]}, labels), plus ids first when with_ids.
    """
    pipeline = _Pipeline(data_root, rows, level, version, num_classes, batch_size, max_frames, with_ids)
    one_pass = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
    return pipeline.batches(one_pass, lambda _: seed if shuffle else None).prefetch(tf.data.AUTOTUNE)


def make_training_stream(
    data_root: Path,
    rows: pd.DataFrame,
    level: str,
    version: int,
    num_classes: int,
    batch_size: int,
    *,
    seed: int,
    start_epoch: int,
    end_epoch: int,
    skip_batches: int = 0,
    max_frames: int = MAX_FRAMES,
) -> tf.data.Dataset:
    """The training batches of epochs [start_epoch, end_epoch), the first `skip_batches` left out.

    Epoch e is a permutation of the rows drawn with seed epoch_seed(seed, e), so the
    stream does not depend on where it starts: resuming at (e, b) gives the same
    batches as an uninterrupted run. batch_size is the global batch (per-replica
    batch x replicas).
    """
    if not 0 <= start_epoch <= end_epoch:
        raise ValueError(f"bad epoch range [{start_epoch}, {end_epoch})")
    pipeline = _Pipeline(data_root, rows, level, version, num_classes, batch_size, max_frames, with_ids=False)
    epochs = tf.data.Dataset.range(start_epoch, end_epoch)
    return pipeline.batches(epochs, lambda epoch: epoch_seed(seed, epoch), skip_batches).prefetch(tf.data.AUTOTUNE)
