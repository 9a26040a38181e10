"""TFRecord framing: reading with CRC checks, and writing.

A record is a uint64 data length (little endian), the masked crc32c of those 8
bytes (uint32), the data, and the masked crc32c of the data (uint32).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import crc32c as _crc32c
import numba
import numpy as np

from yt8m_qrnn.pipeline.io import atomic_path

HEADER = struct.Struct("<QI")
_LENGTH_SIZE = 8  # the uint64 data length that starts a record
FOOTER = struct.Struct("<I")
HEADER_SIZE = HEADER.size
FOOTER_SIZE = FOOTER.size
_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF
_POLY = 0x82F63B78  # CRC-32C, bit-reflected
_RESYNC_CHUNK = 1 << 22  # header candidates examined per numpy pass while resynchronising


class RecordError(ValueError):
    """A record that cannot be used. str: one line naming the file and byte offset when known."""

    def __init__(self, path, offset, reason):
        super().__init__(path, offset, reason)
        self.path = None if path is None else str(path)
        self.offset = offset
        self.reason = " ".join(str(reason).split())  # always one line

    def __str__(self):
        if self.path is None:
            return self.reason
        return f"{self.path}: record at byte offset {self.offset}: {self.reason}"

    def __reduce__(self):  # subclasses may order their arguments differently
        return _rebuild_error, (type(self), self.path, self.offset, self.reason)


def _rebuild_error(cls, path, offset, reason):
    err = cls.__new__(cls)
    RecordError.__init__(err, path, offset, reason)
    return err


class CorruptRecordError(RecordError):
    """The TFRecord framing is broken: truncated, or a length or data CRC mismatch."""


def masked_crc(data: bytes) -> int:
    crc = _crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def _crc_reset() -> int:
    """The word that, xored into a message's crc32c and appended to it, brings the register back to all ones."""
    register = _U32
    for _ in range(32):  # the register's steps over the 32 bits of the word, run backwards
        register = ((register ^ _POLY) << 1 | 1) & _U32 if register >> 31 else register << 1 & _U32
    return register ^ _U32


_CRC_RESET = _crc_reset()


def scan_buffer(buf: bytes, verify: bool = True) -> Iterator[tuple[int, bytes | None, str | None]]:
    """Walk the records of a whole file held in `buf`.

    Yields (offset, data, None) for each good record and (offset, None, reason)
    for each broken one. A data CRC mismatch skips just that record. After a bad
    length CRC the length cannot be trusted: if the consumer goes on, the scan
    resumes at the next offset holding a whole valid record. Truncation ends it.
    """
    size = len(buf)
    unpack_header, unpack_footer, crc32c = HEADER.unpack_from, FOOTER.unpack_from, _crc32c.crc32c
    pos = 0
    while pos < size:
        if size - pos < HEADER_SIZE:
            yield pos, None, f"truncated header: {size - pos} bytes left, a header needs {HEADER_SIZE}"
            return
        length, length_crc = unpack_header(buf, pos)
        if verify:  # masked_crc() inlined: this loop runs once per record
            crc = crc32c(buf[pos:pos + 8])
            if (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32 != length_crc:
                yield pos, None, "bad length crc"
                pos = _next_valid_record(buf, pos + 1)
                if pos is None:
                    return
                continue
        start = pos + HEADER_SIZE
        end = start + length
        if end + FOOTER_SIZE > size:
            yield pos, None, (f"truncated data: record claims {length} data bytes + {FOOTER_SIZE} crc bytes, "
                              f"{size - start} bytes left")
            return
        data = buf[start:end]
        if verify:
            crc = crc32c(data)
            if (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32 != unpack_footer(buf, end)[0]:
                yield pos, None, "bad data crc"
                pos = end + FOOTER_SIZE
                continue
        yield pos, data, None
        pos = end + FOOTER_SIZE


def record_ok(buf: bytes, pos: int) -> bool:
    """True when a whole record whose length and data match their CRCs starts at buf[pos] (bytes, memoryview)."""
    length, length_crc = HEADER.unpack_from(buf, pos)
    end = pos + HEADER_SIZE + length
    if end + FOOTER_SIZE > len(buf) or masked_crc(buf[pos:pos + 8]) != length_crc:
        return False
    return masked_crc(buf[pos + HEADER_SIZE:end]) == FOOTER.unpack_from(buf, end)[0]


def _next_valid_record(buf: bytes, start: int) -> int | None:
    """First offset >= start where a whole valid record begins, or None.

    numpy reads a candidate length at every byte offset; only lengths that fit in
    the rest of the file get their CRCs checked, so this is fast even on large shards.
    """
    last = len(buf) - HEADER_SIZE - FOOTER_SIZE  # last offset that can hold an empty record
    for lo in range(start, last + 1, _RESYNC_CHUNK):
        count = min(_RESYNC_CHUNK, last + 1 - lo)
        lengths = np.ndarray((count,), "<u8", buf, lo, (1,))
        room = (last - lo) - np.arange(count, dtype=np.uint64)
        for pos in (lo + np.flatnonzero(lengths <= room)).tolist():
            if record_ok(buf, pos):
                return pos
    return None


def record_layout(buf, start: int = 0, end: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Header offsets and data lengths of the records filling buf[start:end], or None.

    Follows the length fields without checking any CRC (see crcs_match); None
    when they do not tile the span exactly (a truncated file, or a corrupted
    length). buf: a uint8 array, bytes or memoryview. Offsets are positions in buf.
    """
    buf = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    end = len(buf) if end is None else end
    layout, counts = _walk_spans(buf, np.array([start], np.int64), np.array([end], np.int64))
    return (layout[0], layout[1]) if counts[0] >= 0 else None


def checked_layouts(buf: np.ndarray, spans: list[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """The record_layout of each span of buf (a file read into it), None where its framing or a CRC is bad.

    The spans lie back to back; when every span is framed, all CRCs are checked in
    one pass (crcs_match), and only if that fails span by span.
    """
    starts, ends = np.array(spans, np.int64).reshape(-1, 2).T
    layout, counts = _walk_spans(buf, np.ascontiguousarray(starts), np.ascontiguousarray(ends))
    bounds = np.concatenate([[0], np.cumsum(np.maximum(counts, 0))])
    layouts = [(layout[0, a:b], layout[1, a:b]) if count >= 0 else None
               for a, b, count in zip(bounds[:-1].tolist(), bounds[1:].tolist(), counts.tolist())]
    if all(count >= 0 for count in counts.tolist()) and crcs_match(buf, layout[0], layout[1]):
        return layouts
    return [one if one is not None and crcs_match(buf, *one) else None for one in layouts]


@numba.njit(nogil=True, cache=True)
def _walk_spans(buf, starts, ends):
    """(layout, counts): layout[0] the header positions that the length fields lead to from each start,
    layout[1] the data lengths, span after span; counts[k] the records of span k, or -1 unless they end
    exactly at ends[k] (then none of its records are in layout)."""
    counts = np.empty(len(starts), np.int64)  # counted first: a layout sized from the byte count would be MBs
    for k in range(len(starts)):
        counts[k] = _walk_lengths(buf, starts[k], ends[k], np.empty((2, 0), np.int64))
    layout = np.empty((2, np.maximum(counts, 0).sum()), np.int64)
    filled = 0
    for k in range(len(starts)):
        if counts[k] > 0:
            filled += _walk_lengths(buf, starts[k], ends[k], layout[:, filled:])
    return layout, counts


@numba.njit(nogil=True, cache=True)
def _walk_lengths(buf, start, end, layout):
    """Follow the length fields from start, writing header positions and data lengths into layout when it
    has room (an empty layout only counts); the number of records, or -1 unless they end exactly at end."""
    framing = HEADER_SIZE + FOOTER_SIZE
    pos, count = start, 0
    while pos <= end - framing:
        length = _word(buf, pos, _LENGTH_SIZE)
        if length > np.uint64(end - pos - framing):
            return -1
        if count < layout.shape[1]:
            layout[0, count], layout[1, count] = pos, length
        count += 1
        pos += np.int64(length) + framing
    return count if pos == end else -1


def crcs_match(buf: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> bool:
    """True when the length CRC and data CRC of every record match, checked in one crc32c pass.

    buf: writable uint8 array holding the records back to back from offsets[0]
    (record_layout); its CRC fields are modified during the call and restored.

    Why it works: crc32c runs a register that starts at all ones. After a
    message whose crc32c is u, the 4 bytes of u ^ _CRC_RESET bring the register
    back to all ones. So once every stored CRC is replaced by its unmasked value
    ^ _CRC_RESET, the register is back at all ones after every good record, and
    the crc32c of the whole span (the final register ^ all ones) is 0. A bad
    record leaves a nonzero difference that later good records only multiply by
    powers of x (invertible modulo the polynomial), so one bad record, or any few
    flipped bits, is always detected;
    several bad records could cancel with probability about 2**-32, the same odds
    as one record passing a wrong crc.
    """
    if not len(offsets):
        return True
    saved = np.empty((len(offsets), 2), np.uint32)
    _swap_crc_words(buf, offsets, lengths, saved, True)
    try:
        return _crc32c.crc32c(buf[offsets[0]:offsets[-1] + HEADER_SIZE + lengths[-1] + FOOTER_SIZE]) == 0
    finally:
        _swap_crc_words(buf, offsets, lengths, saved, False)


@numba.njit(nogil=True, cache=True)
def _word(buf, pos, size):
    """The `size` (<= 8) bytes at buf[pos] as a little-endian uint64."""
    word = np.uint64(0)
    for i in range(size):
        word |= np.uint64(buf[pos + i]) << np.uint64(8 * i)
    return word


@numba.njit(nogil=True, cache=True)
def _swap_crc_words(buf, offsets, lengths, saved, replace):
    """replace: save each record's two stored CRCs and write unmask(crc) ^ _CRC_RESET in their place;
    else write the saved words back. (numba widens uint32 arithmetic: hence the int64 and the masks.)"""
    for r in range(len(offsets)):
        for k, at in enumerate((offsets[r] + _LENGTH_SIZE, offsets[r] + HEADER_SIZE + lengths[r])):
            if replace:
                word = np.int64(_word(buf, at, FOOTER_SIZE))
                saved[r, k] = word
                rotated = (word - _MASK_DELTA) & _U32
                word = (((rotated << 15) | (rotated >> 17)) & _U32) ^ _CRC_RESET
            else:
                word = np.int64(saved[r, k])
            for i in range(4):
                buf[at + i] = (word >> (8 * i)) & 0xFF


def stored_crcs(buf: np.ndarray, data_ends: np.ndarray) -> np.ndarray:
    """The masked data CRCs (as int64) stored after the records whose data ends at `data_ends` in buf."""
    return np.ndarray((len(buf) - 3,), "<u4", buf, 0, (1,))[data_ends].astype(np.int64)


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def iter_records(path, verify: bool = True) -> Iterator[tuple[int, bytes]]:
    """(header byte offset, data) for each record; CorruptRecordError at the first broken one."""
    for offset, data, problem in scan_buffer(read_file(path), verify):
        if problem is not None:
            raise CorruptRecordError(path, offset, problem)
        yield offset, data


def write_records(path, records: Iterable[bytes]) -> list[int]:
    """Write `records` with TFRecord framing (atomically); return their header offsets."""
    offsets = []
    pos = 0
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            for data in records:
                data = bytes(data)
                header = struct.pack("<Q", len(data))
                f.write(header + FOOTER.pack(masked_crc(header)) + data + FOOTER.pack(masked_crc(data)))
                offsets.append(pos)
                pos += HEADER_SIZE + len(data) + FOOTER_SIZE
    return offsets


def read_record_at(path_or_fileobj: str | os.PathLike | BinaryIO, offset: int) -> bytes:
    """The verified data of the record whose header starts at byte `offset`."""
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        with open(path_or_fileobj, "rb") as f:
            return _read_record(f, str(path_or_fileobj), offset)
    return _read_record(path_or_fileobj, getattr(path_or_fileobj, "name", "<file object>"), offset)


def _read_record(f: BinaryIO, name: str, offset: int) -> bytes:
    f.seek(offset)
    header = f.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        raise CorruptRecordError(name, offset, f"truncated header: {len(header)} bytes, a header needs {HEADER_SIZE}")
    length, length_crc = HEADER.unpack(header)
    if masked_crc(header[:8]) != length_crc:
        raise CorruptRecordError(name, offset, "bad length crc")
    body = f.read(length + FOOTER_SIZE)
    if len(body) < length + FOOTER_SIZE:
        raise CorruptRecordError(name, offset, (f"truncated data: record claims {length} data bytes + "
                                                f"{FOOTER_SIZE} crc bytes, {len(body)} bytes left"))
    data = body[:length]
    if masked_crc(data) != FOOTER.unpack_from(body, length)[0]:
        raise CorruptRecordError(name, offset, "bad data crc")
    return data
