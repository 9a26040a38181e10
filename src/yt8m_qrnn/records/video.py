"""One YouTube-8M record, parsed and checked through protobuf: its id, labels and features.

The slow, explaining path: the index stage and the readers use fastparse's walk for the
records in the usual layout and fall back to these for the rest, which they also explain.
"""
from __future__ import annotations

import functools
from operator import attrgetter
from typing import Callable

import numpy as np
from google.protobuf.message import DecodeError

from yt8m_qrnn.records.example_proto import Example, FeatureList, SequenceExample
from yt8m_qrnn.records.features import AUDIO_DIM, ID_KEYS, LEVELS, NUM_CLASSES, RGB_DIM
from yt8m_qrnn.records.tfrecord import RecordError

_BYTES_VALUES = attrgetter("bytes_list.value")


class BadRecordError(RecordError):
    """A record with valid framing that is not a usable YouTube-8M example."""

    def __init__(self, reason, path=None, offset=None):
        super().__init__(path, offset, reason)

    def at(self, path, offset) -> BadRecordError:
        return BadRecordError(self.reason, path, offset)


def parse_video_record(data: bytes, version: int, level: str) -> tuple[str, list[int], int]:
    """(video id, sorted labels, number of frames) of one record; BadRecordError if unusable.

    Video level counts as 1 frame; unlabelled (test) records give [].
    """
    return record_parser(version, level)(data)


@functools.cache
def record_parser(version: int, level: str) -> Callable[[bytes], tuple[str, list[int], int]]:
    if version not in ID_KEYS:
        raise ValueError(f"unknown YouTube-8M version {version!r}; expected one of {sorted(ID_KEYS)}")
    if level == "video":
        return functools.partial(_parse_video, ID_KEYS[version], NUM_CLASSES[version])
    if level == "frame":
        return functools.partial(_parse_frame, ID_KEYS[version], NUM_CLASSES[version])
    raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")


def _parse_video(id_key: str, num_classes: int, data: bytes) -> tuple[str, list[int], int]:
    try:
        feats = Example.FromString(data).features.feature
    except DecodeError as err:
        raise BadRecordError(f"not a tf.train.Example: {err}") from None
    # The common case in one expression; anything unusual goes to the slower checks, which explain it.
    ids = feats[id_key].bytes_list.value
    labels = feats["labels"].int64_list.value[:]
    labels.sort()
    if not (len(ids) == 1 and ids[0] and labels and labels[0] >= 0 and labels[-1] < num_classes
            and len(feats["mean_rgb"].float_list.value) == RGB_DIM
            and len(feats["mean_audio"].float_list.value) == AUDIO_DIM):
        _check_context(feats, id_key, num_classes)
        _check_floats(feats, "mean_rgb", RGB_DIM)
        _check_floats(feats, "mean_audio", AUDIO_DIM)
    return _decode_id(ids[0], id_key), labels, 1


def _parse_frame(id_key: str, num_classes: int, data: bytes) -> tuple[str, list[int], int]:
    try:
        seq = SequenceExample.FromString(data)
    except DecodeError as err:
        raise BadRecordError(f"not a tf.train.SequenceExample: {err}") from None
    video_id, labels, rgb, _ = frame_fields(seq, id_key, num_classes)
    return video_id, labels, len(rgb)


def frame_fields(seq, id_key: str, num_classes: int) -> tuple[str, list[int], np.ndarray, np.ndarray]:
    """id, sorted labels and the uint8 rgb [frames, 1024] and audio [frames, 128] of a frame-level record."""
    context = seq.context.feature
    ids = context[id_key].bytes_list.value
    labels = context["labels"].int64_list.value[:]
    labels.sort()
    if not (len(ids) == 1 and ids[0] and labels and labels[0] >= 0 and labels[-1] < num_classes):
        _check_context(context, id_key, num_classes)
    lists = seq.feature_lists.feature_list
    rgb, audio = lists["rgb"], lists["audio"]
    if not rgb.feature:
        raise BadRecordError("no 'rgb' frames (not a frame-level SequenceExample?)")
    if len(audio.feature) != len(rgb.feature):
        raise BadRecordError(f"{len(rgb.feature)} 'rgb' frames but {len(audio.feature)} 'audio' frames")
    return _decode_id(ids[0], id_key), labels, _frames(rgb, "rgb", RGB_DIM), _frames(audio, "audio", AUDIO_DIM)


def _check_context(feats, id_key: str, num_classes: int) -> None:
    """Raise BadRecordError describing what is wrong with the id or labels, if anything."""
    ids = feats[id_key].bytes_list.value
    if len(ids) == 1 and not ids[0]:
        raise BadRecordError(f"{id_key!r} is empty")
    if len(ids) != 1:
        _bad_feature(feats, id_key, "one bytes value")
    labels = feats["labels"].int64_list.value
    for label in labels:
        if not 0 <= label < num_classes:
            raise BadRecordError(f"label {label} out of range [0, {num_classes})")
    if not labels and feats["labels"].WhichOneof("kind") not in (None, "int64_list"):
        _bad_feature(feats, "labels", "int64 values")


def _check_floats(feats, key: str, size: int) -> None:
    if len(feats[key].float_list.value) != size:
        _bad_feature(feats, key, f"{size} floats")


def _decode_id(raw: bytes, id_key: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise BadRecordError(f"{id_key!r} is not UTF-8: {raw[:40]!r}") from None


def _bad_feature(feats, key: str, expected: str):
    kind = feats[key].WhichOneof("kind")
    if kind is None:  # absent (our lookup inserted an empty one) or empty
        present = sorted(k for k in feats if feats[k].WhichOneof("kind"))
        raise BadRecordError(f"no {key!r} feature (expected {expected}; features: {', '.join(present) or 'none'})")
    count = len(getattr(feats[key], kind).value)
    raise BadRecordError(f"{key!r} has {count} {kind} values, expected {expected}")


def _frame_prefix(width: int) -> np.ndarray:
    """The bytes that precede each frame in a serialized FeatureList of single `width`-byte frames."""
    one = FeatureList()
    one.feature.add().bytes_list.value.append(bytes(width))
    return np.frombuffer(one.SerializeToString()[:-width], np.uint8)


_FRAME_PREFIX = {width: _frame_prefix(width) for width in (RGB_DIM, AUDIO_DIM)}


def _frames(feature_list, name: str, width: int) -> np.ndarray:
    """uint8 [frames, width]; BadRecordError unless every frame is exactly one `width`-byte string.

    Fast path: re-serialize the list (one C call) and check every frame's prefix
    with numpy, instead of touching each frame from Python. Lists this does not
    recognise (valid ones with unknown fields, say) get the per-frame check.
    """
    prefix = _FRAME_PREFIX[width]
    count, stride = len(feature_list.feature), len(prefix) + width
    raw = np.frombuffer(feature_list.SerializeToString(), np.uint8)
    if raw.size == count * stride:
        rows = raw.reshape(count, stride)
        if (rows[:, :len(prefix)] == prefix).all():
            return rows[:, len(prefix):]
    values = list(map(_BYTES_VALUES, feature_list.feature))
    for i, frame_values in enumerate(values):
        if len(frame_values) != 1 or len(frame_values[0]) != width:
            sizes = [len(v) for v in frame_values]
            raise BadRecordError(f"{name!r} frame {i} holds byte strings of sizes {sizes}, expected one of {width}")
    return np.frombuffer(b"".join(v[0] for v in values), np.uint8).reshape(count, width)
