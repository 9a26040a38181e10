"""tf.data input pipelines over the index: read, shuffle, parse in batches, pad.

Video level yields features [B, 1152] float32; frame level yields the stored
quantized frames, uint8 [B, T, 1152], with T the longest video selected (at most
max_frames), so every batch has the same static shape, and num_frames [B]. Padding
frames are zero bytes; the models dequantize on the device (models.Dequantize) and
zero the padding there, as the starter's resize_axis does after dequantization.
Labels are dense multi-hot [B, num_classes].

Two entry points:
- make_dataset: one pass over some index rows (evaluation, prediction);
- make_training_stream: the training batches of epochs [start_epoch, end_epoch),
  each epoch shuffled with its own seed (a function of the run's seed and the epoch
  number only), so a run resumed at epoch e / batch b sees exactly the batches an
  uninterrupted run would have seen from that point on.

Records are read shard by shard (interleaved, files in a shuffled order for
training), shuffled as serialized records through a buffer, then parsed a batch at
a time (one parse_example / parse_sequence_example call per batch, batches in
parallel). Each parsed batch keeps only the selected ids (the index splits a shard's videos
between train and eval by id) and the batches are cut again to batch_size.
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
# the starter's shuffle_batch_join capacity: 5 batches
SHUFFLE_BATCHES = 5
INTERLEAVE_CYCLE = 4
# Epoch e of a run with seed s shuffles with seed s * EPOCH_SEED_STRIDE + e.
EPOCH_SEED_STRIDE = 1_000_003


def id_key(version: int) -> str:
    return "id" if version == 2 else "video_id"


def _multi_hot(labels: tf.SparseTensor, num_classes: int) -> tf.Tensor:
    """[batch, num_classes] float32 from the VarLen labels of a batch."""
    at = tf.stack([labels.indices[:, 0], labels.values], axis=1)
    hot = tf.scatter_nd(at, tf.ones_like(labels.values, tf.float32), [labels.dense_shape[0], num_classes])
    return tf.ensure_shape(hot, [None, num_classes])


def video_batch_parser(version: int, num_classes: int):
    """serialized Examples [n] -> (ids [n], features [n, 1152] float32, num_frames [n] (ones), labels [n, C])."""
    spec = {
        id_key(version): tf.io.FixedLenFeature([], tf.string),
        "labels": tf.io.VarLenFeature(tf.int64),
        "mean_rgb": tf.io.FixedLenFeature([RGB_DIM], tf.float32),
        "mean_audio": tf.io.FixedLenFeature([AUDIO_DIM], tf.float32),
    }

    def parse(records):
        ex = tf.io.parse_example(records, spec)
        features = tf.concat([ex["mean_rgb"], ex["mean_audio"]], axis=1)
        return (ex[id_key(version)], features, tf.ones_like(records, tf.int32),
                _multi_hot(ex["labels"], num_classes))

    return parse


def frame_batch_parser(version: int, num_classes: int, frames: int):
    """serialized SequenceExamples [n] -> (ids [n], quantized frames [n, frames, 1152] uint8 (the first
    `frames` of each video, zero bytes after its end), num_frames [n], labels [n, C])."""
    context = {id_key(version): tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64)}
    sequence = {
        "rgb": tf.io.FixedLenSequenceFeature([], tf.string),
        "audio": tf.io.FixedLenSequenceFeature([], tf.string),
    }

    def parse(records):
        ctx, seq, lengths = tf.io.parse_sequence_example(records, context_features=context,
                                                         sequence_features=sequence)
        # frames past a video's end are empty strings, which decode to zero bytes
        rgb = tf.io.decode_raw(seq["rgb"][:, :frames], tf.uint8, fixed_length=RGB_DIM)
        audio = tf.io.decode_raw(seq["audio"][:, :frames], tf.uint8, fixed_length=AUDIO_DIM)
        features = tf.concat([rgb, audio], axis=2)
        features = tf.pad(features, [[0, 0], [0, frames - tf.shape(features)[1]], [0, 0]])
        features = tf.ensure_shape(features, [None, frames, FEATURE_DIM])
        num_frames = tf.minimum(tf.cast(lengths["rgb"], tf.int32), frames)
        return ctx[id_key(version)], features, num_frames, _multi_hot(ctx["labels"], num_classes)

    return parse


class _Pipeline:
    """What every pass over a set of index rows shares: files, parser, id filter, batch layout."""

    def __init__(self, data_root: Path, rows: pd.DataFrame, level: str, version: int, num_classes: int,
                 batch_size: int, max_frames: int, with_ids: bool):
        rows = rows[rows["level"] == level]
        if rows.empty:
            raise ValueError(f"no {level}-level videos in the selected index rows")
        self.level, self.batch_size, self.with_ids = level, batch_size, with_ids
        self.files = [str(Path(data_root) / s) for s in sorted(rows["shard"].unique())]
        self.wanted = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(rows["id"].astype(str).to_numpy()),
                                                tf.ones(len(rows), tf.int32)),
            default_value=0,
        )
        # a fixed time length (the longest video selected) gives every batch the same static shape
        self.frames = int(min(max_frames, rows["num_frames"].max()))
        self.parse = video_batch_parser(version, num_classes) if level == "video" else \
            frame_batch_parser(version, num_classes, self.frames)

    def _selected_batch(self, records):
        """A batch of serialized records, parsed, without the videos that are not selected, laid out."""
        vid, features, num_frames, labels = self.parse(records)
        keep = self.wanted.lookup(vid) > 0
        vid, features, num_frames, labels = (tf.boolean_mask(t, keep) for t in (vid, features, num_frames, labels))
        inputs = {"features": features}
        if self.level == "frame":
            inputs["num_frames"] = num_frames
        return (vid, inputs, labels) if self.with_ids else (inputs, labels)

    def one_pass(self, seed=None) -> tf.data.Dataset:
        """Batches of every selected video once; shuffled (files and a buffer) when seed is given."""
        files = tf.data.Dataset.from_tensor_slices(self.files)
        if seed is not None:
            files = files.shuffle(len(self.files), seed=seed)
        # deterministic everywhere: the order is then a function of the seed alone
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(INTERLEAVE_CYCLE, len(self.files)),
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if seed is not None:
            ds = ds.shuffle(SHUFFLE_BATCHES * self.batch_size, seed=seed)
        ds = ds.batch(self.batch_size).map(self._selected_batch, num_parallel_calls=tf.data.AUTOTUNE,
                                           deterministic=True)
        return ds.rebatch(self.batch_size)


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
