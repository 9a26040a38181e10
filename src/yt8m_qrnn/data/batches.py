"""Batches of index rows as numpy arrays, on any Keras backend.

- one_pass: every selected video once, in row order, read one batch ahead (evaluation, validation);
- EpochBatches: one training epoch as a keras.utils.PyDataset, for fit on JAX and PyTorch.

They hold the batches data.stream's tf.data pipelines hold (the TensorFlow training path):
the same rows in the same order (row_order, epoch_seed), read by the same reader. Inputs are
{"features": [B, 1152] float32 | [B, T, 1152] uint8, "num_frames": [B] (frame level)};
labels are dense multi-hot [B, num_classes] float32.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import keras
import numpy as np
import pandas as pd

from yt8m_qrnn.data.reader import FrameBatches, VideoBatches

MAX_FRAMES = 300
# Epoch e of a run with seed s is shuffled with seed s * EPOCH_SEED_STRIDE + e.
EPOCH_SEED_STRIDE = 1_000_003


def row_order(count: int, seed: int | None) -> np.ndarray:
    """Every row position once: in row order, or a permutation drawn with `seed`."""
    return np.arange(count) if seed is None else np.random.default_rng(seed).permutation(count)


def epoch_seed(seed: int, epoch):
    return seed * EPOCH_SEED_STRIDE + epoch


def steps_per_epoch(num_videos: int, batch_size: int) -> int:
    """Batches in one pass (the last one may be smaller, as the starter's allow_smaller_final_batch)."""
    return math.ceil(num_videos / batch_size)


class BatchReader:
    """Reads batches of positions in `rows` (index rows of one level) into model inputs and labels."""

    def __init__(self, data_root: Path, rows: pd.DataFrame, level: str, version: int, num_classes: int,
                 max_frames: int = MAX_FRAMES):
        rows = rows[rows["level"] == level]
        if rows.empty:
            raise ValueError(f"no {level}-level videos in the selected index rows")
        self.level, self.count, self.ids = level, len(rows), rows["id"].to_numpy(str)
        self.frames = None  # video level; frame level: a fixed time length (the longest video selected),
        if level == "video":  # which gives every batch the same (static) shape
            self.read = VideoBatches(data_root, rows, version, num_classes)
        else:
            self.frames = int(min(max_frames, rows["num_frames"].max()))
            self.read = FrameBatches(data_root, rows, version, num_classes, self.frames)

    def __call__(self, positions: np.ndarray) -> tuple[dict, np.ndarray]:
        features, num_frames, labels = self.read(positions)
        inputs = {"features": features}
        if self.level == "frame":
            inputs["num_frames"] = num_frames
        return inputs, labels


def one_pass(data_root: Path, rows: pd.DataFrame, level: str, version: int, num_classes: int, batch_size: int,
             *, max_frames: int = MAX_FRAMES) -> Iterator[tuple[np.ndarray, dict, np.ndarray]]:
    """(ids, inputs, labels) of every video in `rows`, in row order, the next batch read while one is used."""
    reader = BatchReader(data_root, rows, level, version, num_classes, max_frames)
    starts = range(0, reader.count, batch_size)
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for start in starts:
            positions = np.arange(start, min(start + batch_size, reader.count))
            following = pool.submit(reader, positions)
            if pending is not None:
                yield pending
            inputs, labels = following.result()
            pending = (reader.ids[positions], inputs, labels)
        if pending is not None:
            yield pending


class EpochBatches(keras.utils.PyDataset):
    """The training batches of one epoch, the first `skip` left out.

    The epoch's rows are the permutation drawn with epoch_seed(seed, epoch), so a run resumed at
    (epoch, batch) sees the batches an uninterrupted run would have. `multiple_of`: the number of
    devices a batch is split over; a smaller last batch is filled up to a multiple of it with its
    own first videos (each device needs an equal share).
    """

    def __init__(self, reader: BatchReader, batch_size: int, *, seed: int, epoch: int, skip: int = 0,
                 multiple_of: int = 1):
        super().__init__(workers=1, use_multiprocessing=False, max_queue_size=2)
        order = row_order(reader.count, epoch_seed(seed, epoch))
        self.batches = [order[start:start + batch_size] for start in range(0, reader.count, batch_size)][skip:]
        self.reader, self.multiple_of = reader, multiple_of

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, number: int) -> tuple[dict, np.ndarray]:
        positions = self.batches[number]
        short = -len(positions) % self.multiple_of
        if short:
            positions = np.concatenate([positions, np.resize(positions, short)])
        return self.reader(positions)


def subset_rows(index: pd.DataFrame, subset: str, level: str) -> pd.DataFrame:
    return index[(index["subset"] == subset) & (index["level"] == level)]


def label_matrix(rows: pd.DataFrame, num_classes: int) -> np.ndarray:
    out = np.zeros((len(rows), num_classes), np.float32)
    for i, labels in enumerate(rows["labels"]):
        out[i, np.asarray(labels, int)] = 1.0
    return out
