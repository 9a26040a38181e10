"""The index stage: one checked pass over every shard, giving one row per record.

Every record's framing and CRCs are verified and its protobuf parsed enough to
check the id, the labels and the feature sizes. Rows locate records by shard and
header byte offset (tfrecord.read_record_at) and carry id, sorted labels and
frame count; assign_subsets then splits the videos into train / eval / test by a
salted hash of the id alone.

For readers (reader.py), each row also says where the record's features are:
rgb_at / audio_at, the byte positions in the record's data where the rgb and the
audio bytes begin (video level: the mean_rgb / mean_audio floats; frame level:
the first frame's, the others following fastparse.FRAME_STRIDES apart), or -1
where the record is not in the usual layout (read it with protobuf); and
data_crc, the masked CRC-32C stored after the record, so a reader can tell
that the bytes it reads are the ones indexed.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf.message import DecodeError

from yt8m_qrnn.data.index_file import PARQUET_SCHEMA, SUBSETS, with_content_digest
from yt8m_qrnn.pipeline.dag import DATA_ROOT, INDEX, LABEL_STATS, MANIFEST
from yt8m_qrnn.pipeline.io import atomic_path, write_json
from yt8m_qrnn.pipeline.params import stage_params
from yt8m_qrnn.records import fastparse
from yt8m_qrnn.records.example_proto import Example, SequenceExample
from yt8m_qrnn.records.features import ID_KEYS, LEVELS, NUM_CLASSES, dequantize
from yt8m_qrnn.records.tfrecord import (
    HEADER_SIZE,
    CorruptRecordError,
    checked_layouts,
    iter_records,
    masked_crc,
    scan_buffer,
    stored_crcs,
    write_records,
)
from yt8m_qrnn.records.video import (
    BadRecordError,
    frame_fields,
    parse_video_record,
    record_parser,
)

# Shards are read, checked and parsed in batches of about this many bytes: enough records that
# the per-batch costs in Python hardly count, few enough that two workers stay busy to the end.
BATCH_BYTES = 12 << 20

__all__ = [
    "BadRecordError", "parse_video_record", "index_shards", "assign_subsets", "label_statistics",
    "run_index", "derive_video_level", "derive_video_shards", "dequantize",
]


# ---------------------------------------------------------------- indexing shards

def index_shards(
    shards: Iterable[tuple[Path, str, str, str]],
    version: int,
    on_bad_record: str = "fail",
    workers: int | None = None,
) -> tuple[pd.DataFrame, list[dict]]:
    """Index (path, relative name, level, split) shards: one row per good record, and the bad records.

    on_bad_record 'fail' raises a RecordError naming the file and offset; 'skip'
    lists {shard, offset, reason} for each bad record and indexes the rest.
    workers: threads, each reading, checking and parsing a batch of shards at a
    time (default: 2 with several cores, else 1).

    Shards are read in batches of about BATCH_BYTES. The framing and CRCs of a
    batch are checked in one pass (tfrecord.checked_layouts), and its records are
    parsed together by compiled code (fastparse). Records the fast path does not
    recognise are parsed one by one (parse_video_record), and a file whose
    framing or CRCs fail is rescanned record by record, which locates and
    explains every bad record exactly as a record-by-record index would.
    """
    if on_bad_record not in ("fail", "skip"):
        raise ValueError(f"on_bad_record must be 'fail' or 'skip', not {on_bad_record!r}")
    tasks = [(Path(path), name, level, split) for path, name, level, split in shards]
    for _, name, level, _ in tasks:
        if level not in LEVELS:
            raise ValueError(f"{name}: unknown level {level!r}; expected one of {LEVELS}")
    record_parser(version, "video")  # unknown version: fail before reading anything
    if workers is None:
        workers = 2 if _cpu_count() > 1 else 1
    with _gc_paused():
        results = _run_batches(_batches(tasks), version, on_bad_record == "skip", workers)
        bad = [entry for _, entries in results for entry in entries]
        return _rows_frame(tasks, _Rows.concat([rows for rows, _ in results])), bad


@contextlib.contextmanager
def _gc_paused():
    """Cyclic GC passes over the many small acyclic objects of a run only cost time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _batches(tasks: list[tuple]) -> list[list[tuple]]:
    """Consecutive shards of one level, about BATCH_BYTES together: [(task number, path, name, level, split, size)]."""
    batches, size = [], 0
    for number, (path, name, level, split) in enumerate(tasks):
        shard_size = os.path.getsize(path)
        if not batches or size + shard_size > BATCH_BYTES or batches[-1][-1][3] != level:
            batches.append([])
            size = 0
        batches[-1].append((number, path, name, level, split, shard_size))
        size += shard_size
    return batches


def _run_batches(batches: list[list[tuple]], version: int, skip: bool, workers: int) -> list:
    """(rows, bad records) of each batch, in order, computed on `workers` threads.

    Each thread takes whole batches: it reads one, checks its CRCs and parses it.
    The reads, crc32c and the compiled parser release the GIL; building the rows
    holds it.
    """
    largest = max((sum(shard[-1] for shard in batch) for batch in batches), default=0)
    buffers = _ThreadBuffers(largest + fastparse.PADDING)  # freed, with every thread's buffer, when the run ends

    def run(batch: list[tuple]) -> tuple[_Rows, list[dict]]:
        return _parse_batch(_read_batch(batch, buffers.get()), version, skip)

    workers = min(workers, len(batches))
    if workers <= 1:
        return [run(batch) for batch in batches]
    pool = ThreadPoolExecutor(workers, thread_name_prefix="index-worker")
    try:
        return list(pool.map(run, batches))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class _ThreadBuffers(threading.local):
    """A read buffer per thread, big enough for every batch of the run, reused by its batches: fresh memory
    costs a page fault per page touched."""

    def __init__(self, size: int):
        self.size = size
        self.array = None

    def get(self) -> np.ndarray:
        if self.array is None:
            self.array = np.empty(self.size, np.uint8)
        return self.array


@dataclass
class _Loaded:
    """A batch in memory: the files back to back in buf (spans: start, end), then fastparse.PADDING zero bytes;
    good[position]: the framing and CRCs of that file are good. offsets, lengths and file_of: the header offsets
    in buf, data lengths and file position in shards of the records of the good files."""

    shards: list[tuple]
    buf: np.ndarray
    spans: list[tuple[int, int]]
    good: list[bool]
    offsets: np.ndarray
    lengths: np.ndarray
    file_of: np.ndarray


def _read_batch(shards: list[tuple], buf: np.ndarray) -> _Loaded:
    """Read the batch's files into buf back to back (as long as they were when batched) and check their
    framing and CRCs."""
    spans, pos = [], 0
    for _, path, _, _, _, size in shards:
        end = pos + _read_into(path, buf[pos:pos + size])
        spans.append((pos, end))
        pos = end
    buf[pos:pos + fastparse.PADDING] = 0
    layouts = checked_layouts(buf, spans)
    good = [layout is not None for layout in layouts]
    present = [layout for layout in layouts if layout is not None]
    empty = np.zeros(0, np.int64)
    return _Loaded(shards, buf[:pos + fastparse.PADDING], spans, good,
                   np.concatenate([offsets for offsets, _ in present] or [empty]),
                   np.concatenate([lengths for _, lengths in present] or [empty]),
                   np.repeat(np.flatnonzero(good), [len(offsets) for offsets, _ in present]))


def _read_into(path: Path, out: np.ndarray) -> int:
    """Read the file into `out` (its size); the number of bytes read."""
    view, done = memoryview(out), 0
    fd = os.open(path, os.O_RDONLY)  # fewer system calls than open(), each releasing and retaking the GIL
    try:
        while done < len(out) and (count := os.readv(fd, [view[done:]])):
            done += count
    finally:
        os.close(fd)
    return done


def _parse_batch(batch: _Loaded, version: int, skip: bool) -> tuple[_Rows, list[dict]]:
    """Rows and bad records of a loaded batch: the fast path first, then one by one what it left."""
    level = batch.shards[0][3]
    parsed = _recognise(level, version, batch.buf, batch.offsets + HEADER_SIZE, batch.lengths)
    file_start = np.array([start for start, _ in batch.spans], np.int64)[batch.file_of]
    task = np.array([shard[0] for shard in batch.shards], np.int64)[batch.file_of]
    ok = parsed.ok
    data_start = batch.offsets + HEADER_SIZE
    crc = stored_crcs(batch.buf, data_start[ok] + batch.lengths[ok])
    parts = [_Rows.from_parsed(task[ok], (batch.offsets - file_start)[ok], batch.lengths[ok], parsed,
                               parsed.feature_starts - data_start[ok], crc)]
    parse, left, bad = record_parser(version, level), np.flatnonzero(~ok), []
    for position, (number, path, name, *_) in enumerate(batch.shards):
        if batch.good[position] and not len(left):
            continue
        rows, entries = _parse_each(_records_left(batch, position, left), parse, path, name, skip)
        parts.append(_Rows.from_tuples(number, rows))
        bad += entries
    if len(parts) == 1:
        return parts[0], bad
    rows = _Rows.concat(parts)
    return (rows if len(parts[0]) == len(rows) else rows.in_order()), bad


def _records_left(batch: _Loaded, position: int, left: np.ndarray):
    """(offset in the file, data[, problem]) of the records of one file that the fast path did not recognise."""
    start, end = batch.spans[position]
    if not batch.good[position]:  # broken framing or crc: the exact scan finds and explains each bad record
        return scan_buffer(batch.buf[start:end].tobytes())
    mine = left[batch.file_of[left] == position]
    data_start = batch.offsets[mine] + HEADER_SIZE
    return ((int(offset) - start, batch.buf[begin:begin + length])
            for offset, begin, length in zip(batch.offsets[mine], data_start, batch.lengths[mine]))


def _recognise(level: str, version: int, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    recognise = fastparse.video_records if level == "video" else fastparse.frame_records
    return recognise(buf, starts, lengths, ID_KEYS[version], NUM_CLASSES[version])


def _parse_each(records, parse, path: Path, name: str, skip: bool) -> tuple[list[tuple], list[dict]]:
    """Rows (offset, length, id, labels, frames, data crc) of (offset, data[, problem]) records; bad ones raise or
    are listed."""
    rows, bad = [], []
    for offset, data, *problem in records:
        problem = problem[0] if problem else None
        if problem is None:
            try:
                data = bytes(data)
                rows.append((offset, len(data), *parse(data), masked_crc(data)))
                continue
            except BadRecordError as err:
                if not skip:
                    raise err.at(path, offset) from None
                problem = err.reason
        elif not skip:
            raise CorruptRecordError(path, offset, problem)
        bad.append({"shard": name, "offset": offset, "reason": problem})
    return rows, bad


@dataclass
class _Rows:
    """Index rows as columns. task: the shard's position in the shard list; ids (UTF-8) and labels flat, with a
    size / count per row (the Python lists of labels are built once, for the whole index: they hold the GIL)."""

    task: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    id_bytes: np.ndarray
    id_sizes: np.ndarray
    label_counts: np.ndarray
    label_values: np.ndarray  # int32
    frames: np.ndarray
    feature_at: np.ndarray  # [2, n]: rgb_at, audio_at (-1: not the usual layout)
    crc: np.ndarray

    _ARRAYS = ("task", "offset", "length", "id_sizes", "label_counts", "frames", "crc")

    @classmethod
    def from_parsed(cls, task, offset, length, parsed: fastparse.Parsed, feature_at, crc) -> _Rows:
        return cls(task, offset, length, parsed.id_bytes, parsed.id_sizes, parsed.label_counts, parsed.label_values,
                   parsed.frames, feature_at, crc)

    @classmethod
    def from_tuples(cls, task: int, rows: list[tuple]) -> _Rows:
        """rows: (offset, length, id, sorted labels, frames, data crc), records not in the usual layout."""
        ids = [row[2].encode() for row in rows]
        return cls(np.full(len(rows), task, np.int64), np.array([row[0] for row in rows], np.int64),
                   np.array([row[1] for row in rows], np.int64), np.frombuffer(b"".join(ids), np.uint8),
                   np.array([len(i) for i in ids], np.int64), np.array([len(row[3]) for row in rows], np.int64),
                   np.array(list(chain.from_iterable(row[3] for row in rows)), np.int32),
                   np.array([row[4] for row in rows], np.int32), np.full((2, len(rows)), -1, np.int64),
                   np.array([row[5] for row in rows], np.int64))

    @classmethod
    def concat(cls, parts: list[_Rows]) -> _Rows:
        if not parts:
            return cls.from_tuples(0, [])
        arrays = {name: np.concatenate([getattr(part, name) for part in parts])
                  for name in (*cls._ARRAYS, "id_bytes", "label_values")}
        return cls(**arrays, feature_at=np.concatenate([part.feature_at for part in parts], axis=1))

    def __len__(self) -> int:
        return len(self.task)

    def in_order(self) -> _Rows:
        """The rows sorted by shard, then offset."""
        order = np.lexsort((self.offset, self.task))
        arrays = {name: getattr(self, name)[order] for name in self._ARRAYS}
        return _Rows(**arrays, id_bytes=_reorder_runs(self.id_bytes, self.id_sizes, order),
                     label_values=_reorder_runs(self.label_values, self.label_counts, order),
                     feature_at=self.feature_at[:, order])

    def ids(self) -> pa.Array:
        return pa.StringArray.from_buffers(len(self), pa.py_buffer(_run_offsets(self.id_sizes)),
                                           pa.py_buffer(self.id_bytes))

    def labels(self) -> list[list[int]]:
        """The labels of each row as a list (pyarrow builds them faster than Python slicing does)."""
        return pa.ListArray.from_arrays(pa.array(_run_offsets(self.label_counts)),
                                        pa.array(self.label_values, pa.int32())).to_pylist()


def _run_offsets(sizes: np.ndarray) -> np.ndarray:
    """int32 [0, s0, s0 + s1, ...]: where each run of a flat column starts, and the end."""
    offsets = np.zeros(len(sizes) + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    return offsets


def _reorder_runs(values: np.ndarray, sizes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """A flat column of runs (values, sizes per run) with its runs taken in `order`."""
    starts = np.cumsum(sizes) - sizes
    sizes = sizes[order]
    return values[np.repeat(starts[order] - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())]


_STR_DTYPE = pd.Series([], dtype=str).dtype


def _strings(values: pa.Array) -> pd.Series:
    """The Series pd.Series(<these strings>, dtype=str) gives, built without Python strings where pandas keeps them in Arrow."""
    if isinstance(_STR_DTYPE, pd.StringDtype) and _STR_DTYPE.storage == "pyarrow":
        return values.to_pandas(types_mapper={values.type: _STR_DTYPE}.get)
    return pd.Series(values.to_numpy(zero_copy_only=False), dtype=str)


def _rows_frame(tasks: list[tuple], rows: _Rows) -> pd.DataFrame:
    def per_task(position: int) -> pd.Series:
        return _strings(pa.array([t[position] for t in tasks], pa.string()).take(pa.array(rows.task)))

    return pd.DataFrame({  # the columns are new arrays, the frame's own: no copy needed
        "shard": per_task(1),
        "level": per_task(2),
        "split": per_task(3),
        "offset": rows.offset.astype(np.int64, copy=False),
        "length": rows.length.astype(np.int64, copy=False),
        "id": _strings(rows.ids()),
        "labels": pd.Series(rows.labels(), dtype=object),
        "num_frames": rows.frames.astype(np.int32, copy=False),
        "rgb_at": rows.feature_at[0].astype(np.int32),
        "audio_at": rows.feature_at[1].astype(np.int32),
        "data_crc": rows.crc.astype(np.int64, copy=False),
    }, copy=False)


# ---------------------------------------------------------------- subsets and statistics

def hash_bucket(salt: str, video_id: str) -> float:
    """Uniform in [0, 1), a function of (salt, id) only."""
    return int(hashlib.sha256((salt + video_id).encode()).hexdigest()[:16], 16) / 2**64


SPLIT_PROTOCOLS = ("starter", "hash")
VALIDATION_SALT_SUFFIX = ":validation"


def assign_subsets(df: pd.DataFrame, eval_splits: list[str], eval_fraction: float, salt: str,
                   protocol: str = "hash", validation_fraction: float = 0.0) -> pd.DataFrame:
    """A copy of df with column `subset`: train, valid, eval or test.

    'test': unlabelled videos of a split named 'test'. 'eval' by `protocol`:
    - "starter" (the starter code's): every video of eval_splits is held out, the train
      split is trained on (eval_fraction is not used);
    - "hash": the videos of eval_splits whose hash bucket is below eval_fraction; every
      other labelled video is trained on.
    'valid': validation_fraction of the training videos, by a second salted hash of the id
    (for choosing the epoch; never trained on). 'train': the rest.
    """
    if protocol not in SPLIT_PROTOCOLS:
        raise ValueError(f"index.protocol: {protocol!r} is not one of {', '.join(SPLIT_PROTOCOLS)}")
    ids = df["id"]
    unlabelled = np.array([len(labels) == 0 for labels in df["labels"]], dtype=bool)
    test = (df["split"].to_numpy() == "test") & unlabelled
    in_eval_splits = df["split"].isin(list(eval_splits)).to_numpy()
    if protocol == "hash":
        held_out = in_eval_splits & (_buckets(salt, ids) < eval_fraction)
    else:
        held_out = in_eval_splits
    validation = _buckets(salt + VALIDATION_SALT_SUFFIX, ids) < validation_fraction
    subset = np.where(test, "test", np.where(held_out, "eval", np.where(validation, "valid", "train")))
    out = df.copy()
    out["subset"] = pd.Series(subset, index=df.index, dtype=str)
    return out


def _buckets(salt: str, ids: Iterable[str]) -> np.ndarray:
    return np.array([hash_bucket(salt, video_id) for video_id in ids], dtype=np.float64)


def label_statistics(df: pd.DataFrame, num_classes: int) -> dict:
    """Per-subset counts of an index with subsets (assign_subsets).

    A video indexed at both levels counts once (labels are per video); frame
    statistics come from frame-level rows only.
    """
    stats = {"num_classes": num_classes, "rows": int(len(df)),
             "rows_per_level": {level: int((df["level"] == level).sum()) for level in LEVELS},
             "subsets": {}}
    for subset in SUBSETS:
        rows = df[df["subset"] == subset]
        videos = rows.drop_duplicates("id")
        label_counts = np.fromiter((len(labels) for labels in videos["labels"]), np.int64, len(videos))
        flat = np.fromiter(chain.from_iterable(videos["labels"]), np.int64, int(label_counts.sum()))
        positives = np.bincount(flat, minlength=num_classes)
        frames = rows.loc[rows["level"] == "frame", "num_frames"].to_numpy(np.int64)
        stats["subsets"][subset] = {
            "videos": int(len(videos)),
            "rows_per_level": {level: int((rows["level"] == level).sum()) for level in LEVELS},
            "labels": int(label_counts.sum()),
            "videos_without_labels": int((label_counts == 0).sum()),
            "mean_labels_per_video": float(label_counts.mean()) if len(videos) else 0.0,
            "classes_with_positives": int(np.count_nonzero(positives)),
            "positives_per_class": positives.tolist(),
            "frames": _frame_stats(frames),
        }
    return stats


def _frame_stats(frames: np.ndarray) -> dict:
    if not len(frames):
        return {"videos": 0, "total": 0, "min": None, "mean": None, "max": None}
    return {"videos": int(len(frames)), "total": int(frames.sum()), "min": int(frames.min()),
            "mean": float(frames.mean()), "max": int(frames.max())}


log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the stage

def run_index(data_root: Path, manifest: dict, index_params: dict, version: int,
              out_parquet: Path, stats_json: Path) -> pd.DataFrame:
    """Index the manifest's shards, assign subsets, write the parquet index and label statistics.

    Both outputs are written under temporary names and renamed; on any error
    neither final name is left behind (stale ones are removed too).
    """
    out_parquet, stats_json = Path(out_parquet), Path(stats_json)
    shards = [(Path(data_root) / f["name"], f["name"], f["level"], f["split"]) for f in manifest["files"]]
    try:
        df, bad = index_shards(shards, version, index_params["on_bad_record"])
        df = assign_subsets(df, index_params["eval_splits"], index_params["eval_fraction"], index_params["salt"],
                            index_params.get("protocol", "hash"), index_params.get("validation_fraction", 0.0))
        stats = label_statistics(df, NUM_CLASSES[version])
        stats["shards"] = len(shards)
        stats["protocol"] = index_params.get("protocol", "hash")
        stats["bad_records"] = {"count": len(bad), "records": bad}
        table = pa.Table.from_pandas(df, schema=PARQUET_SCHEMA, preserve_index=False)
        with atomic_path(out_parquet) as tmp:
            pq.write_table(with_content_digest(table), tmp)
        write_json(stats_json, stats)
    except BaseException:
        out_parquet.unlink(missing_ok=True)
        stats_json.unlink(missing_ok=True)
        raise
    return df


# ---------------------------------------------------------------- video level from frame level

def derive_video_level(frame_record: bytes, version: int) -> bytes:
    """A video-level tf.train.Example from a frame-level record: same id and labels,
    mean_rgb / mean_audio the float32 mean over frames of the dequantized features."""
    id_key = ID_KEYS[version]
    try:
        seq = SequenceExample.FromString(frame_record)
    except DecodeError as err:
        raise BadRecordError(f"not a tf.train.SequenceExample: {err}") from None
    _, _, rgb, audio = frame_fields(seq, id_key, NUM_CLASSES[version])
    example = Example()
    out = example.features.feature
    out[id_key].CopyFrom(seq.context.feature[id_key])
    if seq.context.feature["labels"].int64_list.value:
        out["labels"].CopyFrom(seq.context.feature["labels"])
    out["mean_rgb"].float_list.value.extend(_mean_dequantized(rgb).tolist())
    out["mean_audio"].float_list.value.extend(_mean_dequantized(audio).tolist())
    return example.SerializeToString()


def _mean_dequantized(frames: np.ndarray) -> np.ndarray:
    return dequantize(frames).mean(axis=0, dtype=np.float64).astype(np.float32)


def derive_video_shards(frame_shard_paths: Iterable[Path], out_dir: Path, version: int = 2) -> list[Path]:
    """Write out_dir/<same file name> holding derive_video_level of every record of each frame shard."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in map(Path, frame_shard_paths):
        records = [_derive_located(path, offset, data, version) for offset, data in iter_records(path)]
        write_records(out_dir / path.name, records)
        written.append(out_dir / path.name)
    return written


def _derive_located(path: Path, offset: int, data: bytes, version: int) -> bytes:
    try:
        return derive_video_level(data, version)
    except BadRecordError as err:
        raise err.at(path, offset) from None


# ---------------------------------------------------------------- the stage

def run(params: dict) -> None:
    import json

    p = stage_params(params, "index")
    manifest = json.loads(MANIFEST.read_text())
    table = run_index(DATA_ROOT, manifest, p["index"], p["data"]["version"], INDEX, LABEL_STATS)
    log.info("indexed %d records; subsets %s", len(table), table.groupby("subset").size().to_dict())
