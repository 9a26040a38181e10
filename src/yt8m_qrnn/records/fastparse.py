"""The index's fast path: a compiled walk over the protobuf wire format of YouTube-8M records.

Decoding a record with protobuf from Python costs microseconds; the kernels
here walk the serialized bytes of a whole batch of records in compiled code
(numba, without the GIL, so two index workers run them at once) and read id,
labels, frame count and where the features start straight from the buffer.

Contract: a recognised record yields exactly what index.parse_video_record
returns for it; every other record is left to that function, which reads it or
says what is wrong. So the walk accepts only a strict subset of the valid
encodings: each wanted feature once, as a single packed list (ids: one ASCII
byte string), no unknown features or fields (except the empty field 2 that ends
every real 2018 Example), frames each exactly one byte string of 1024 (rgb) or
128 (audio) bytes. Map entries may come in any order: protobuf's serializer
writes them in a different order from one record to the next.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np

from yt8m_qrnn.records.example_proto import Feature, FeatureList
from yt8m_qrnn.records.features import AUDIO_DIM, RGB_DIM

PADDING = 32  # zero bytes that must follow the last record: the walk reads up to 16 bytes past a field
_TAG1, _TAG2, _TAG3 = 0x0A, 0x12, 0x1A  # fields 1, 2 and 3, length-delimited
_ID, _LABELS, _RGB, _AUDIO = range(4)  # positions of the keys in the key tables below
_JIT = dict(nogil=True, cache=True)


@dataclass(frozen=True)
class Parsed:
    """What the walk read. ok[i]: record i was recognised; the other fields cover recognised records only."""

    ok: np.ndarray
    id_bytes: np.ndarray  # uint8, the ids back to back (ASCII)
    id_sizes: np.ndarray  # int64
    label_counts: np.ndarray  # int64
    label_values: np.ndarray  # int32, sorted within each record
    frames: np.ndarray  # int32
    # int64 [2, recognised]: where the rgb and the audio bytes begin (frame level: the first frame's)
    feature_starts: np.ndarray


class _Keys:
    """Map keys as the kernels compare them: length and the first 16 bytes as two little-endian words."""

    def __init__(self, *keys: str):
        raw = [key.encode() for key in keys]
        assert all(len(key) <= 16 for key in raw), keys
        self.length = np.array([len(key) for key in raw], np.int64)
        self.low = np.array([int.from_bytes(key[:8], "little") for key in raw], np.uint64)
        self.high = np.array([int.from_bytes(key[8:16], "little") for key in raw], np.uint64)


def _frame_prefix(width: int) -> bytes:
    """The bytes before each frame's own in a serialized FeatureList of single `width`-byte frames."""
    one = FeatureList()
    one.feature.add().bytes_list.value.append(bytes(width))
    return one.SerializeToString()[:-width]


_PREFIXES = [_frame_prefix(RGB_DIM), _frame_prefix(AUDIO_DIM)]
FRAME_STRIDES = tuple(len(prefix) + width for prefix, width in zip(_PREFIXES, (RGB_DIM, AUDIO_DIM)))
_PREFIX_SIZE = len(_PREFIXES[0])
assert len(_PREFIXES[1]) == _PREFIX_SIZE and _PREFIX_SIZE > 8
_STRIDES = np.array(FRAME_STRIDES, np.int64)
_PREFIX_WORDS = np.array([[int.from_bytes(p[:8], "little"), int.from_bytes(p[_PREFIX_SIZE - 8:], "little")]
                          for p in _PREFIXES], np.uint64)
_keys = functools.cache(_Keys)
_LIST_KEYS = _Keys("rgb", "audio")


def _float_feature_header(count: int) -> bytes:
    """The bytes before the floats in a serialized Feature holding a packed list of `count` floats."""
    feature = Feature()
    feature.float_list.value.extend([0.0] * count)
    return feature.SerializeToString()[:-4 * count]


_FLOAT_HEADERS = [_float_feature_header(count) for count in (RGB_DIM, AUDIO_DIM)]
_FLOAT_HEADER_SIZE = len(_FLOAT_HEADERS[0])
assert len(_FLOAT_HEADERS[1]) == _FLOAT_HEADER_SIZE <= 8
# Each float Feature as the kernel checks it: its header as a little-endian word, and its size
_FLOAT_WORDS = np.array([int.from_bytes(header, "little") for header in _FLOAT_HEADERS], np.uint64)
_FLOAT_SIZES = np.array([_FLOAT_HEADER_SIZE + 4 * count for count in (RGB_DIM, AUDIO_DIM)], np.int64)


# ---------------------------------------------------------------- wire format

@numba.njit(**_JIT)
def _varint(buf, pos, end):
    """(value, position after it) of the varint at pos, or (-1, -1) past end or above 2**63."""
    value, shift = np.uint64(0), np.uint64(0)
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= np.uint64(byte & 0x7F) << shift
        if byte < 0x80:
            return (np.int64(value), pos) if value < np.uint64(1 << 63) else (-1, -1)
        shift += np.uint64(7)
    return -1, -1


@numba.njit(**_JIT)
def _field(buf, pos, end, tag):
    """(start, end) of the payload of the length-delimited field `tag` at pos inside [pos, end), or (-1, -1)."""
    if pos >= end or buf[pos] != tag:
        return -1, -1
    first, second = np.int64(buf[pos + 1]), np.int64(buf[pos + 2])
    long = first >> 7  # the common 1- and 2-byte lengths without a branch: map entries come in any order
    if long & (second >> 7):
        size, start = _varint(buf, pos + 1, end)
    else:
        size, start = (first & 0x7F) | ((second << 7) * long), pos + 2 + long
    if start < 0 or size > end - start:
        return -1, -1
    return start, start + size


@numba.njit(**_JIT)
def _only_field(buf, start, end, tag):
    """The payload of the one field `tag` that fills [start, end) exactly, or (-1, -1)."""
    inner, inner_end = _field(buf, start, end, tag)
    return (inner, inner_end) if inner_end == end else (-1, -1)


@numba.njit(**_JIT)
def _word(buf, pos, size):
    """The `size` (<= 8) bytes at pos as a little-endian integer.

    tfrecord has the same helper: numba's cache does not notice a change to a compiled
    function in another file, so each module compiles its own."""
    word = np.uint64(0)
    for i in range(size):
        word |= np.uint64(buf[pos + i]) << np.uint64(8 * i)
    return word


@numba.njit(**_JIT)
def _low_bytes(count):
    """A mask of the low `count` bytes of a word (none for count <= 0, all for count >= 8)."""
    bits = np.uint64(8 * min(max(count, 0), 7))
    return (np.uint64(1) << bits) - np.uint64(1) if count < 8 else np.uint64(0xFFFFFFFFFFFFFFFF)


@numba.njit(**_JIT)
def _map_values(buf, pos, end, key_length, key_low, key_high, value_start, value_end):
    """Walk the string-keyed map entries filling [pos, end): each key must be one of the table's, once.

    Fills value_start/value_end at each key's position; returns a bit mask of the
    keys found, or -1.
    """
    found = 0
    while pos < end:
        entry, entry_end = _field(buf, pos, end, _TAG1)
        key, key_end = _field(buf, entry, entry_end, _TAG1)
        if key < 0:
            return -1
        size = key_end - key
        low = _word(buf, key, 8) & _low_bytes(size)  # whole words and masks: no branch on the key's length
        high = _word(buf, key + 8, 8) & _low_bytes(size - 8)
        which = -1
        for k in range(len(key_length)):
            which = k if key_length[k] == size and key_low[k] == low and key_high[k] == high else which
        if which < 0 or (found >> which) & 1:
            return -1
        found |= 1 << which
        value_start[which], value_end[which] = _only_field(buf, key_end, entry_end, _TAG2)
        if value_start[which] < 0:
            return -1
        pos = entry_end
    return found


@numba.njit(**_JIT)
def _id_and_labels(buf, value_start, value_end, found, r, id_start, id_size, labels_start, labels_size):
    """Record r's id (one non-empty ASCII byte string) and packed labels span; False if not in that form."""
    if not found & (1 << _ID):
        return False
    values, values_end = _only_field(buf, value_start[_ID], value_end[_ID], _TAG1)  # Feature.bytes_list
    start, end = _only_field(buf, values, values_end, _TAG1)  # its one value
    if start < 0 or start == end:
        return False
    for i in range(start, end):
        if buf[i] >= 0x80:  # the one-by-one parser decodes UTF-8
            return False
    id_start[r], id_size[r] = start, end - start
    labels_start[r], labels_size[r] = 0, 0
    if found & (1 << _LABELS):
        values, values_end = _only_field(buf, value_start[_LABELS], value_end[_LABELS], _TAG3)  # int64_list
        if values < 0:
            return False
        if values < values_end:  # else no labels
            start, end = _only_field(buf, values, values_end, _TAG1)  # packed
            if start < 0:
                return False
            labels_start[r], labels_size[r] = start, end - start
    return True


# ---------------------------------------------------------------- video level

@numba.njit(**_JIT)
def _walk_examples(buf, starts, sizes, key_length, key_low, key_high, float_headers, float_sizes,
                   ok, id_start, id_size, labels_start, labels_size, feature_starts):
    value_start, value_end = np.empty(4, np.int64), np.empty(4, np.int64)
    for r in range(len(starts)):
        ok[r] = False
        end = starts[r] + sizes[r]
        features, features_end = _field(buf, starts[r], end, _TAG1)
        if features < 0 or not (features_end == end or (
                features_end == end - 2 and buf[end - 2] == _TAG2 and buf[end - 1] == 0)):
            continue
        found = _map_values(buf, features, features_end, key_length, key_low, key_high, value_start, value_end)
        if found != 0b1111 and found != 0b1101:
            continue
        if not _id_and_labels(buf, value_start, value_end, found, r, id_start, id_size, labels_start, labels_size):
            continue
        good = True
        for k in range(2):  # each Feature must be exactly its float_list's header and the packed floats
            start, end = value_start[_RGB + k], value_end[_RGB + k]
            good = good and end - start == float_sizes[k] and _word(buf, start, _FLOAT_HEADER_SIZE) == float_headers[k]
            feature_starts[k, r] = start + _FLOAT_HEADER_SIZE
        ok[r] = good


# ---------------------------------------------------------------- frame level

@numba.njit(**_JIT)
def _walk_sequence_examples(buf, starts, sizes, key_length, key_low, key_high, list_length, list_low, list_high,
                            prefix_words, strides, ok, id_start, id_size, labels_start, labels_size,
                            feature_starts, frames):
    value_start, value_end = np.empty(4, np.int64), np.empty(4, np.int64)
    list_start, list_end = np.empty(2, np.int64), np.empty(2, np.int64)
    for r in range(len(starts)):
        ok[r] = False
        end = starts[r] + sizes[r]
        context, context_end = _field(buf, starts[r], end, _TAG1)
        lists, lists_end = _only_field(buf, context_end, end, _TAG2) if context >= 0 else (-1, -1)
        if lists < 0:
            continue
        found = _map_values(buf, context, context_end, key_length, key_low, key_high, value_start, value_end)
        if (found != 0b11 and found != 0b01) or not _id_and_labels(
                buf, value_start, value_end, found, r, id_start, id_size, labels_start, labels_size):
            continue
        if _map_values(buf, lists, lists_end, list_length, list_low, list_high, list_start, list_end) != 0b11:
            continue
        count = (list_end[0] - list_start[0]) // strides[0]
        good = count > 0
        for k in range(2):
            good = good and list_end[k] - list_start[k] == count * strides[k]
            for pos in range(list_start[k], list_end[k] if good else list_start[k], strides[k]):
                if (_word(buf, pos, 8) != prefix_words[k, 0]
                        or _word(buf, pos + _PREFIX_SIZE - 8, 8) != prefix_words[k, 1]):
                    good = False
                    break
            feature_starts[k, r] = list_start[k] + _PREFIX_SIZE
        frames[r] = count
        ok[r] = good


# ---------------------------------------------------------------- labels and ids

@numba.njit(**_JIT)
def _decode_labels(buf, ok, labels_start, labels_size, num_classes, values, counts):
    """Decode the packed labels of the ok records, sorted per record, into values; a record with a label outside
    [0, num_classes) or a varint running past its span is no longer ok. Returns the number of values."""
    count = 0
    for r in range(len(ok)):
        counts[r] = 0
        if not ok[r]:
            continue
        pos, end, first = labels_start[r], labels_start[r] + labels_size[r], count
        while pos < end:
            value, pos = _varint(buf, pos, end)
            if pos < 0 or value >= num_classes:  # negative labels are 10-byte varints above 2**63: -1 here
                ok[r] = False
                break
            i = count  # insertion sort: a few labels per record
            while i > first and values[i - 1] > value:
                values[i] = values[i - 1]
                i -= 1
            values[i] = value
            count += 1
        if ok[r]:
            counts[r] = count - first
        else:
            count = first
    return count


@numba.njit(**_JIT)
def _gather(buf, ok, starts, sizes, out):
    """The bytes of the spans of the ok records back to back in out; returns how many."""
    count = 0
    for r in range(len(ok)):
        if ok[r]:
            out[count:count + sizes[r]] = buf[starts[r]:starts[r] + sizes[r]]
            count += sizes[r]
    return count


@numba.njit(**_JIT)
def _finish(buf, ok, id_start, id_size, labels_start, labels_size, num_classes, frames, feature_starts):
    """Parsed's fields from what a walk found: labels decoded (and checked), ids gathered, recognised rows kept."""
    values = np.empty(labels_size.sum(), np.int32)  # a label takes a byte at least
    counts = np.empty(len(ok), np.int64)
    values = values[:_decode_labels(buf, ok, labels_start, labels_size, num_classes, values, counts)]
    id_bytes = np.empty(id_size[ok].sum(), np.uint8)
    _gather(buf, ok, id_start, id_size, id_bytes)
    return (ok, id_bytes, id_size[ok], counts[ok], values, frames[ok].astype(np.int32),
            np.ascontiguousarray(feature_starts[:, ok]))


@numba.njit(**_JIT)
def _spans(count):
    """What a walk fills per record: recognised, then where the id and the packed labels start and their sizes."""
    return (np.zeros(count, np.bool_), np.zeros(count, np.int64), np.zeros(count, np.int64),
            np.zeros(count, np.int64), np.zeros(count, np.int64))


def _contiguous(buf: np.ndarray, start: np.ndarray, size: np.ndarray):
    return (np.ascontiguousarray(buf, np.uint8), np.ascontiguousarray(start, np.int64),
            np.ascontiguousarray(size, np.int64))


@numba.njit(**_JIT)
def _examples(buf, start, size, key_length, key_low, key_high, float_headers, float_sizes, num_classes):
    spans, feature_starts = _spans(len(start)), np.zeros((2, len(start)), np.int64)
    _walk_examples(buf, start, size, key_length, key_low, key_high, float_headers, float_sizes, *spans,
                   feature_starts)
    return _finish(buf, *spans, num_classes, np.ones(len(start), np.int64), feature_starts)


def video_records(buf: np.ndarray, start: np.ndarray, size: np.ndarray, id_key: str, num_classes: int) -> Parsed:
    """Recognise tf.train.Example records buf[start:start + size] (PADDING bytes must follow the last).

    id_key: the dataset version's id feature ('id' or 'video_id').
    """
    keys = _keys(id_key, "labels", "mean_rgb", "mean_audio")
    return Parsed(*_examples(*_contiguous(buf, start, size), keys.length, keys.low, keys.high, _FLOAT_WORDS,
                             _FLOAT_SIZES, num_classes))


@numba.njit(**_JIT)
def _sequence_examples(buf, start, size, key_length, key_low, key_high, list_length, list_low, list_high,
                       prefix_words, strides, num_classes):
    spans, feature_starts = _spans(len(start)), np.zeros((2, len(start)), np.int64)
    frames = np.zeros(len(start), np.int64)
    _walk_sequence_examples(buf, start, size, key_length, key_low, key_high, list_length, list_low, list_high,
                            prefix_words, strides, *spans, feature_starts, frames)
    return _finish(buf, *spans, num_classes, frames, feature_starts)


def frame_records(buf: np.ndarray, start: np.ndarray, size: np.ndarray, id_key: str, num_classes: int) -> Parsed:
    """Recognise tf.train.SequenceExample records buf[start:start + size] (PADDING bytes must follow the last).

    Recognised: the context (id, labels), then feature lists 'rgb' and 'audio'
    (either order, nothing else) of the same nonzero number of frames, each frame
    one byte string of 1024 or 128 bytes.
    """
    keys = _keys(id_key, "labels")
    return Parsed(*_sequence_examples(*_contiguous(buf, start, size), keys.length, keys.low, keys.high,
                                      _LIST_KEYS.length, _LIST_KEYS.low, _LIST_KEYS.high, _PREFIX_WORDS,
                                      _STRIDES, num_classes))
