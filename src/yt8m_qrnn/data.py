"""tf.data input pipelines over the index: parse, dequantize, pad, batch.

Video level yields features [B, 1152]; frame level yields features [B, T, 1152]
with T the longest video of the batch (at most max_frames) and num_frames [B].
Labels are dense multi-hot [B, num_classes].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

RGB_DIM, AUDIO_DIM = 1024, 128
FEATURE_DIM = RGB_DIM + AUDIO_DIM
MAX_FRAMES = 300


def id_key(version: int) -> str:
    return "id" if version == 2 else "video_id"


def dequantize(q: tf.Tensor) -> tf.Tensor:
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
    """Batches of the videos in `rows` (index rows of one level).

    Yields ({"features"[, "num_frames" at frame level]}, labels), plus ids first when with_ids.
    """
    rows = rows[rows["level"] == level]
    if rows.empty:
        raise ValueError(f"no {level}-level videos in the selected index rows")
    shards = sorted(rows["shard"].unique())
    files = [str(Path(data_root) / s) for s in shards]
    wanted = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(rows["id"].astype(str).to_numpy()), tf.ones(len(rows), tf.int32)),
        default_value=0,
    )
    parse = video_parser(version, num_classes) if level == "video" else frame_parser(version, num_classes, max_frames)
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = files_ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda vid, *_: wanted.lookup(vid) > 0)
    if shuffle:
        ds = ds.shuffle(min(len(rows), 4096), seed=seed, reshuffle_each_iteration=True)

    def arrange(vid, features, num_frames, labels):
        inputs = {"features": features}
        if level == "frame":
            inputs["num_frames"] = num_frames
        return (vid, inputs, labels) if with_ids else (inputs, labels)

    ds = ds.map(arrange)
    feature_shape = [FEATURE_DIM] if level == "video" else [None, FEATURE_DIM]
    inputs_shape = {"features": feature_shape} | ({"num_frames": []} if level == "frame" else {})
    padded = ([], inputs_shape, [num_classes]) if with_ids else (inputs_shape, [num_classes])
    ds = ds.padded_batch(batch_size, padded_shapes=padded)
    return ds.prefetch(tf.data.AUTOTUNE)


def subset_rows(index: pd.DataFrame, subset: str, level: str) -> pd.DataFrame:
    return index[(index["subset"] == subset) & (index["level"] == level)]


def label_matrix(rows: pd.DataFrame, num_classes: int) -> np.ndarray:
    out = np.zeros((len(rows), num_classes), np.float32)
    for i, labels in enumerate(rows["labels"]):
        out[i, np.asarray(labels, int)] = 1.0
    return out
