"""Batches read straight from the shards at the byte offsets of the index.

The index located every record (shard, header offset, data length), checked it,
and noted where its features are and the CRC stored after it. The shards are
memory-mapped (once per reader, read-only) and each record of a batch is checked
in place: its length field and stored CRC must be the ones indexed (so these are
the bytes the index checked), and its length and data must match their CRCs.
The features are then copied from the mapped record straight into the batch,
with no protobuf message built: at video level the two float lists, at frame
level the rgb and audio bytes of every frame (strided views, a fixed number of
bytes apart). Records the index did not find in the usual layout (rgb_at -1)
are parsed with protobuf and checked against their row.

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

from yt8m_qrnn.data.index_file import COLUMNS
from yt8m_qrnn.records import fastparse
from yt8m_qrnn.records.example_proto import Example, SequenceExample
from yt8m_qrnn.records.features import AUDIO_DIM, FEATURE_DIM, ID_KEYS, RGB_DIM
from yt8m_qrnn.records.tfrecord import (
    FOOTER,
    FOOTER_SIZE,
    HEADER,
    HEADER_SIZE,
    CorruptRecordError,
    RecordError,
    record_ok,
    scan_buffer,
)
from yt8m_qrnn.records.video import BadRecordError, frame_fields, parse_video_record

RGB_STRIDE, AUDIO_STRIDE = fastparse.FRAME_STRIDES
# Arrays handed to TensorFlow start at a multiple of this, TensorFlow's alignment for tensor buffers (malloc gives 16)
_ALIGNMENT = 64


class _Batches:
    """Callable: index row positions -> (features [n, ...], num_frames int32 [n], labels float32 [n, C]).

    rows: index rows of one level; positions count from 0 in their order. Safe to
    call from several threads at once.
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
        self._maps: dict[int, memoryview] = {}
        self._mapping = threading.Lock()

    def __call__(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        positions = np.asarray(positions, np.int64)
        features = self._empty(len(positions))
        maps = self._maps
        for out, position, shard, offset, length, crc in zip(
                features, positions.tolist(), *(column[positions].tolist() for column in
                                                (self.shard, self.offset, self.length, self.crc))):
            source = maps[shard] if shard in maps else self._map(shard)
            data_start = self._checked(source, position, offset, length, crc)
            if self.rgb_at[position] >= 0:
                self._copy(out, source, data_start, position)
            else:
                try:
                    self._parse_one(out, bytes(source[data_start:data_start + length]), position)
                except BadRecordError as err:
                    raise err.at(self._path(position), offset) from None
        return features, self._num_frames(positions), self._multi_hot(positions)

    def _map(self, shard: int) -> memoryview:
        with self._mapping:
            if shard not in self._maps:
                with open(self.paths[shard], "rb") as f:
                    empty = os.fstat(f.fileno()).st_size == 0  # mmap refuses empty files
                    self._maps[shard] = memoryview(b"" if empty else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            return self._maps[shard]

    def _checked(self, source: memoryview, position: int, offset: int, length: int, crc: int) -> int:
        """Where the record's data starts in source; CorruptRecordError / RecordError unless the record there
        holds the indexed bytes, intact."""
        data_start = offset + HEADER_SIZE
        end = data_start + length + FOOTER_SIZE
        if end > len(source):
            raise CorruptRecordError(self._path(position), offset,
                                     f"file ends inside the record the index places there "
                                     f"({end - offset} bytes): rerun the index stage")
        stored_length, _ = HEADER.unpack_from(source, offset)
        (stored_crc,) = FOOTER.unpack_from(source, end - FOOTER_SIZE)
        if stored_length != length or stored_crc != crc or not record_ok(source, offset):
            self._explain(bytes(source[offset:end]), position, stored_length, stored_crc)
        return data_start

    def _explain(self, record: bytes, position: int, stored_length: int, stored_crc: int) -> None:
        """Raise the error that says what is wrong with a record that failed its checks."""
        for _, _, problem in scan_buffer(record):
            if problem is not None:
                raise CorruptRecordError(self._path(position), int(self.offset[position]), problem)
        raise RecordError(self._path(position), int(self.offset[position]),
                          f"not the record indexed there (length {stored_length}, crc {stored_crc:#x}; indexed: "
                          f"{self.length[position]}, {self.crc[position]:#x}): rerun the index stage")

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

    def _copy(self, out: np.ndarray, source: memoryview, data_start: int, position: int) -> None:
        out[:RGB_DIM] = np.frombuffer(source, "<f4", RGB_DIM, data_start + int(self.rgb_at[position]))
        out[RGB_DIM:] = np.frombuffer(source, "<f4", AUDIO_DIM, data_start + int(self.audio_at[position]))

    def _parse_one(self, out: np.ndarray, data: bytes, position: int) -> None:
        self._check_row(position, *parse_video_record(data, self.version, "video"))
        feature = Example.FromString(data).features.feature
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

    def _copy(self, out: np.ndarray, source: memoryview, data_start: int, position: int) -> None:
        kept = min(int(self.num_frames[position]), self.frames)
        for columns, width, start, stride in ((slice(0, RGB_DIM), RGB_DIM, self.rgb_at, RGB_STRIDE),
                                              (slice(RGB_DIM, None), AUDIO_DIM, self.audio_at, AUDIO_STRIDE)):
            out[:kept, columns] = np.ndarray((kept, width), np.uint8, source, data_start + int(start[position]),
                                             (stride, 1))
        out[kept:] = 0

    def _parse_one(self, out: np.ndarray, data: bytes, position: int) -> None:
        try:
            sequence = SequenceExample.FromString(data)
        except DecodeError as err:
            raise BadRecordError(f"not a tf.train.SequenceExample: {err}") from None
        video_id, labels, rgb, audio = frame_fields(sequence, ID_KEYS[self.version], self.num_classes)
        self._check_row(position, video_id, labels, len(rgb))
        kept = min(len(rgb), self.frames)
        out[:kept, :RGB_DIM], out[:kept, RGB_DIM:] = rgb[:kept], audio[:kept]
        out[kept:] = 0

    def _num_frames(self, positions: np.ndarray) -> np.ndarray:
        return np.minimum(self.num_frames[positions], self.frames).astype(np.int32)


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)
