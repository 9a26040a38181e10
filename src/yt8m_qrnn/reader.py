"""Batches read straight from the shards at the byte offsets of the index.

The index located every record (shard, header offset, data length), checked it,
and noted where its features are and the CRC stored after it. The shards are
memory-mapped (once per reader, read-only) and a batch's records copied from
them into one buffer; each record's length and stored CRC must be the ones
indexed (so these are the bytes the index checked) and its data must match that
CRC (one crc32c pass). The features are then copied
out of the serialized records at the indexed positions, with no protobuf message
built: at video level the two float lists, at frame level every frame's rgb and
audio bytes, in one gather per batch. Records the index did not find in the
usual layout (rgb_at -1) are parsed with protobuf and checked against their row.

A shard must not be cut short in place while a reader has it mapped (reading
past the end of a mapped file kills the process with SIGBUS); replacing it with
a new file, as fetch and DVC do, is safe: the old one stays mapped.
"""
from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
from google.protobuf.message import DecodeError
from tensorflow.core.example import example_pb2

from . import fastparse
from .index import COLUMNS, ID_KEYS, BadRecordError, ReadBuffer, frame_fields, parse_video_record
from .tfrecord import (
    FOOTER_SIZE, HEADER_SIZE, CorruptRecordError, RecordError, crcs_match, scan_buffer, stored_crcs, stored_lengths,
)

RGB_DIM, AUDIO_DIM = fastparse.RGB_DIM, fastparse.AUDIO_DIM
FEATURE_DIM = RGB_DIM + AUDIO_DIM
# Arrays handed to TensorFlow start at a multiple of this, TensorFlow's own alignment for tensors (malloc gives 16)
_ALIGNMENT = 64


class _Batches:
    """Callable: index row positions -> (features [n, ...], num_frames int32 [n], labels float32 [n, C]).

    rows: index rows of one level; positions count from 0 in their order. Safe to
    call from several threads at once (each thread reads into a buffer of its own).
    """

    def __init__(self, data_root: Path, rows: pd.DataFrame, version: int, num_classes: int):
        missing = [column for column in COLUMNS if column not in rows.columns]
        if missing:
            raise ValueError(f"the index rows have no {', '.join(missing)} column (an index written by an older "
                             "version of this pipeline?): rerun the index stage")
        shards = sorted(rows["shard"].unique())
        self.paths = [Path(data_root) / shard for shard in shards]
        self.shard = pd.Categorical(rows["shard"], categories=shards).codes.astype(np.int64)
        self.offset = rows["offset"].to_numpy(np.int64)
        self.length = rows["length"].to_numpy(np.int64)
        self.crc = rows["data_crc"].to_numpy(np.int64)
        self.rgb_at = rows["rgb_at"].to_numpy(np.int64)
        self.audio_at = rows["audio_at"].to_numpy(np.int64)
        self.ids = rows["id"].to_numpy(object)
        self.num_frames = rows["num_frames"].to_numpy(np.int64)
        self.label_count = rows["labels"].map(len).to_numpy(np.int64)
        self.label_first = np.cumsum(self.label_count) - self.label_count
        self.label_values = np.concatenate([np.asarray(v, np.int64) for v in rows["labels"]] or [np.zeros(0, np.int64)])
        self.version, self.num_classes = version, num_classes
        # one read buffer per OS thread: TensorFlow runs a numpy_function under a new Python thread state each
        # call, so a threading.local would be new each call too
        self._buffers: dict[int, ReadBuffer] = {}
        self._maps: dict[int, np.ndarray] = {}
        self._mapping = threading.Lock()

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        positions = np.asarray(positions, np.int64)
        buf, starts = self._read(positions)
        self._check(buf, starts, positions)
        features = self._empty(len(positions))
        data_start = starts + HEADER_SIZE
        usual = self.rgb_at[positions] >= 0
        if usual.all():
            self._copy(features, buf, data_start, positions)
        else:
            self._copy_some(features, buf, data_start, positions, usual)
        return features, self._num_frames(positions), self._multi_hot(positions)

    def _copy_some(self, features, buf, data_start, positions, usual) -> None:
        rest = np.flatnonzero(~usual)
        parsed = self._empty(len(rest))
        for k, i in enumerate(rest.tolist()):
            position, start = int(positions[i]), int(data_start[i])
            try:
                self._parse_one(parsed[k], buf[start:start + self.length[position]].tobytes(), position)
            except BadRecordError as err:
                raise err.at(self._path(position), int(self.offset[position])) from None
        fast = np.flatnonzero(usual)
        some = self._empty(len(fast))
        self._copy(some, buf, data_start[fast], positions[fast])
        features[fast], features[rest] = some, parsed

    def _read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The framed records back to back (then fastparse.PADDING zero bytes) and where each one starts."""
        sizes = HEADER_SIZE + self.length[positions] + FOOTER_SIZE
        starts = np.cumsum(sizes) - sizes
        total = int(sizes.sum())
        buffer = self._buffers.setdefault(threading.get_ident(), ReadBuffer())
        buf = buffer.get(total + fastparse.PADDING)
        buf[total:] = 0
        maps, records = self._maps, []
        for size, shard, offset in zip(sizes.tolist(), self.shard[positions].tolist(), self.offset[positions].tolist()):
            source = maps[shard] if shard in maps else self._map(shard)
            if offset + size > len(source):
                raise CorruptRecordError(self.paths[shard], offset,
                                         f"file ends inside the record the index places there ({size} bytes): "
                                         "rerun the index stage")
            records.append(source[offset:offset + size])
        np.concatenate(records, out=buf[:total])
        return buf, starts

    def _map(self, shard: int) -> np.ndarray:
        with self._mapping:
            if shard not in self._maps:
                with open(self.paths[shard], "rb") as f:
                    empty = os.fstat(f.fileno()).st_size == 0  # mmap refuses empty files
                    self._maps[shard] = np.zeros(0, np.uint8) if empty else np.frombuffer(
                        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
            return self._maps[shard]

    def _check(self, buf: np.ndarray, starts: np.ndarray, positions: np.ndarray) -> None:
        """CorruptRecordError / RecordError unless every record holds the indexed bytes, intact."""
        lengths = self.length[positions]
        stored_length = stored_lengths(buf, starts)
        stored_crc = stored_crcs(buf, starts + HEADER_SIZE + lengths)
        if ((stored_length == lengths) & (stored_crc == self.crc[positions])).all() and \
                crcs_match(buf, starts, lengths):
            return
        for i, position in enumerate(positions.tolist()):
            record = buf[starts[i]:starts[i] + HEADER_SIZE + lengths[i] + FOOTER_SIZE].tobytes()
            for _, data, problem in scan_buffer(record):
                if problem is not None:
                    raise CorruptRecordError(self._path(position), int(self.offset[position]), problem)
            if stored_length[i] != lengths[i] or stored_crc[i] != self.crc[position]:
                raise RecordError(self._path(position), int(self.offset[position]),
                                  f"not the record indexed there (length {stored_length[i]}, crc {stored_crc[i]:#x}; "
                                  f"indexed: {lengths[i]}, {self.crc[position]:#x}): rerun the index stage")

    def _check_row(self, position: int, video_id: str, labels: list[int], frames: int) -> None:
        """RecordError unless a record parsed with protobuf holds what its index row says."""
        first, count = self.label_first[position], self.label_count[position]
        indexed = (self.ids[position], self.label_values[first:first + count].tolist(), int(self.num_frames[position]))
        if (video_id, labels, frames) != indexed:
            raise RecordError(self._path(position), int(self.offset[position]),
                              f"holds video {video_id!r} (labels {labels}, {frames} frames), the index says "
                              f"{indexed[0]!r} (labels {indexed[1]}, {indexed[2]} frames): rerun the index stage")

    def _multi_hot(self, positions: np.ndarray) -> np.ndarray:
        counts = self.label_count[positions]
        at = np.repeat(self.label_first[positions] - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
        labels = _aligned_empty((len(positions), self.num_classes), np.float32)
        labels.fill(0.0)
        labels[np.repeat(np.arange(len(positions)), counts), self.label_values[at]] = 1.0
        return labels

    def _path(self, position: int) -> Path:
        return self.paths[self.shard[position]]


class VideoBatches(_Batches):
    """Video level: features float32 [n, 1152] (mean_rgb, then mean_audio), num_frames all ones."""

    def _empty(self, count: int) -> np.ndarray:
        return _aligned_empty((count, FEATURE_DIM), np.float32)

    def _copy(self, out: np.ndarray, buf: np.ndarray, data_start: np.ndarray, positions: np.ndarray) -> None:
        out_bytes = out.view(np.uint8)
        out_bytes[:, :4 * RGB_DIM] = _windows(buf, 4 * RGB_DIM)[data_start + self.rgb_at[positions]]
        out_bytes[:, 4 * RGB_DIM:] = _windows(buf, 4 * AUDIO_DIM)[data_start + self.audio_at[positions]]

    def _parse_one(self, out: np.ndarray, data: bytes, position: int) -> None:
        self._check_row(position, *parse_video_record(data, self.version, "video"))
        feature = example_pb2.Example.FromString(data).features.feature
        out[:RGB_DIM] = feature["mean_rgb"].float_list.value
        out[RGB_DIM:] = feature["mean_audio"].float_list.value

    def _num_frames(self, positions: np.ndarray) -> np.ndarray:
        return np.ones(len(positions), np.int32)


class FrameBatches(_Batches):
    """Frame level: the stored uint8 frames [n, frames, 1152], each video's first `frames` frames, zero bytes
    after its end; num_frames at most `frames`."""

    def __init__(self, data_root: Path, rows: pd.DataFrame, version: int, num_classes: int, frames: int):
        super().__init__(data_root, rows, version, num_classes)
        self.frames = frames

    def _empty(self, count: int) -> np.ndarray:
        return _aligned_empty((count, self.frames, FEATURE_DIM), np.uint8)

    def _copy(self, out: np.ndarray, buf: np.ndarray, data_start: np.ndarray, positions: np.ndarray) -> None:
        kept = self._num_frames(positions).astype(np.int64)
        frame = np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept)  # frame number within its video
        rows = out.reshape(-1, FEATURE_DIM)
        at = np.repeat(np.arange(len(positions)) * self.frames, kept) + frame
        for columns, width, start, stride in ((slice(0, RGB_DIM), RGB_DIM, self.rgb_at, fastparse.FRAME_STRIDES[0]),
                                              (slice(RGB_DIM, None), AUDIO_DIM, self.audio_at,
                                               fastparse.FRAME_STRIDES[1])):
            source = np.repeat(data_start + start[positions], kept) + frame * stride
            rows[at, columns] = _windows(buf, width)[source]
        padding = np.arange(self.frames) >= kept[:, None]
        rows[padding.ravel()] = 0

    def _parse_one(self, out: np.ndarray, data: bytes, position: int) -> None:
        try:
            sequence = example_pb2.SequenceExample.FromString(data)
        except DecodeError as err:
            raise BadRecordError(f"not a tf.train.SequenceExample: {err}") from None
        video_id, labels, rgb, audio = frame_fields(sequence, ID_KEYS[self.version], self.num_classes)
        self._check_row(position, video_id, labels, len(rgb))
        kept = min(len(rgb), self.frames)
        out[:kept, :RGB_DIM], out[:kept, RGB_DIM:] = rgb[:kept], audio[:kept]
        out[kept:] = 0

    def _num_frames(self, positions: np.ndarray) -> np.ndarray:
        return np.minimum(self.num_frames[positions], self.frames).astype(np.int32)


def _windows(buf: np.ndarray, width: int) -> np.ndarray:
    """A view, only ever read, of the `width` bytes at every offset of buf: row p is buf[p:p + width]."""
    return np.ndarray((len(buf) - width + 1, width), np.uint8, buf, 0, (1, 1))


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)
