"""A small generated dataset in the exact YouTube-8M 2018 formats, with planted signal.

Labels are shaped like YouTube-8M 2018's (yt8m_label_shape.json): the number of labels of a
video follows the real videos' histogram (capped so that each label gets a frame), and the
classes are drawn with probability proportional to the vocabulary's TrainVideoCount, so a few
classes are common and most are rare.

Signal: a video is a sequence of *events*, each a run of frames showing the event's fixed
prototype in the 1152-d (1024 rgb + 128 audio) feature space plus Gaussian noise, quantized to
uint8 as the real data. The 2 x num_events most frequent classes come in twins sharing one
event: "contains e" (e shows somewhere before the end) and "ends with e" (e is the last event).
The frame mean cannot tell the twins apart; only models that see the order of the frames can.
Every other class shows one of num_events other events, each shared by hundreds of classes:
the rare classes are as hard to learn as in the real data. When no "ends with" class is among
a video's labels, its last run is blank (noise only) or one of those other events, so no
"contains" event passes for an ending.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from yt8m_qrnn.pipeline.dag import GENERATED_MIRROR
from yt8m_qrnn.pipeline.io import atomic_folder
from yt8m_qrnn.pipeline.params import stage_params
from yt8m_qrnn.records.example_proto import Example, SequenceExample
from yt8m_qrnn.records.features import (
    FEATURE_DIM,
    NUM_CLASSES,
    RGB_DIM,
    dequantize,
    quantize,
)
from yt8m_qrnn.records.tfrecord import write_records

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
PROTOTYPE_SCALE = 0.5
BLANK = -1
LABEL_SHAPE = Path(__file__).with_name("yt8m_label_shape.json")


def shard_code(index: int) -> str:
    return ALPHABET[index // len(ALPHABET)] + ALPHABET[index % len(ALPHABET)]


@dataclass
class Video:
    video_id: str
    labels: list[int]
    frames: np.ndarray  # uint8 [num_frames, 1152]


@cache
def label_shape() -> tuple[np.ndarray, np.ndarray]:
    """(TrainVideoCount by class, number of videos with 1, 2, ... labels) of YouTube-8M 2018."""
    shape = json.loads(LABEL_SHAPE.read_text())
    per_video = shape["labels_per_video"]
    histogram = np.zeros(max(int(k) for k in per_video) + 1)
    for k, videos in per_video.items():
        histogram[int(k)] = videos
    return np.asarray(shape["train_video_count"], dtype=float), histogram


class EventWorld:
    """The hidden structure the models must discover."""

    def __init__(self, num_events: int, num_classes: int, noise: float, rng: np.random.Generator):
        counts, self.labels_histogram = label_shape()
        if len(counts) != num_classes:
            raise ValueError(f"generate: the label shape file has {len(counts)} classes, the data version {num_classes}")
        self.noise = noise
        self.num_events = num_events
        self.prototypes = rng.normal(0.0, PROTOTYPE_SCALE, size=(2 * num_events, FEATURE_DIM))
        self.class_probability = counts / counts.sum()
        by_frequency = np.argsort(-counts, kind="stable")
        twins, rest = by_frequency[:2 * num_events], by_frequency[2 * num_events:]
        self.event = np.empty(num_classes, dtype=int)
        self.event[twins] = rng.permutation(num_events)[np.arange(len(twins)) // 2]
        self.event[rest] = num_events + rng.integers(0, num_events, size=len(rest))
        self.ends_with = np.zeros(num_classes, dtype=bool)
        self.ends_with[twins[1::2]] = True

    def draw_labels(self, rng: np.random.Generator, num_frames: int) -> np.ndarray:
        """A label count from the real histogram (at most num_frames - 1), then the classes; one ending at most."""
        counts = np.arange(len(self.labels_histogram))
        weights = np.where((counts >= 1) & (counts < num_frames), self.labels_histogram, 0.0)
        size = int(rng.choice(len(weights), p=weights / weights.sum()))
        while True:
            labels = rng.choice(len(self.event), size=size, replace=False, p=self.class_probability)
            if self.ends_with[labels].sum() <= 1:
                return labels

    def sample_frames(self, rng: np.random.Generator, min_frames: int, max_frames: int):
        num_frames = int(rng.integers(min_frames, max_frames + 1))
        labels = self.draw_labels(rng, num_frames)
        ending = [int(self.event[c]) for c in labels if self.ends_with[c]]
        events = [int(e) for e in rng.permutation(sorted({int(self.event[c]) for c in labels} - set(ending)))]
        events += ending
        if not ending and events[-1] < self.num_events:
            events.append(BLANK)
        cuts = np.sort(rng.choice(np.arange(1, num_frames), size=len(events) - 1, replace=False))
        event_of_frame = np.asarray(events)[np.searchsorted(cuts, np.arange(num_frames), side="right")]
        values = rng.normal(0.0, self.noise, size=(num_frames, FEATURE_DIM))
        shown = event_of_frame != BLANK
        values[shown] += self.prototypes[event_of_frame[shown]]
        return quantize(values), sorted(int(c) for c in labels)


def frame_example(video: Video) -> bytes:
    seq = SequenceExample()
    seq.context.feature["id"].bytes_list.value.append(video.video_id.encode())
    seq.context.feature["labels"].int64_list.value.extend(video.labels)
    rgb = seq.feature_lists.feature_list["rgb"].feature
    audio = seq.feature_lists.feature_list["audio"].feature
    for frame in video.frames:
        rgb.add().bytes_list.value.append(frame[:RGB_DIM].tobytes())
        audio.add().bytes_list.value.append(frame[RGB_DIM:].tobytes())
    return seq.SerializeToString(deterministic=True)  # map entries in key order


def video_example(video: Video) -> bytes:
    example = Example()
    mean = dequantize(video.frames).mean(axis=0)
    example.features.feature["id"].bytes_list.value.append(video.video_id.encode())
    example.features.feature["labels"].int64_list.value.extend(video.labels)
    example.features.feature["mean_rgb"].float_list.value.extend(mean[:RGB_DIM].tolist())
    example.features.feature["mean_audio"].float_list.value.extend(mean[RGB_DIM:].tolist())
    return example.SerializeToString(deterministic=True)


def write_tfrecord(path: Path, records: list[bytes]) -> str:
    """Write with TFRecord framing; return the file's md5."""
    write_records(path, records)
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
    with atomic_folder(root) as tmp:
        return _write_mirror(tmp, gen, version, world, ids, rng)


def _write_mirror(tmp: Path, gen: dict, version: int, world: EventWorld, ids: IdAllocator,
                  rng: np.random.Generator) -> dict:
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
    summary = {"videos": counts, "class_events": world.event.tolist(),
               "ends_with_classes": np.flatnonzero(world.ends_with).tolist()}
    (tmp / "GENERATED.json").write_text(json.dumps(summary, indent=1))
    return summary


log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the stage

def run(params: dict) -> None:
    gen = stage_params(params, "generate")["generate"]
    # The generated data always has the 2018 format; its mirror mimics version 2.
    summary = generate_mirror(gen, version=2, num_classes=NUM_CLASSES[2], root=GENERATED_MIRROR)
    log.info("generated %s videos under %s", summary["videos"], GENERATED_MIRROR)
