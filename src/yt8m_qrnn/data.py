"""tf.data input pipelines over the index: parse, dequantize, pad, batch.

Video level yields features [B, 1152]; frame level yields features [B, T, 1152]
with T the longest video selected (at most max_frames), so every batch has the same
static shape, and num_frames [B]. Padding frames are zeros (after dequantization),
as the starter's resize_axis gives. Labels are dense multi-hot [B, num_classes].

Two entry points:
- make_dataset: one pass over some index rows (evaluation, prediction);
- make_training_stream: the training batches of epochs [start_epoch, end_epoch),
  each epoch shuffled with its own seed (a function of the run's seed and the epoch
  number only), so a run resumed at epoch e / batch b sees exactly the batches an
  uninterrupted run would have seen from that point on.

Records are read shard by shard (interleaved, files in a shuffled order for
training), parsed and dequantized in parallel, filtered to the selected ids (the
index splits a shard's videos between train and eval by id), shuffled through a
buffer, padded into batches and prefetched.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

RGB_DIM, AUDIO_DIM = 1024, 128
FEATURE_DIM = RGB_DIM + AUDIO_DIM
MAX_FRAMES = 300
SHUFFLE_BUFFER = 4096
INTERLEAVE_CYCLE = 4
# Epoch e of a run with seed s shuffles with seed s * EPOCH_SEED_STRIDE + e.
EPOCH_SEED_STRIDE = 1_000_003


def id_key(version: int) -> str:
    return "id" if version == 2 else "video_id"


def dequantize(q: tf.Tensor) -> tf.Tensor:
    """The starter's Dequantize(max=2, min=-2): q * 4/255 + 4/512 - 2."""
    return tf.cast(q, tf.float32) * (4.0 / 255.0) + (4.0 / 512.0 - 2.0)


def _multi_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    labels = tf.cast(labels, tf.int32)
    return tf.scatter_nd(tf.expand_dims(labels, 1), tf.ones_like(labels, tf.float32), [num_classes])


def video_parser(version: int, num_classes: int):
    spec = {
        id_key(version): tf.io.FixedLenFeature([], tf.string),
        "labels": tf.io.VarLenFeature(tf.int64),
        "mean_rgb": tf.io.FixedLenFeature([RGB_DIM], tf.float32),
        "mean_audio": tf.io.FixedLenFeature([AUDIO_DIM], tf.float32),
    }

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        features = tf.concat([ex["mean_rgb"], ex["mean_audio"]], axis=0)
        labels = _multi_hot(ex["labels"].values, num_classes)
        return ex[id_key(version)], features, tf.constant(1, tf.int32), labels

    return parse


def frame_parser(version: int, num_classes: int, max_frames: int):
    context = {id_key(version): tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64)}
    sequence = {
        "rgb": tf.io.FixedLenSequenceFeature([], tf.string),
        "audio": tf.io.FixedLenSequenceFeature([], tf.string),
    }

    def parse(record):
        ctx, seq = tf.io.parse_single_sequence_example(record, context_features=context, sequence_features=sequence)
        rgb = tf.reshape(tf.io.decode_raw(seq["rgb"], tf.uint8), [-1, RGB_DIM])[:max_frames]
        audio = tf.reshape(tf.io.decode_raw(seq["audio"], tf.uint8), [-1, AUDIO_DIM])[:max_frames]
        features = dequantize(tf.concat([rgb, audio], axis=1))
        labels = _multi_hot(ctx["labels"].values, num_classes)
        return ctx[id_key(version)], features, tf.shape(features)[0], labels

    return parse


class _Pipeline:
    """What every pass over a set of index rows shares: files, parser, id filter, padding."""

    def __init__(self, data_root: Path, rows: pd.DataFrame, level: str, version: int, num_classes: int,
                 batch_size: int, max_frames: int, with_ids: bool):
        rows = rows[rows["level"] == level]
        if rows.empty:
            raise ValueError(f"no {level}-level videos in the selected index rows")
        self.level, self.batch_size, self.with_ids = level, batch_size, with_ids
        self.num_rows = len(rows)
        self.files = [str(Path(data_root) / s) for s in sorted(rows["shard"].unique())]
        self.wanted = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(rows["id"].astype(str).to_numpy()),
                                                tf.ones(len(rows), tf.int32)),
            default_value=0,
        )
        self.frames = int(min(max_frames, rows["num_frames"].max()))
        self.parse = video_parser(version, num_classes) if level == "video" else \
            frame_parser(version, num_classes, self.frames)
        # a fixed time length (the longest video selected) gives every batch the same static shape
        feature_shape = [FEATURE_DIM] if level == "video" else [self.frames, FEATURE_DIM]
        inputs_shape = {"features": feature_shape} | ({"num_frames": []} if level == "frame" else {})
        self.padded_shapes = ([], inputs_shape, [num_classes]) if with_ids else (inputs_shape, [num_classes])

    def one_pass(self, seed=None) -> tf.data.Dataset:
        """Batches of every selected video once; shuffled (files and a buffer) when seed is given."""
        files = tf.data.Dataset.from_tensor_slices(self.files)
        if seed is not None:
            files = files.shuffle(len(self.files), seed=seed)
        # deterministic everywhere: the order is then a function of the seed alone
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(INTERLEAVE_CYCLE, len(self.files)),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.map(self.parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        wanted = self.wanted
        ds = ds.filter(lambda vid, *_: wanted.lookup(vid) > 0)
        if seed is not None:
            ds = ds.shuffle(min(self.num_rows, SHUFFLE_BUFFER), seed=seed)
        level, with_ids = self.level, self.with_ids

        def arrange(vid, features, num_frames, labels):
            inputs = {"features": features}
            if level == "frame":
                inputs["num_frames"] = num_frames
            return (vid, inputs, labels) if with_ids else (inputs, labels)

        ds = ds.map(arrange, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.padded_batch(self.batch_size, padded_shapes=self.padded_shapes)


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
    """Batches of the videos in `rows` (index rows of one level), one pass.

    Yields ({"features"[, "num_frames" at frame level]}, labels), plus ids first when with_ids.
    """
    pipeline = _Pipeline(data_root, rows, level, version, num_classes, batch_size, max_frames, with_ids)
    return pipeline.one_pass(seed if shuffle else None).prefetch(tf.data.AUTOTUNE)


def epoch_seed(seed: int, epoch):
    return seed * EPOCH_SEED_STRIDE + epoch


def steps_per_epoch(num_videos: int, batch_size: int) -> int:
    """Batches in one pass (the last one may be smaller, as the starter's allow_smaller_final_batch)."""
    return math.ceil(num_videos / batch_size)


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

    Epoch e is shuffled with seed epoch_seed(seed, e), so the stream does not depend on
    where it starts: resuming at (e, b) gives the same batches as an uninterrupted run.
    batch_size is the global batch (per-replica batch x replicas).
    """
    if not 0 <= start_epoch <= end_epoch:
        raise ValueError(f"bad epoch range [{start_epoch}, {end_epoch})")
    pipeline = _Pipeline(data_root, rows, level, version, num_classes, batch_size, max_frames, with_ids=False)
    epochs = tf.data.Dataset.range(start_epoch, end_epoch)
    ds = epochs.flat_map(lambda epoch: pipeline.one_pass(epoch_seed(seed, epoch)))
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.prefetch(tf.data.AUTOTUNE)


def subset_rows(index: pd.DataFrame, subset: str, level: str) -> pd.DataFrame:
    return index[(index["subset"] == subset) & (index["level"] == level)]


def label_matrix(rows: pd.DataFrame, num_classes: int) -> np.ndarray:
    out = np.zeros((len(rows), num_classes), np.float32)
    for i, labels in enumerate(rows["labels"]):
        out[i, np.asarray(labels, int)] = 1.0
    return out
