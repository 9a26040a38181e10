"""The index's fast path: recognise the usual byte layout of YouTube-8M records, many at once.

Decoding a record with protobuf from Python costs microseconds; numpy instead
compares thousands of serialized records at once with the bytes that protobuf
writes for a well-formed record, and reads id, labels and frame count straight
from the buffer.

Contract: a recognised record yields exactly what index.parse_video_record
returns for it; every other record is left to that function, which reads it or
says what is wrong. So the recognisers accept only a strict subset of the valid
encodings: each feature a single packed list, short length fields in one byte,
no unknown or repeated features or fields (except the empty field 2 that ends
every real 2018 Example). The byte templates come from protobuf's own serializer.

A Features message (the Example's features, a SequenceExample's context) is a
sequence of map entries. Records of one batch nearly always list their entries
in one of a few orders (their "shape"). The records are grouped by the key of
their first entry; the shape of a group's first record is read in Python, then
the whole group is checked against it at once, 8-byte words at a time; the
records that do not fit form a group of their own for a later round, a few
rounds at most.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from tensorflow.core.example import feature_pb2

RGB_DIM, AUDIO_DIM = 1024, 128
ID, LABELS, RGB, AUDIO = range(4)  # the slot each map entry fills
PADDING = 32  # zero bytes that must follow the last record: reads reach at most 24 bytes past a record
_SHAPE_ROUNDS = 8  # shapes tried per batch; records fitting none go to the one-by-one parser
_MAX_ENTRIES = 6
_EXAMPLE_END = 0x0012  # bytes 12 00, the empty field 2 after the features of real 2018 Examples, as a uint16
_TAG1, _TAG2 = 0x0A, 0x12  # fields 1 and 2, length-delimited


@dataclass(frozen=True)
class Parsed:
    """What the recogniser read. ok[i]: record i was recognised; the other fields cover recognised records only."""

    ok: np.ndarray
    id_bytes: np.ndarray  # uint8, the ids back to back (ASCII)
    id_sizes: np.ndarray  # int64
    label_counts: np.ndarray  # int64
    label_values: np.ndarray  # int32, sorted within each record
    frames: np.ndarray  # int32
    # int64 [2, recognised]: where the rgb and the audio bytes begin (frame level: the first frame's)
    feature_starts: np.ndarray


# ---------------------------------------------------------------- entry templates

@dataclass(frozen=True)
class _Entry:
    """One accepted Features map entry: its header bytes (then the payload) are template + step * payload size."""

    slot: int
    template: bytes
    step: bytes  # 1 at each length byte that grows with the payload size; all 0 for a fixed size
    size_column: int | None  # header byte holding the payload size; None: fixed size
    fixed_size: int
    max_size: int  # largest size whose length bytes are all one-byte varints

    @property
    def header(self) -> int:
        return len(self.template)


class EntryTable:
    """The entries a recogniser accepts, by key, and the shapes (entry sequences) met so far."""

    def __init__(self, entries: dict[bytes, _Entry]):
        self.entries = entries
        self._shapes: dict[tuple[bytes, ...], _Shape] = {}

    def shape(self, keys: tuple[bytes, ...]) -> _Shape:
        if keys not in self._shapes:
            self._shapes[keys] = _Shape([self.entries[key] for key in keys])
        return self._shapes[keys]


class _Shape:
    """A sequence of entries, as tables for checking many records against it at once.

    Each header is compared as the words at offsets 0, 8, ... and header - 8 (_word_offsets).
    The words of variable-size entries come first: only they need the payload size added.
    """

    def __init__(self, entries: list[_Entry]):
        self.entries = entries
        self.slots = [entry.slot for entry in entries]
        variable = [k for k, entry in enumerate(entries) if entry.size_column is not None]
        self.size_row = {k: row for row, k in enumerate(variable)}  # entry -> its row of payload sizes
        words = sorted(((k, offset) for k, entry in enumerate(entries) for offset in _word_offsets(entry.header)),
                       key=lambda word: word[0] not in self.size_row)
        self.word_entry = np.array([k for k, _ in words], np.intp)
        self.word_offset = np.array([offset for _, offset in words], np.int64)[:, None]
        self.template = np.array([_word(entries[k].template, offset) for k, offset in words], np.int64)[:, None]
        stepped = [(k, offset) for k, offset in words if k in self.size_row]
        self.step = np.array([_word(entries[k].step, offset) for k, offset in stepped], np.int64)[:, None]
        self.step_size_row = np.array([self.size_row[k] for k, _ in stepped], np.intp)
        self.max_size = np.array([entries[k].max_size for k in variable], np.uint64)[:, None]
        self.payload = {entries[k].slot: (k, entries[k].header, row) for k, row in self.size_row.items()}
        self.fixed = {entry.slot: (k, entry.header) for k, entry in enumerate(entries) if entry.size_column is None}


def _word_offsets(size: int) -> list[int]:
    """Offsets of the 8-byte words that cover `size` bytes: the last one ends at `size` rather than pass it."""
    assert size >= 8, size
    return list(range(0, size - 8, 8)) + [size - 8]


def _word(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset:offset + 8], "little", signed=True)


def _entry_bytes(key: str, kind: str, count: int) -> tuple[bytes, int]:
    """A serialized Features map entry with `count` values; (bytes, payload size)."""
    features = feature_pb2.Features()
    feature = features.feature[key]
    if kind == "bytes":
        feature.bytes_list.value.append(b"x" * count)
        size = count
    elif kind == "int64":
        feature.int64_list.value.extend([1] * count)  # one varint byte each
        size = count
    else:
        feature.float_list.value.extend([0.0] * count)
        size = 4 * count
    return features.SerializeToString(), size


def _header(key: str, kind: str, count: int) -> np.ndarray:
    entry, size = _entry_bytes(key, kind, count)
    return np.frombuffer(entry[:len(entry) - size], np.uint8).astype(np.int64)


def _entry(key: str, kind: str, count: int | None, slot: int) -> _Entry:
    """count: values of a fixed-size entry; None: a variable one (payload up to max_size bytes)."""
    if count is not None:
        entry, size = _entry_bytes(key, kind, count)
        header = entry[:len(entry) - size]
        return _Entry(slot, header, bytes(len(header)), None, size, size)
    one, two = _header(key, kind, 1), _header(key, kind, 2)
    step = two - one  # the length bytes grow by one per payload byte
    assert len(one) == len(two) and set(step.tolist()) <= {0, 1} and step[-1] == 1, key
    base = one - step
    return _Entry(slot, bytes(base.tolist()), bytes(step.tolist()), len(one) - 1, 0,
                  int((0x7F - base)[step == 1].min()))


def video_table(id_key: str) -> EntryTable:
    return EntryTable(_keyed([_entry(id_key, "bytes", None, ID), _entry("labels", "int64", None, LABELS),
                              _entry("mean_rgb", "float", RGB_DIM, RGB),
                              _entry("mean_audio", "float", AUDIO_DIM, AUDIO)],
                             [id_key, "labels", "mean_rgb", "mean_audio"]))


def context_table(id_key: str) -> EntryTable:
    return EntryTable(_keyed([_entry(id_key, "bytes", None, ID), _entry("labels", "int64", None, LABELS)],
                             [id_key, "labels"]))


def _keyed(entries: list[_Entry], keys: list[str]) -> dict[bytes, _Entry]:
    return {key.encode(): entry for key, entry in zip(keys, entries)}


def _key_of(data: bytes, pos: int) -> bytes | None:
    """The key of the map entry at data[pos] (tag, entry length, tag, key length, key), or None."""
    if data[pos] != _TAG1:
        return None
    at = pos + 1
    while data[at] & 0x80 and at < pos + 4:
        at += 1
    key_length = data[at + 2]
    if data[at + 1] != _TAG1 or key_length >= 0x80:
        return None
    return data[at + 3:at + 3 + key_length]


def _shape_of(buf: np.ndarray, start: int, end: int, table: EntryTable) -> _Shape | None:
    """The entries of the one Features message at buf[start:end], if every one is in the table."""
    data = buf[start:end + PADDING].tobytes()  # bytes index faster than numpy, one by one
    keys, pos, end = [], 0, end - start
    while pos < end and len(keys) < _MAX_ENTRIES:
        key = _key_of(data, pos)
        entry = table.entries.get(key)
        if entry is None:
            return None
        keys.append(key)
        pos += entry.header + (entry.fixed_size if entry.size_column is None else data[pos + entry.size_column])
    return table.shape(tuple(keys)) if pos == end else None


# ---------------------------------------------------------------- many records at once

def _words(buf: np.ndarray) -> np.ndarray:
    """A view, only ever read, of the little-endian int64 at every byte offset: words[p] is buf[p:p + 8]."""
    return np.ndarray((len(buf) - 7,), "<i8", buf, 0, (1,))


def _varint(word: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, size in bytes, ok) of the varints in the low bytes of each word; ok means at most 3 bytes."""
    more0 = (word >> 7) & 1
    more1 = more0 & (word >> 15)
    value = (word & 0x7F) | ((word >> 1) & 0x3F80) * more0 | ((word >> 2) & 0x1FC000) * more1
    return value, 1 + more0 + more1, (more1 & (word >> 23)) == 0


def _message(words, start, end, tag):
    """(ok, start, end) of the length-delimited field with `tag` at start (length up to 3 varint bytes)."""
    head = words[start]
    length, size, ok = _varint(head >> 8)
    ok &= (head & 0xFF) == tag
    inner = start + 1 + size
    ok &= inner + length <= end
    return ok, inner, np.where(ok, inner + length, inner)


def _ranges(start: np.ndarray, size: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
    """Positions of the bytes of all the ranges [start, start + size) back to back; first: cumsum(size) - size."""
    if first is None:
        first = np.cumsum(size) - size
    positions = np.repeat(start - first, size)
    positions += np.arange(len(positions))
    return positions


def _owner(first: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The run holding each position of runs laid back to back from `first` (a run's last duplicate wins)."""
    return np.searchsorted(first, positions, "right") - 1


def _match_shape(buf, words, start, end, shape: _Shape):
    """(ok, entry positions [entries, n], payload sizes of the variable entries [variable entries, n]) of the
    Features at buf[start:end] against one shape: the entries must tile the span and every header match."""
    at = np.empty((len(shape.entries), len(start)), np.int64)
    sizes = np.empty((len(shape.size_row), len(start)), np.int64)
    cursor = start
    for k, entry in enumerate(shape.entries):  # each entry's place depends on the sizes before it
        np.minimum(cursor, end, out=at[k])  # where a record has gone wrong already, stay inside it
        cursor = at[k] + (entry.header + entry.fixed_size)
        if entry.size_column is not None:
            size = sizes[shape.size_row[k]]
            size[:] = buf[at[k] + entry.size_column]
            cursor += size
    found = words[at[shape.word_entry] + shape.word_offset]
    found[:len(shape.step)] -= shape.step * sizes[shape.step_size_row]
    ok = (cursor == end) & (found == shape.template).all(axis=0)
    ok &= ((sizes - 1).view(np.uint64) < shape.max_size).all(axis=0)  # 1 <= size <= max_size
    return ok, at, sizes


@dataclass
class _Fields:
    """Where the id, the labels and (video level) the mean features of each record are; ok: the record fits a
    shape (labels_size 0: no labels)."""

    ok: np.ndarray
    id_start: np.ndarray
    id_size: np.ndarray
    labels_start: np.ndarray
    labels_size: np.ndarray
    features_start: np.ndarray  # [2, n]: mean_rgb's and mean_audio's float bytes, video level

    @classmethod
    def empty(cls, count: int) -> _Fields:
        return cls(np.zeros(count, bool), *(np.zeros(count, np.int64) for _ in range(4)),
                   np.zeros((2, count), np.int64))

    def fill(self, rows: np.ndarray, shape: _Shape, at: np.ndarray, sizes: np.ndarray, matched: np.ndarray) -> None:
        """Record what _match_shape found about the records `rows`."""
        if not matched.all():
            rows, at, sizes = rows[matched], at[:, matched], sizes[:, matched]
        self.ok[rows] = True
        for slot, start, size in ((ID, self.id_start, self.id_size), (LABELS, self.labels_start, self.labels_size)):
            if slot in shape.payload:
                k, header, row = shape.payload[slot]
                start[rows] = at[k] + header
                size[rows] = sizes[row]
        for slot, start in ((RGB, self.features_start[0]), (AUDIO, self.features_start[1])):
            if slot in shape.fixed:
                k, header = shape.fixed[slot]
                start[rows] = at[k] + header


def _features(buf, words, start, end, candidates: np.ndarray, table: EntryTable, valid_shape) -> _Fields:
    """Recognise the Features messages at buf[start:end] of the candidate records.

    The candidates are grouped by the key of their first entry. Each round takes
    a group, largest first, and checks its records against the shape of its first
    record; those that do not fit go back in line as a group of their own.
    _SHAPE_ROUNDS rounds at most.
    """
    fields = _Fields.empty(len(start))
    line = deque(sorted(_key_groups(candidates, _first_key(words, start[candidates])), key=len, reverse=True))
    for _ in range(_SHAPE_ROUNDS):
        if not line:
            break
        pending = line.popleft()
        first = pending[0]
        shape = _shape_of(buf, int(start[first]), int(end[first]), table)
        if shape is None or not valid_shape(shape.slots):
            left = pending[1:]
        else:
            matched, at, sizes = _match_shape(buf, words, start[pending], end[pending], shape)
            fields.fill(pending, shape, at, sizes, matched)
            left = pending[~matched & (pending != first)]
        if len(left):
            line.append(left)
    return fields


def _key_groups(rows: np.ndarray, keys: np.ndarray) -> list[np.ndarray]:
    """rows split by key (_SHAPE_ROUNDS groups at most), each in the order given, groups by first appearance."""
    groups = []
    while len(rows) and len(groups) < _SHAPE_ROUNDS:
        alike = keys == keys[0]
        groups.append(rows[alike])
        rows, keys = rows[~alike], keys[~alike]
    return groups


def _first_key(words, start) -> np.ndarray:
    """A code for the key of the first map entry at each start (key length and first byte, entry length
    in 1 or 2 bytes); equal keys give equal codes."""
    head = words[start]
    long = (head >> 15) & 1
    return ((head >> (24 + 8 * long)) & 0xFFFF) | (long << 16)


def _video_shape(slots: list[int]) -> bool:
    return sorted(slots) in ([ID, RGB, AUDIO], [ID, LABELS, RGB, AUDIO])


def _context_shape(slots: list[int]) -> bool:
    return sorted(slots) in ([ID], [ID, LABELS])


def _labels(buf, start, size, num_classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed int64 labels (sizes > 0): (ok, values sorted within each record, counts); ok needs every
    varint inside its record, at most 2 bytes long (so not negative) and below num_classes."""
    first = np.cumsum(size) - size
    data = buf[_ranges(start, size, first)]
    last = first + size - 1
    more = data >= 0x80
    ok = ~more[last]  # the last varint must end inside the record
    more[last] = False  # and none may run on into the next record
    too_long = more[1:] & more[:-1]
    if too_long.any():
        ok[_owner(first, np.flatnonzero(too_long) + 1)] = False
    ends = np.flatnonzero(~more)  # the last byte of each varint
    values = data[ends].astype(np.int32)
    two_bytes = more[ends - 1]  # at ends[0] == 0 this reads the last byte, whose flag is off
    values = np.where(two_bytes, (values << 7) | (data[ends - 1] & 0x7F), values)
    counts = np.add.reduceat(~more, first, dtype=np.int64)
    value_first = np.cumsum(counts) - counts
    too_big = values >= num_classes
    if too_big.any():
        ok[_owner(value_first, np.flatnonzero(too_big))] = False
    if _unsorted(values, value_first):
        order = np.lexsort((values, np.repeat(np.arange(len(counts)), counts)))
        values = values[order]
    return ok, values, counts


def _unsorted(values: np.ndarray, value_first: np.ndarray) -> bool:
    """Whether some run of values laid back to back from value_first is not in ascending order."""
    if len(values) < 2:
        return False
    down = values[1:] < values[:-1]
    down[value_first[(value_first > 0) & (value_first < len(values))] - 1] = False  # from one run to the next
    return bool(down.any())


def _finish(fields: _Fields, buf, num_classes, frames, feature_starts) -> Parsed:
    """Decode the ids and labels of the records recognised so far; non-ASCII ids and bad labels are left out."""
    ok = fields.ok
    labelled = ok & (fields.labels_size > 0)
    labels_ok, values, counts = _labels(buf, fields.labels_start[labelled], fields.labels_size[labelled],
                                        num_classes)
    ok[labelled] = labels_ok
    id_size = fields.id_size[ok]
    id_bytes = buf[_ranges(fields.id_start[ok], id_size)]
    non_ascii = id_bytes >= 0x80
    if non_ascii.any():  # left to the one-by-one parser, which decodes UTF-8
        ascii_ok = np.ones(len(id_size), bool)
        ascii_ok[_owner(np.cumsum(id_size) - id_size, np.flatnonzero(non_ascii))] = False
        ok[np.flatnonzero(ok)[~ascii_ok]] = False
        id_bytes, id_size = id_bytes[np.repeat(ascii_ok, id_size)], id_size[ascii_ok]
    label_counts = np.zeros(len(ok), np.int64)
    label_counts[labelled] = counts
    kept = ok[labelled]
    if not kept.all():
        values = values[np.repeat(kept, counts)]
    return Parsed(ok, id_bytes, id_size, label_counts[ok], values, frames[ok].astype(np.int32),
                  feature_starts[:, ok])


# ---------------------------------------------------------------- video level

def video_records(buf: np.ndarray, start: np.ndarray, size: np.ndarray, table: EntryTable, num_classes: int) -> Parsed:
    """Recognise tf.train.Example records buf[start:start + size] (PADDING bytes must follow the last).

    table: video_table() of the dataset version's id key.
    """
    words = _words(buf)
    end = start + size
    ok, features_start, features_end = _message(words, start, end, _TAG1)
    ok &= (features_end == end) | ((features_end == end - 2) & ((words[end - 2] & 0xFFFF) == _EXAMPLE_END))
    fields = _features(buf, words, features_start, features_end, np.flatnonzero(ok), table, _video_shape)
    return _finish(fields, buf, num_classes, np.ones(len(start), np.int32), fields.features_start)


# ---------------------------------------------------------------- frame level

@dataclass(frozen=True)
class _FrameList:
    """A FeatureList of single `width`-byte frames: each frame is prefix + the bytes (stride bytes in all)."""

    key: bytes
    prefix: bytes
    stride: int

    @classmethod
    def of(cls, key: bytes, width: int) -> _FrameList:
        one = feature_pb2.FeatureList()
        one.feature.add().bytes_list.value.append(bytes(width))
        prefix = one.SerializeToString()[:-width]
        return cls(key, prefix, len(prefix) + width)


_LISTS = [_FrameList.of(b"rgb", RGB_DIM), _FrameList.of(b"audio", AUDIO_DIM)]
FRAME_STRIDES = tuple(frame_list.stride for frame_list in _LISTS)  # bytes from one rgb / audio frame to the next


def frame_records(buf: np.ndarray, start: np.ndarray, size: np.ndarray, table: EntryTable, num_classes: int) -> Parsed:
    """Recognise tf.train.SequenceExample records buf[start:start + size] (PADDING bytes must follow the last).

    table: context_table() of the dataset version's id key. Recognised: the
    context, then feature lists 'rgb' and 'audio' (either order, nothing else)
    of the same nonzero number of frames, each frame one byte string of 1024 or 128 bytes.
    """
    words = _words(buf)
    end = start + size
    ok, context_start, context_end = _message(words, start, end, _TAG1)
    lists_ok, lists_start, lists_end = _message(words, context_end, end, _TAG2)
    ok &= lists_ok & (lists_end == end)
    counts = np.zeros((2, len(start)), np.int64)
    feature_starts = np.zeros((2, len(start)), np.int64)
    cursor, every = lists_start, np.arange(len(start))
    for _ in range(2):
        entry_ok, cursor, name, count, first = _frame_list(buf, words, np.where(ok, cursor, start), end)
        ok &= entry_ok & (counts[name, every] == 0)
        counts[name, every] = np.where(ok, count, 0)
        feature_starts[name, every] = first
    ok &= (cursor == end) & (counts[0] > 0) & (counts[0] == counts[1])
    fields = _features(buf, words, context_start, context_end, np.flatnonzero(ok), table, _context_shape)
    return _finish(fields, buf, num_classes, counts[0], feature_starts)


def _frame_list(buf, words, pos, end):
    """One FeatureLists map entry at buf[pos]: (ok, position after it, 0 for rgb / 1 for audio, frames,
    position of the first frame's bytes)."""
    entry_ok, entry_start, entry_end = _message(words, pos, end, _TAG1)
    key_length = buf[entry_start + 1].astype(np.int64)
    ok = entry_ok & (buf[entry_start] == _TAG1)
    key = np.minimum(entry_start + 2, end)
    name = np.full(len(pos), -1)
    for index, frame_list in enumerate(_LISTS):
        same = ok & (key_length == len(frame_list.key))
        for i, byte in enumerate(frame_list.key):
            same &= buf[key + i] == byte
        name[same] = index
    ok &= name >= 0
    name = np.maximum(name, 0)
    list_ok, list_start, list_end = _message(words, np.where(ok, key + key_length, pos), end, _TAG2)
    ok &= list_ok & (list_end == entry_end)
    stride = np.array([frame_list.stride for frame_list in _LISTS])[name]
    count = (list_end - list_start) // stride
    ok &= count * stride == list_end - list_start
    for index, frame_list in enumerate(_LISTS):
        ok &= _frames_ok(words, list_start, np.where(ok & (name == index), count, 0), frame_list)
    prefix = np.array([len(frame_list.prefix) for frame_list in _LISTS])[name]
    return ok, np.where(ok, entry_end, end), name, count, list_start + prefix


def _frames_ok(words, start, count, frame_list: _FrameList) -> np.ndarray:
    """Per list: each of its `count` frames (frame_list.stride bytes apart from start) begins with the prefix."""
    first = np.cumsum(count) - count
    at = np.repeat(start - first * frame_list.stride, count) + np.arange(int(count.sum())) * frame_list.stride
    good = np.ones(len(at), bool)
    for offset in _word_offsets(len(frame_list.prefix)):
        good &= words[at + offset] == _word(frame_list.prefix, offset)
    ok = np.ones(len(start), bool)
    ok[_owner(first, np.flatnonzero(~good))] = False
    return ok
