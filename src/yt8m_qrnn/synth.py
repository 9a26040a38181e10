"""A small generated dataset in the exact YouTube-8M 2018 formats, with planted signal.

Each video is a sequence of 2 or 3 *events*; every event type has a fixed
prototype in the 1152-d (1024 rgb + 128 audio) feature space and each frame is
its event's prototype plus Gaussian noise, quantized to uint8 as the real data.

Labels (class ids spread over the 3862-class vocabulary):
- one "contains event e" class per event present: visible in the frame mean;
- one "ends with event e" class for the last event: the frame mean cannot tell
  which event came last, so only models that see frame order can learn it.
Event types are drawn with Zipf-like frequencies, so a class-prior baseline is
non-trivial but beatable.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .quantization import dequantize, quantize

RGB_DIM, AUDIO_DIM = 1024, 128
FEATURE_DIM = RGB_DIM + AUDIO_DIM
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
PROTOTYPE_SCALE = 0.5
EVENTS_PER_VIDEO = (2, 3)


def shard_code(index: int) -> str:
    return ALPHABET[index // len(ALPHABET)] + ALPHABET[index % len(ALPHABET)]


@dataclass
class Video:
    video_id: str
    labels: list[int]
    frames: np.ndarray  # uint8 [num_frames, 1152]


class EventWorld:
    """The hidden structure the models must discover."""

    def __init__(self, num_events: int, num_classes: int, noise: float, rng: np.random.Generator):
        self.noise = noise
        self.prototypes = rng.normal(0.0, PROTOTYPE_SCALE, size=(num_events, FEATURE_DIM))
        classes = rng.choice(num_classes, size=2 * num_events, replace=False)
        self.contains_class = np.sort(classes[:num_events])
        self.ends_with_class = np.sort(classes[num_events:])
        weights = 1.0 / np.arange(1, num_events + 1) ** 0.8
        self.event_probability = weights / weights.sum()

    def sample_frames(self, rng: np.random.Generator, min_frames: int, max_frames: int):
        num_events = int(rng.choice(EVENTS_PER_VIDEO))
        events = rng.choice(len(self.prototypes), size=num_events, replace=False, p=self.event_probability)
        num_frames = int(rng.integers(min_frames, max_frames + 1))
        cuts = np.sort(rng.choice(np.arange(1, num_frames), size=num_events - 1, replace=False))
        segment_of_frame = np.searchsorted(cuts, np.arange(num_frames), side="right")
        values = self.prototypes[events[segment_of_frame]]
        values = values + rng.normal(0.0, self.noise, size=values.shape)
        labels = sorted({int(self.contains_class[e]) for e in events} | {int(self.ends_with_class[events[-1]])})
        return quantize(values), labels


def frame_example(video: Video) -> bytes:
    from tensorflow.core.example import example_pb2

    seq = example_pb2.SequenceExample()
    seq.context.feature["id"].bytes_list.value.append(video.video_id.encode())
    seq.context.feature["labels"].int64_list.value.extend(video.labels)
    rgb = seq.feature_lists.feature_list["rgb"].feature
    audio = seq.feature_lists.feature_list["audio"].feature
    for frame in video.frames:
        rgb.add().bytes_list.value.append(frame[:RGB_DIM].tobytes())
        audio.add().bytes_list.value.append(frame[RGB_DIM:].tobytes())
    return seq.SerializeToString(deterministic=True)  # map entries in key order


def video_example(video: Video) -> bytes:
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    mean = dequantize(video.frames).mean(axis=0)
    example.features.feature["id"].bytes_list.value.append(video.video_id.encode())
    example.features.feature["labels"].int64_list.value.extend(video.labels)
    example.features.feature["mean_rgb"].float_list.value.extend(mean[:RGB_DIM].tolist())
    example.features.feature["mean_audio"].float_list.value.extend(mean[RGB_DIM:].tolist())
    return example.SerializeToString(deterministic=True)


def write_tfrecord(path: Path, records: list[bytes]) -> str:
    """Write with TFRecord framing; return the file's md5."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return hashlib.md5(path.read_bytes()).hexdigest()


class IdAllocator:
    """4-character ids ending in the shard's code, unique across splits, like the real data."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.used: dict[str, set[int]] = {}

    def take(self, shard: int, count: int) -> list[str]:
        code = shard_code(shard)
        used = self.used.setdefault(code, set())
        free = np.setdiff1d(np.arange(len(ALPHABET) ** 2), np.fromiter(used, int, len(used)))
        if count > len(free):
            raise ValueError(f"generate: more than {len(ALPHABET) ** 2} videos per shard index across splits")
        picks = self.rng.choice(free, size=count, replace=False)
        used.update(int(p) for p in picks)
        return [shard_code(int(p)) + code for p in picks]


def generate_mirror(gen: dict, version: int, num_classes: int, root: Path) -> dict:
    """Write the dataset as a file:// mirror under `root`; returns a summary.

    Layout as the public mirror: {version}/{level}/{split}/{split}%04d.tfrecord and
    {version}/download_plans/{level}_{split}.json = {"files": {name: md5}}.
    Built in a temporary folder and renamed, so `root` is complete or absent.
    """
    rng = np.random.default_rng(gen["seed"])
    world = EventWorld(gen["num_events"], num_classes, gen["noise"], rng)
    ids = IdAllocator(rng)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plans: dict[str, dict[str, str]] = {}
    counts = {}
    for split, (num_shards, per_shard) in gen["splits"].items():
        unlabelled = split == "test"
        for shard in range(num_shards):
            videos = []
            for video_id in ids.take(shard, per_shard):
                frames, labels = world.sample_frames(rng, gen["min_frames"], gen["max_frames"])
                videos.append(Video(video_id, [] if unlabelled else labels, frames))
            name = f"{split}{shard:04d}.tfrecord"
            for level, encode in (("frame", frame_example), ("video", video_example)):
                folder = tmp / str(version) / level / split
                folder.mkdir(parents=True, exist_ok=True)
                md5 = write_tfrecord(folder / name, [encode(v) for v in videos])
                plans.setdefault(f"{level}_{split}", {})[name] = md5
        counts[split] = num_shards * per_shard
    plan_dir = tmp / str(version) / "download_plans"
    plan_dir.mkdir(parents=True, exist_ok=True)
    for plan_name, files in plans.items():
        (plan_dir / f"{plan_name}.json").write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
    summary = {
        "videos": counts,
        "contains_classes": world.contains_class.tolist(),
        "ends_with_classes": world.ends_with_class.tolist(),
    }
    (tmp / "GENERATED.json").write_text(json.dumps(summary, indent=1))
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return summary
