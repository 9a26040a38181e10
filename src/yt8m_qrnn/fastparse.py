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
sequence of map entries. Records of one batch nearly always list the same
entries in the same order (their "shape"): the shape of one record is read in
Python, then all records are checked against it at once; the records that do not
fit get another round with the shape of the first of them, a few rounds at most.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tensorflow.core.example import feature_pb2

RGB_DIM, AUDIO_DIM = 1024, 128
ID, LABELS, RGB, AUDIO = range(4)  # the slot each map entry fills
_SLOTS = 4
_WIDTH = 24  # bytes compared per map entry header; the longest header (mean_audio) has 21
PADDING = _WIDTH + 8  # zero bytes that must follow the last record: reads never leave the buffer
_SHAPE_ROUNDS = 8  # shapes tried per batch; records fitting none go to the one-by-one parser
_MAX_ENTRIES = 6
_EXAMPLE_END = (0x12, 0x00)  # the empty field 2 after the features of real 2018 Examples
_TAG1, _TAG2 = 0x0A, 0x12  # fields 1 and 2, length-delimited
_U64 = np.uint64


@dataclass(frozen=True)
class Parsed:
    """What the recogniser read. ok[i]: record i was recognised; the other fields cover recognised records only."""

    ok: np.ndarray
    id_bytes: np.ndarray  # uint8, the ids back to back (ASCII)
    id_sizes: np.ndarray  # int64
    label_counts: np.ndarray  # int64
    label_values: np.ndarray  # int32, sorted within each record
    frames: np.ndarray  # int32

    @classmethod
    def none(cls, count: int) -> Parsed:
        """Leaves all `count` records to the one-by-one parser."""
        empty = np.zeros(0, np.int64)
        return cls(np.zeros(count, bool), np.zeros(0, np.uint8), empty, empty, np.zeros(0, np.int32),
                   np.zeros(0, np.int32))


# ---------------------------------------------------------------- entry templates

@dataclass(frozen=True)
class _Entry:
    """One accepted Features map entry: header bytes (then the payload) as base + coef * payload size."""

    slot: int
    base: np.ndarray  # [3] uint64: the header bytes, zero padded to _WIDTH
    coef: np.ndarray  # [3] uint64
    mask: np.ndarray  # [3] uint64: 0xFF over the header bytes
    header: int  # header size in bytes
    size_column: int | None  # header byte holding the payload size; None: fixed size
    fixed_size: int
    max_size: int  # largest size whose length bytes are all one-byte varints


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
    """A sequence of entries, stacked for checking all of them at once."""

    def __init__(self, entries: list[_Entry]):
        self.entries = entries
        self.slots = [entry.slot for entry in entries]
        self.base = np.stack([entry.base for entry in entries])[:, None, :]  # [entries, 1, 3]
        self.coef = np.stack([entry.coef for entry in entries])[:, None, :]
        self.mask = np.stack([entry.mask for entry in entries])[:, None, :]
        self.header = np.array([entry.header for entry in entries], np.int64)[:, None]
        self.min_size = np.array([1 if entry.size_column is not None else entry.fixed_size
                                  for entry in entries], np.int64)[:, None]
        self.max_size = np.array([entry.max_size for entry in entries], np.int64)[:, None]


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


def _words(row: np.ndarray) -> np.ndarray:
    out = np.zeros(_WIDTH, np.uint8)
    out[:len(row)] = row
    return out.view("<u8")


def _entry(key: str, kind: str, count: int | None, slot: int) -> _Entry:
    """count: values of a fixed-size entry; None: a variable one (payload up to max_size bytes)."""
    if count is not None:
        fixed = _header(key, kind, count)
        size = _entry_bytes(key, kind, count)[1]
        return _Entry(slot, _words(fixed), _words(np.zeros_like(fixed)), _words(np.full(len(fixed), 0xFF)),
                      len(fixed), None, size, size)
    one, two = _header(key, kind, 1), _header(key, kind, 2)
    step = two - one  # the length bytes grow by one per payload byte
    assert len(one) == len(two) and set(step.tolist()) <= {0, 1} and step[-1] == 1, key
    base = one - step
    return _Entry(slot, _words(base), _words(step), _words(np.full(len(one), 0xFF)), len(one), len(one) - 1, 0,
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


def _key_of(buf: np.ndarray, pos: int) -> bytes | None:
    """The key of the map entry at buf[pos] (tag, entry length, tag, key length, key), or None."""
    if buf[pos] != _TAG1:
        return None
    at = pos + 1
    while buf[at] & 0x80 and at < pos + 4:
        at += 1
    key_length = int(buf[at + 2])
    if buf[at + 1] != _TAG1 or key_length >= 0x80:
        return None
    return buf[at + 3:at + 3 + key_length].tobytes()


def _shape_of(buf: np.ndarray, start: int, end: int, table: EntryTable) -> _Shape | None:
    """The entries of the one Features message at buf[start:end], if every one is in the table."""
    keys, pos = [], start
    while pos < end and len(keys) < _MAX_ENTRIES:
        key = _key_of(buf, pos)
        entry = table.entries.get(key)
        if entry is None:
            return None
        keys.append(key)
        pos += entry.header + (entry.fixed_size if entry.size_column is None else int(buf[pos + entry.size_column]))
    return table.shape(tuple(keys)) if pos == end else None


# ---------------------------------------------------------------- many records at once

def _windows(buf: np.ndarray) -> np.ndarray:
    """[len - _WIDTH + 1, _WIDTH] view, only ever read: row p is buf[p:p + _WIDTH]."""
    return np.ndarray((len(buf) - _WIDTH + 1, _WIDTH), np.uint8, buf, 0, (1, 1))


def _varint(buf: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, size in bytes, ok) of the varints at buf[pos]; ok means at most 3 bytes."""
    b0, b1, b2 = (buf[pos + i].astype(np.int64) for i in range(3))
    more0 = b0 >> 7
    more1 = more0 & (b1 >> 7)
    value = (b0 & 0x7F) | (((b1 & 0x7F) << 7) * more0) | (((b2 & 0x7F) << 14) * more1)
    return value, 1 + more0 + more1, (more1 & (b2 >> 7)) == 0


def _match_shape(buf, start, end, shape: _Shape):
    """(ok, entry positions [entries, n], payload sizes [entries, n]) of the Features at buf[start:end]
    against one shape: the entries must tile the span and every header match its template."""
    at = np.empty((len(shape.entries), len(start)), np.int64)
    size = np.empty_like(at)
    cursor = start
    for k, entry in enumerate(shape.entries):  # each entry's place depends on the sizes before it
        at[k] = np.minimum(cursor, end)  # where a record has gone wrong already, stay inside it
        size[k] = entry.fixed_size if entry.size_column is None else buf[at[k] + entry.size_column]
        cursor = cursor + entry.header + size[k]
    headers = _windows(buf)[at.ravel()].view("<u8").reshape(len(shape.entries), len(start), 3)
    expected = shape.base + shape.coef * size.astype(_U64)[:, :, None]
    ok = (cursor == end) & (((headers ^ expected) & shape.mask) == 0).all(axis=(0, 2))
    ok &= ((size >= shape.min_size) & (size <= shape.max_size)).all(axis=0)
    return ok, at + shape.header, size


def _features(buf, start, end, table: EntryTable, valid_shape):
    """Recognise the Features messages at buf[start:end]: (ok, payload start [slots, n], payload size, filled slots).

    Each round takes the shape of the first record still pending and checks it
    against the pending records whose first entry has the same key.
    """
    n = len(start)
    ok = np.zeros(n, bool)
    payload_start = np.zeros((_SLOTS, n), np.int64)
    payload_size = np.zeros((_SLOTS, n), np.int64)
    filled = np.zeros((_SLOTS, n), bool)
    first_key = _first_key(buf, start)
    pending = np.arange(n)
    for _ in range(_SHAPE_ROUNDS):
        if not len(pending):
            break
        first = pending[0]
        shape = _shape_of(buf, int(start[first]), int(end[first]), table)
        if shape is None or not valid_shape(shape.slots):
            pending = pending[1:]
            continue
        alike = first_key[pending] == first_key[first]
        group = pending[alike]
        matched, starts, sizes = _match_shape(buf, start[group], end[group], shape)
        found = group[matched]
        ok[found] = True
        payload_start[shape.slots, found[:, None]] = starts[:, matched].T
        payload_size[shape.slots, found[:, None]] = sizes[:, matched].T
        filled[shape.slots, found[:, None]] = True
        pending = np.concatenate([pending[~alike], group[~matched & (group != first)]])
        pending.sort()
    return ok, payload_start, payload_size, filled


def _first_key(buf, start) -> np.ndarray:
    """A code for the key of the first map entry at each start (key length and first byte, entry length
    in 1 or 2 bytes); equal keys give equal codes."""
    short = buf[start + 1] < 0x80
    at = start + 3 + ~short  # the key length byte
    return (buf[at].astype(np.int64) << 8 | buf[at + 1]) | (~short << 16)


def _video_shape(slots: list[int]) -> bool:
    return sorted(slots) in ([ID, RGB, AUDIO], [ID, LABELS, RGB, AUDIO])


def _context_shape(slots: list[int]) -> bool:
    return sorted(slots) in ([ID], [ID, LABELS])


def _gather(buf: np.ndarray, start: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bytes of all the ranges buf[start:start + size] back to back, index of the range of each byte)."""
    owner = np.repeat(np.arange(len(start)), size)
    first = np.cumsum(size) - size
    return buf[start[owner] + np.arange(len(owner)) - first[owner]], owner


def _labels(buf, start, size, num_classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed int64 labels (sizes > 0): (ok, values sorted within each record, counts); ok needs every
    varint inside its record, at most 2 bytes long (so not negative) and below num_classes."""
    n = len(start)
    data, owner = _gather(buf, start, size)
    data = data.astype(np.int32)
    more = data >= 0x80
    first = np.zeros(len(data), bool)
    first[np.cumsum(size) - size] = True
    ok = np.ones(n, bool)
    last_byte = np.cumsum(size) - 1
    ok[more[last_byte]] = False  # the last varint runs on
    ok[owner[np.flatnonzero(more[:-1] & more[1:] & ~first[1:])]] = False  # 3 bytes or more
    follows = np.zeros(len(data), bool)
    follows[1:] = more[:-1] & ~first[1:]
    low = np.zeros(len(data), np.int32)
    low[1:] = data[:-1] & 0x7F
    ends = ~more
    values = np.where(follows, (data << 7) | low, data)[ends]
    owners = owner[ends]
    ok[owners[values >= num_classes]] = False
    if len(values) > 1 and (np.diff(values) < 0)[owners[1:] == owners[:-1]].any():
        order = np.lexsort((values, owners))
        values, owners = values[order], owners[order]
    return ok, values, np.bincount(owners, minlength=n)


def _finish(ok, filled, payload_start, payload_size, buf, num_classes, frames) -> Parsed:
    """Decode the ids and labels of the records recognised so far; non-ASCII ids and bad labels are left out."""
    labelled = ok & filled[LABELS]
    labels_ok, values, counts = _labels(buf, payload_start[LABELS, labelled], payload_size[LABELS, labelled],
                                        num_classes)
    ok[np.flatnonzero(labelled)[~labels_ok]] = False
    id_bytes, owner = _gather(buf, payload_start[ID, ok], payload_size[ID, ok])
    ascii_ok = np.ones(int(ok.sum()), bool)
    ascii_ok[owner[id_bytes >= 0x80]] = False
    ok[np.flatnonzero(ok)[~ascii_ok]] = False
    label_counts = np.zeros(len(ok), np.int64)
    label_counts[labelled] = counts
    return Parsed(ok, id_bytes[ascii_ok[owner]], payload_size[ID, ok], label_counts[ok],
                  values[np.repeat(ok[labelled], counts)], frames[ok].astype(np.int32))


def _message(buf, start, end, tag):
    """(ok, start, end) of the length-delimited field with `tag` at buf[start] (length up to 3 varint bytes)."""
    length, size, ok = _varint(buf, start + 1)
    ok &= buf[start] == tag
    inner = start + 1 + size
    ok &= inner + length <= end
    return ok, inner, np.where(ok, inner + length, inner)


# ---------------------------------------------------------------- video level

def video_records(buf: np.ndarray, start: np.ndarray, size: np.ndarray, table: EntryTable, num_classes: int) -> Parsed:
    """Recognise tf.train.Example records buf[start:start + size] (PADDING bytes must follow the last).

    table: video_table() of the dataset version's id key.
    """
    end = start + size
    ok, features_start, features_end = _message(buf, start, end, _TAG1)
    ok &= (features_end == end) | ((features_end == end - 2) & (buf[end - 2] == _EXAMPLE_END[0])
                                   & (buf[end - 1] == _EXAMPLE_END[1]))
    found, payload_start, payload_size, filled = _features(buf, features_start[ok], features_end[ok], table,
                                                           _video_shape)
    return _finish(*_widen(ok, found, payload_start, payload_size, filled), buf, num_classes,
                   np.ones(len(start), np.int32))


def _widen(ok, found, payload_start, payload_size, filled):
    """Results about the records where ok, spread back over all records."""
    rows = np.flatnonzero(ok)
    ok = np.zeros(len(ok), bool)
    ok[rows[found]] = True
    out_start, out_size = np.zeros((_SLOTS, len(ok)), np.int64), np.zeros((_SLOTS, len(ok)), np.int64)
    out_filled = np.zeros((_SLOTS, len(ok)), bool)
    out_start[:, rows], out_size[:, rows], out_filled[:, rows] = payload_start, payload_size, filled
    return ok, out_filled, out_start, out_size


# ---------------------------------------------------------------- frame level

def _frame_prefix(width: int) -> np.ndarray:
    """The bytes before each frame in a serialized FeatureList of single `width`-byte frames."""
    one = feature_pb2.FeatureList()
    one.feature.add().bytes_list.value.append(bytes(width))
    return np.frombuffer(one.SerializeToString()[:-width], np.uint8)


_LISTS = {b"rgb": _frame_prefix(RGB_DIM), b"audio": _frame_prefix(AUDIO_DIM)}


def frame_records(buf: np.ndarray, start: np.ndarray, size: np.ndarray, table: EntryTable, num_classes: int) -> Parsed:
    """Recognise tf.train.SequenceExample records buf[start:start + size] (PADDING bytes must follow the last).

    table: context_table() of the dataset version's id key. Recognised: the
    context, then feature lists 'rgb' and 'audio' (either order, nothing else)
    of the same nonzero number of frames, each frame one byte string of 1024 or 128 bytes.
    """
    end = start + size
    ok, context_start, context_end = _message(buf, start, end, _TAG1)
    lists_ok, lists_start, lists_end = _message(buf, context_end, end, _TAG2)
    ok &= lists_ok & (lists_end == end)
    counts = np.zeros((2, len(start)), np.int64)
    cursor = lists_start
    for _ in range(2):
        entry_ok, cursor, name, count = _frame_list(buf, np.where(ok, cursor, start), end)
        ok &= entry_ok & (counts[name, np.arange(len(start))] == 0)
        counts[name, np.arange(len(start))] = np.where(ok, count, 0)
    ok &= (cursor == end) & (counts[0] > 0) & (counts[0] == counts[1])
    found, payload_start, payload_size, filled = _features(buf, context_start[ok], context_end[ok], table,
                                                           _context_shape)
    return _finish(*_widen(ok, found, payload_start, payload_size, filled), buf, num_classes, counts[0])


def _frame_list(buf, pos, end):
    """One FeatureLists map entry at buf[pos]: (ok, position after it, 0 for rgb / 1 for audio, frames)."""
    entry_ok, entry_start, entry_end = _message(buf, pos, end, _TAG1)
    key_length = buf[entry_start + 1].astype(np.int64)
    ok = entry_ok & (buf[entry_start] == _TAG1)
    key = np.minimum(entry_start + 2, end)
    name = np.full(len(pos), -1)
    for index, (key_bytes, prefix) in enumerate(_LISTS.items()):
        same = ok & (key_length == len(key_bytes))
        for i, byte in enumerate(key_bytes):
            same &= buf[key + i] == byte
        name[same] = index
    ok &= name >= 0
    name = np.maximum(name, 0)
    list_ok, list_start, list_end = _message(buf, np.where(ok, key + key_length, pos), end, _TAG2)
    ok &= list_ok & (list_end == entry_end)
    stride = np.array([len(prefix) + width for prefix, width in zip(_LISTS.values(), (RGB_DIM, AUDIO_DIM))])[name]
    count = (list_end - list_start) // stride
    ok &= count * stride == list_end - list_start
    for index, prefix in enumerate(_LISTS.values()):
        ok &= _frames_ok(buf, list_start, np.where(ok & (name == index), count, 0), stride, prefix)
    return ok, np.where(ok, entry_end, end), name, count


def _frames_ok(buf, start, count, stride, prefix) -> np.ndarray:
    """Per list: every one of its `count` frames (stride bytes apart from start) begins with prefix."""
    owner = np.repeat(np.arange(len(start)), count)
    first = np.cumsum(count) - count
    at = start[owner] + (np.arange(len(owner)) - first[owner]) * stride[owner]
    good = (_windows(buf)[at, :len(prefix)] == prefix).all(axis=1)
    ok = np.ones(len(start), bool)
    ok[owner[~good]] = False
    return ok
