"""Tests of tfrecord framing and the index stage, on generated shards and (when present) real ones."""
from __future__ import annotations

import itertools
import json
import string
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from tensorflow.core.example import example_pb2, feature_pb2

from yt8m_qrnn.records import fastparse
from yt8m_qrnn.data import index_file
from yt8m_qrnn.records import features, video
from yt8m_qrnn.stages import index as ix
from yt8m_qrnn.records.features import NUM_CLASSES
from yt8m_qrnn.records.tfrecord import (
    CorruptRecordError, RecordError, checked_layouts, crcs_match, iter_records, masked_crc, read_record_at, record_layout,
    scan_buffer, write_records,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "yt8m"
SHARD_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits
PARAMS = {"eval_splits": ["validate"], "eval_fraction": 0.5, "salt": "s", "on_bad_record": "fail"}


# ---------------------------------------------------------------- record builders

def video_record(video_id, labels, version=2, rgb=None, audio=None) -> bytes:
    example = example_pb2.Example()
    feats = example.features.feature
    feats[features.ID_KEYS[version]].bytes_list.value.append(video_id.encode())
    if labels is not None:
        feats["labels"].int64_list.value.extend(labels)
    feats["mean_rgb"].float_list.value.extend(np.zeros(1024) if rgb is None else rgb)
    feats["mean_audio"].float_list.value.extend(np.zeros(128) if audio is None else audio)
    return example.SerializeToString()


def frame_record(video_id, labels, rgb, audio, version=2) -> bytes:
    seq = example_pb2.SequenceExample()
    seq.context.feature[features.ID_KEYS[version]].bytes_list.value.append(video_id.encode())
    if labels is not None:
        seq.context.feature["labels"].int64_list.value.extend(labels)
    lists = seq.feature_lists.feature_list
    for name, frames in (("rgb", rgb), ("audio", audio)):
        for frame in frames:
            lists[name].feature.add().bytes_list.value.append(bytes(frame))
    return seq.SerializeToString()


def random_frames(rng, count):
    return (rng.integers(0, 256, (count, 1024), dtype=np.uint8),
            rng.integers(0, 256, (count, 128), dtype=np.uint8))


def make_dataset(root: Path, rng=None) -> dict:
    """A small 2018 data root: video and frame train shards, a validate shard, an unlabelled test shard."""
    rng = rng or np.random.default_rng(0)
    spec = [  # (name, level, split, number of videos)
        ("2/video/train/train0000.tfrecord", "video", "train", 30),
        ("2/video/train/train0001.tfrecord", "video", "train", 25),
        ("2/frame/train/train0000.tfrecord", "frame", "train", 6),
        ("2/video/validate/validate0000.tfrecord", "video", "validate", 40),
        ("2/video/test/test0000.tfrecord", "video", "test", 10),
    ]
    files, expected = [], {}
    for shard_index, (name, level, split, count) in enumerate(spec):
        records = []
        for i in range(count):
            video_id = f"{split[:2]}{i:02d}{SHARD_ALPHABET[shard_index]}{level[0]}"
            labels = None if split == "test" else sorted(rng.choice(3862, rng.integers(1, 5), replace=False).tolist())
            if level == "video":
                records.append(video_record(video_id, labels))
                num_frames = 1
            else:
                num_frames = int(rng.integers(1, 8))
                records.append(frame_record(video_id, labels, *random_frames(rng, num_frames)))
            expected[(name, video_id)] = (labels or [], num_frames)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_records(path, records)
        files.append({"name": name, "level": level, "split": split})
    return {"files": files, "expected": expected}


def shard_list(root: Path, manifest: dict):
    return [(root / f["name"], f["name"], f["level"], f["split"]) for f in manifest["files"]]


# ---------------------------------------------------------------- tfrecord framing

def test_write_then_iter_and_read_at(tmp_path):
    records = [b"", b"x", bytes(range(256)) * 40, b"last"]
    path = tmp_path / "a.tfrecord"
    offsets = write_records(path, records)
    assert not Path(f"{path}.tmp").exists()
    assert list(iter_records(path)) == list(zip(offsets, records))
    assert offsets == [0, 16, 33, 33 + 16 + 10240]
    with open(path, "rb") as f:
        for offset, data in zip(offsets, records):
            assert read_record_at(path, offset) == data
            assert read_record_at(f, offset) == data


def test_framing_matches_tensorflow_writer(tmp_path):
    tf = pytest.importorskip("tensorflow")
    path = str(tmp_path / "tf.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for data in (b"abc", b"", b"z" * 1000):
            writer.write(data)
    ours = tmp_path / "ours.tfrecord"
    write_records(ours, [b"abc", b"", b"z" * 1000])
    assert ours.read_bytes() == Path(path).read_bytes()


def test_read_record_at_detects_corruption(tmp_path):
    path = tmp_path / "a.tfrecord"
    offsets = write_records(path, [b"hello", b"world"])
    raw = bytearray(path.read_bytes())
    raw[offsets[1] + 12] ^= 1
    path.write_bytes(bytes(raw))
    assert read_record_at(path, offsets[0]) == b"hello"
    with pytest.raises(CorruptRecordError, match=rf"a\.tfrecord: record at byte offset {offsets[1]}: bad data crc"):
        read_record_at(path, offsets[1])
    with pytest.raises(CorruptRecordError, match="truncated header"):
        read_record_at(path, len(raw) - 3)


def test_resync_after_bad_length_crc(tmp_path):
    path = tmp_path / "a.tfrecord"
    records = [bytes([i]) * (100 + i) for i in range(6)]
    offsets = write_records(path, records)
    raw = bytearray(path.read_bytes())
    raw[offsets[2] + 9] ^= 0x40  # the length crc of record 2
    found = list(scan_buffer(bytes(raw)))
    assert [(o, d) for o, d, p in found if p is None] == [(offsets[i], records[i]) for i in (0, 1, 3, 4, 5)]
    [(offset, _, reason)] = [f for f in found if f[2] is not None]
    assert offset == offsets[2] and reason.startswith("bad length crc")
    raw[offsets[5] + 9] ^= 0x40  # no valid record follows the last one: the scan just ends
    assert [o for o, _, p in scan_buffer(bytes(raw)) if p is not None] == [offsets[2], offsets[5]]


def test_iter_records_without_verification_ignores_crcs(tmp_path):
    path = tmp_path / "a.tfrecord"
    write_records(path, [b"hello", b"world"])
    raw = bytearray(path.read_bytes())
    raw[12] ^= 1
    path.write_bytes(bytes(raw))
    assert [d for _, d in iter_records(path, verify=False)] == [b"iello", b"world"]
    with pytest.raises(CorruptRecordError, match="offset 0: bad data crc"):
        list(iter_records(path))


@pytest.mark.parametrize("sizes", [[0, 1, 2, 3, 4, 5, 0], [300] * 12, [0] * 6])
def test_crcs_match_checks_every_byte_and_restores_the_buffer(tmp_path, sizes):
    rng = np.random.default_rng(len(sizes))
    path = tmp_path / "a.tfrecord"
    write_records(path, [rng.bytes(size) for size in sizes])
    raw = np.frombuffer(path.read_bytes(), np.uint8)
    buf = np.concatenate([raw, np.zeros(8, np.uint8)])
    assert crcs_match(buf, *record_layout(memoryview(buf), 0, len(raw)))
    assert (buf[:len(raw)] == raw).all()
    for pos in rng.choice(len(raw), min(len(raw), 60), replace=False):  # lengths, data and both crcs alike
        damaged = buf.copy()
        damaged[pos] ^= 1 << int(rng.integers(8))
        layout = record_layout(memoryview(damaged), 0, len(raw))
        assert layout is None or not crcs_match(damaged, *layout), pos


def test_checked_layouts_finds_the_bad_files_of_a_batch(tmp_path):
    rng = np.random.default_rng(2)
    raws = []
    for k, sizes in enumerate([[5, 300, 0], [40] * 7, [1000, 3]]):
        path = tmp_path / f"{k}.tfrecord"
        write_records(path, [rng.bytes(size) for size in sizes])
        raws.append(path.read_bytes())
    ends = np.cumsum([len(raw) for raw in raws]).tolist()
    spans = list(zip([0] + ends[:-1], ends))

    def check(damage=None, cut=0):
        buf = np.frombuffer(b"".join(raws) + bytes(32), np.uint8).copy()
        if damage is not None:
            buf[damage] ^= 0x20
        before = buf.copy()
        layouts = checked_layouts(buf, spans[:2] + [(spans[2][0], spans[2][1] - cut)])
        assert (buf == before).all()  # the CRC fields are restored
        return [layout is not None for layout in layouts], layouts

    good, layouts = check()
    assert good == [True, True, True]
    for (start, end), (offsets, lengths) in zip(spans, layouts):
        expected = record_layout(np.frombuffer(b"".join(raws), np.uint8), start, end)
        assert (offsets == expected[0]).all() and (lengths == expected[1]).all()
    assert check(damage=spans[1][0] + 3 * 56 + 20)[0] == [True, False, True]  # a data byte of file 1
    assert check(damage=spans[0][0] + 8)[0] == [False, True, True]  # the first length crc of file 0
    assert check(cut=1)[0] == [True, True, False]  # file 2 cut short
    assert check(damage=spans[1][0] + 1, cut=1)[0] == [True, False, False]  # a length of file 1 and file 2


def test_errors_pickle_with_their_location():
    import pickle

    for err in (CorruptRecordError("f.tfrecord", 12, "bad data crc"), video.BadRecordError("bad\nthing").at("g", 3)):
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err) and str(copy) == str(err) and "\n" not in str(copy)


# ---------------------------------------------------------------- parsing records

def test_parse_video_and_frame_records():
    rng = np.random.default_rng(1)
    assert video.parse_video_record(video_record("ab", [5, 3]), 2, "video") == ("ab", [3, 5], 1)
    assert video.parse_video_record(video_record("ab", None), 2, "video") == ("ab", [], 1)
    rgb, audio = random_frames(rng, 4)
    assert video.parse_video_record(frame_record("fr", [7], rgb, audio), 2, "frame") == ("fr", [7], 4)


def test_parse_2017_records_use_video_id_and_get_sorted():
    record = video_record("vid1", [4715, 2, 300], version=1)
    assert video.parse_video_record(record, 1, "video") == ("vid1", [2, 300, 4715], 1)
    with pytest.raises(video.BadRecordError, match="no 'id' feature"):
        video.parse_video_record(record, 2, "video")
    with pytest.raises(video.BadRecordError, match="label 4715 out of range"):
        video.parse_video_record(video_record("vid1", [4715], version=2), 2, "video")


@pytest.mark.parametrize("record, level, message", [
    (b"\xff\xff\xff", "video", "not a tf.train.Example"),
    (video_record("a", [1], rgb=np.zeros(1023)), "video", "'mean_rgb' has 1023 float_list values"),
    (video_record("a", [1], audio=np.zeros(129)), "video", "'mean_audio' has 129 float_list values"),
    (video_record("a", [-1]), "video", "label -1 out of range"),
    (video_record("", [1]), "video", "'id' is empty"),
    (video_record("a", [1]), "frame", "no 'rgb' frames"),
    (frame_record("a", [1], np.zeros((2, 1024), np.uint8), np.zeros((2, 128), np.uint8)), "video",
     "no 'mean_rgb' feature"),
    (frame_record("a", [1], np.zeros((2, 1024), np.uint8), np.zeros((1, 128), np.uint8)), "frame",
     "2 'rgb' frames but 1 'audio' frames"),
    (frame_record("a", [1], [np.zeros(1024, np.uint8), np.zeros(1000, np.uint8)], np.zeros((2, 128), np.uint8)),
     "frame", r"'rgb' frame 1 holds byte strings of sizes \[1000\], expected one of 1024"),
])
def test_parse_rejects_unusable_records(record, level, message):
    with pytest.raises(video.BadRecordError, match=message):
        video.parse_video_record(record, 2, level)


def test_frames_with_unknown_fields_take_the_slow_path():
    rgb, audio = random_frames(np.random.default_rng(5), 3)
    seq = example_pb2.SequenceExample.FromString(frame_record("u", [1], rgb, audio))
    first = seq.feature_lists.feature_list["rgb"].feature[0]
    first.MergeFromString(b"\x28\x01")  # an unknown varint field 5: valid, but not the usual layout
    record = seq.SerializeToString()
    assert video.parse_video_record(record, 2, "frame") == ("u", [1], 3)
    derived = example_pb2.Example.FromString(ix.derive_video_level(record, 2)).features.feature
    expected = features.dequantize(rgb).mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(derived["mean_rgb"].float_list.value, expected, atol=1e-6)


def test_frame_with_two_byte_strings_is_rejected():
    seq = example_pb2.SequenceExample.FromString(frame_record("u", [1], *random_frames(np.random.default_rng(6), 2)))
    seq.feature_lists.feature_list["audio"].feature[1].bytes_list.value.append(b"")
    with pytest.raises(video.BadRecordError, match=r"'audio' frame 1 holds byte strings of sizes \[128, 0\]"):
        video.parse_video_record(seq.SerializeToString(), 2, "frame")


def test_parse_rejects_labels_of_the_wrong_type():
    example = example_pb2.Example.FromString(video_record("a", None))
    example.features.feature["labels"].float_list.value.append(1.0)
    with pytest.raises(video.BadRecordError, match="'labels' has 1 float_list values"):
        video.parse_video_record(example.SerializeToString(), 2, "video")


def test_parse_ignores_the_empty_field_2_of_real_2018_records():
    assert video.parse_video_record(video_record("ab", [1]) + b"\x12\x00", 2, "video") == ("ab", [1], 1)


# ---------------------------------------------------------------- the fast path (fastparse)

def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def _entry(key: str, kind: str, values) -> bytes:
    """One serialized Features map entry."""
    features = feature_pb2.Features()
    getattr(features.feature[key], kind).value.extend(values)
    return features.SerializeToString()


def _fast(records: list[bytes], level: str, version: int = 2) -> dict[int, tuple]:
    """What fastparse recognises among records laid out as in a batch: {record number: (id, labels, frames)}."""
    buf, starts = bytearray(), []
    for data in records:
        buf += bytes(12)  # where the TFRecord header would be
        starts.append(len(buf))
        buf += data + bytes(4)
    buf = np.frombuffer(bytes(buf + bytes(fastparse.PADDING)), np.uint8).copy()
    recognise = fastparse.video_records if level == "video" else fastparse.frame_records
    parsed = recognise(buf, np.array(starts, np.int64), np.array([len(d) for d in records], np.int64),
                       features.ID_KEYS[version], NUM_CLASSES[version])
    id_ends, label_ends = np.cumsum(parsed.id_sizes), np.cumsum(parsed.label_counts)
    return {int(i): (parsed.id_bytes[id_end - size:id_end].tobytes().decode(),
                     parsed.label_values[label_end - count:label_end].tolist(), int(frames))
            for i, id_end, size, label_end, count, frames in zip(
                np.flatnonzero(parsed.ok), id_ends, parsed.id_sizes, label_ends, parsed.label_counts, parsed.frames)}


def _agrees_with_parser(records: list[bytes], level: str, version: int = 2) -> dict[int, tuple]:
    """Assert the fast path's contract: a recognised record reads as parse_video_record reads it."""
    fast = _fast(records, level, version)
    for i, got in fast.items():
        assert got == video.parse_video_record(records[i], version, level), (i, records[i][:80])
    return fast


def _video_variants() -> list[bytes]:
    ids = [b"abcd", b"x", b"y" * 117, b"z" * 118, b"w" * 300, "\u00e9t\u00e9".encode(), b"\xff\xfe", b""]
    labels = [None, [3, 5], [0], [3861], [3862], [-1], [5, 3], [3000, 128, 5], [127, 128, 16383], [16384],
              list(range(70)), []]
    rgb, audio = _entry("mean_rgb", "float_list", [0.5] * 1024), _entry("mean_audio", "float_list", [0.25] * 128)
    records = []
    for video_id, label_list in itertools.product(ids, labels):
        entries = [_entry("id", "bytes_list", [video_id]), rgb, audio]
        if label_list is not None:
            entries.insert(1, _entry("labels", "int64_list", label_list))
        records.append(_field(0x0A, b"".join(entries)))
        records.append(_field(0x0A, b"".join(entries[::-1])) + b"\x12\x00")
    standard = [_entry("id", "bytes_list", [b"abcd"]), _entry("labels", "int64_list", [1, 2]), rgb, audio]
    records += [
        _field(0x0A, b"".join(standard)) + b"\x12\x01x",  # a field 2 that is not empty
        _field(0x0A, b"".join(standard + [_entry("extra", "int64_list", [1])])),
        _field(0x0A, b"".join(standard[:2] + [_entry("mean_rgb", "float_list", [0.5] * 1023), audio])),
        _field(0x0A, b"".join(standard[:1] + [_entry("labels", "float_list", [1.0]), rgb, audio])),
        _field(0x0A, b"".join(standard + standard[1:2])),  # labels twice: protobuf keeps the last
        _field(0x0A, b"".join(standard[1:])),  # no id
        _field(0x0A, b"".join(standard)) + b"\x1a\x00",  # an unknown Example field
        _field(0x0A, b"".join(standard))[:-1],  # cut short
    ]
    return records


def test_fast_path_agrees_with_the_parser_on_video_records():
    records = _video_variants()
    fast = _agrees_with_parser(records, "video")
    assert 0 in fast and 1 in fast and 4 in fast  # the usual layouts are recognised
    for chunk in range(0, len(records), 7):  # other mixes of shapes in one batch
        _agrees_with_parser(records[chunk:] + records[:chunk], "video")


def test_fast_path_agrees_with_the_parser_on_2017_records():
    records = [video_record("vid1", [4715, 2, 300], version=1), video_record("vid2", [4716], version=1),
               video_record("vid3", None, version=1), video_record("vid4", [1])]
    assert set(_agrees_with_parser(records, "video", version=1)) == {0, 2}


def test_fast_path_reads_long_and_overlong_length_fields():
    long_id = "v" * 20000  # map entry lengths of 3 varint bytes
    records = [video_record(long_id, [2, 1]), frame_record(long_id, [4], *random_frames(np.random.default_rng(1), 2))]
    assert _agrees_with_parser(records[:1], "video") == {0: (long_id, [1, 2], 1)}
    assert _agrees_with_parser(records[1:], "frame") == {0: (long_id, [4], 2)}
    # The id's length written in two bytes where one would do (protobuf reads such varints too)
    bytes_list = b"\x0a\x83\x00abc"
    overlong = _field(0x0A, _field(0x0A, b"id") + _field(0x12, _field(0x0A, bytes_list)))
    rest = b"".join(_entry(key, "float_list", [0.0] * size) for key, size in (("mean_rgb", 1024), ("mean_audio", 128)))
    record = _field(0x0A, overlong + _entry("labels", "int64_list", [7]) + rest)
    assert video.parse_video_record(record, 2, "video") == ("abc", [7], 1)
    assert _agrees_with_parser([record], "video") == {0: ("abc", [7], 1)}


def _damaged(records: list[bytes], rng, per_record: int) -> list[bytes]:
    """Copies of the records with 1-3 bytes changed, mostly among the field headers (first and last 64 bytes)."""
    out = []
    for data in records:
        for _ in range(per_record):
            damaged = bytearray(data)
            for _ in range(int(rng.integers(1, 4))):
                where = rng.choice([rng.integers(0, 64), len(data) - 1 - rng.integers(0, 64), rng.integers(len(data))])
                damaged[int(where) % len(data)] = int(rng.integers(256))
            out.append(bytes(damaged))
    return out


@pytest.mark.parametrize("level", ["video", "frame"])
def test_fast_path_agrees_with_the_parser_on_damaged_records(level):
    rng = np.random.default_rng(5)
    if level == "video":
        good = [video_record("abcd", [3, 5, 9]), video_record("e", None), video_record("f" * 200, [3861, 0])]
    else:
        good = [frame_record("ab", [1, 2], *random_frames(rng, 3)), frame_record("c", None, *random_frames(rng, 1))]
    records = _damaged(good, rng, 400)
    fast = _agrees_with_parser(records, level)
    assert 0 < len(fast) < len(records)  # the walk recognises some of them and leaves others to protobuf


def test_fast_path_agrees_with_the_parser_on_frame_records():
    rng = np.random.default_rng(7)
    records = []
    for video_id, labels, frames in itertools.product(["fr", "\u00e9", ""], [None, [7], [9, 2], [3862]], [1, 3]):
        records.append(frame_record(video_id, labels, *random_frames(rng, frames)))
    rgb, audio = random_frames(rng, 2)
    seq = example_pb2.SequenceExample.FromString(frame_record("sw", [1], rgb, audio))
    context = _field(0x0A, seq.context.SerializeToString())
    lists = seq.feature_lists.feature_list
    rgb_entry = _field(0x0A, _field(0x0A, b"rgb") + _field(0x12, lists["rgb"].SerializeToString()))
    audio_entry = _field(0x0A, _field(0x0A, b"audio") + _field(0x12, lists["audio"].SerializeToString()))
    records += [
        context + _field(0x12, audio_entry + rgb_entry),  # the lists in the other order
        context + _field(0x12, rgb_entry),  # no audio
        context + _field(0x12, rgb_entry + rgb_entry),  # rgb twice
        frame_record("un", [1], rgb, audio[:1]),
        frame_record("wd", [1], [rgb[0], rgb[1][:1000]], audio),
    ]
    fast = _agrees_with_parser(records, "frame")
    assert 0 in fast and len(records) - 5 in fast


# ---------------------------------------------------------------- indexing

def _feature_bytes(data: bytes, level: str) -> tuple[list[bytes], list[bytes]]:
    """The rgb and audio bytes of a record as protobuf reads them: per frame, or the float lists' bytes."""
    if level == "video":
        feature = example_pb2.Example.FromString(data).features.feature
        return ([np.asarray(feature["mean_rgb"].float_list.value, "<f4").tobytes()],
                [np.asarray(feature["mean_audio"].float_list.value, "<f4").tobytes()])
    lists = example_pb2.SequenceExample.FromString(data).feature_lists.feature_list
    return tuple([frame.bytes_list.value[0] for frame in lists[name].feature] for name in ("rgb", "audio"))


def test_rows_locate_the_features_and_keep_the_stored_crc(tmp_path):
    rng = np.random.default_rng(3)
    rgb, audio = random_frames(rng, 4)
    usual = frame_record("fa", [5], rgb, audio)
    seq = example_pb2.SequenceExample.FromString(usual)
    seq.context.feature["extra"].int64_list.value.append(1)  # valid, not the usual layout
    frame_path, video_path = (tmp_path / f"2/{level}/train/train0000.tfrecord" for level in ("frame", "video"))
    frame_path.parent.mkdir(parents=True)
    video_path.parent.mkdir(parents=True)
    write_records(frame_path, [usual, seq.SerializeToString(), frame_record("fc", [1, 2], *random_frames(rng, 1))])
    write_records(video_path, [video_record("va", [1], rgb=rng.normal(size=1024), audio=rng.normal(size=128)),
                               video_record("vb", [2])])
    shards = [(frame_path, "f", "frame", "train"), (video_path, "v", "video", "train")]
    df, _ = ix.index_shards(shards, 2)
    assert (df["rgb_at"] == -1).tolist() == [False, True, False, False, False]
    assert ((df["audio_at"] == -1) == (df["rgb_at"] == -1)).all()
    for row in df.itertuples():
        path = frame_path if row.level == "frame" else video_path
        data = read_record_at(path, row.offset)
        assert row.data_crc == masked_crc(data)
        if row.rgb_at < 0:
            continue
        rgb_frames, audio_frames = _feature_bytes(data, row.level)
        for k, (rgb_bytes, audio_bytes) in enumerate(zip(rgb_frames, audio_frames)):
            rgb_at = row.rgb_at + k * fastparse.FRAME_STRIDES[0]
            audio_at = row.audio_at + k * fastparse.FRAME_STRIDES[1]
            assert data[rgb_at:rgb_at + len(rgb_bytes)] == rgb_bytes
            assert data[audio_at:audio_at + len(audio_bytes)] == audio_bytes


def test_index_shards_rows(tmp_path):
    manifest = make_dataset(tmp_path)
    df, bad = ix.index_shards(shard_list(tmp_path, manifest), 2, "fail")
    assert bad == [] and list(df.columns) == index_file.COLUMNS
    assert len(df) == len(manifest["expected"]) == 30 + 25 + 6 + 40 + 10
    assert df["offset"].dtype == np.int64 and df["length"].dtype == np.int64 and df["num_frames"].dtype == np.int32
    for row in df.itertuples():
        labels, num_frames = manifest["expected"][(row.shard, row.id)]
        assert row.labels == labels and row.num_frames == num_frames
        data = read_record_at(tmp_path / row.shard, row.offset)
        assert len(data) == row.length
        assert video.parse_video_record(data, 2, row.level)[0] == row.id
    assert set(df.loc[df["split"] == "test", "labels"].map(len)) == {0}
    assert df.groupby("shard").size().to_dict() == {
        f["name"]: n for f, n in zip(manifest["files"], (30, 25, 6, 40, 10))}


@pytest.fixture
def small_batches(monkeypatch):
    """Every shard a batch of its own, so that both worker threads get batches."""
    monkeypatch.setattr(ix, "BATCH_BYTES", 1)


def worker_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("index-worker")]


@pytest.mark.parametrize("batch_bytes", [1, ix.BATCH_BYTES])
def test_index_parallel_matches_serial(tmp_path, monkeypatch, batch_bytes):
    monkeypatch.setattr(ix, "BATCH_BYTES", batch_bytes)
    manifest = make_dataset(tmp_path)
    serial, _ = ix.index_shards(shard_list(tmp_path, manifest), 2, "fail", workers=1)
    parallel, _ = ix.index_shards(shard_list(tmp_path, manifest), 2, "fail", workers=2)
    pd.testing.assert_frame_equal(serial, parallel)
    assert not worker_threads()


def test_read_error_is_raised_and_leaves_no_thread(tmp_path, small_batches, monkeypatch):
    manifest = make_dataset(tmp_path)
    read_into, calls = ix._read_into, []

    def failing_read(path, out):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("the disk is on fire")
        return read_into(path, out)

    monkeypatch.setattr(ix, "_read_into", failing_read)
    with pytest.raises(OSError, match="the disk is on fire"):
        ix.index_shards(shard_list(tmp_path, manifest), 2, "fail", workers=2)
    assert not worker_threads()


def test_parse_error_in_the_first_batch_leaves_no_thread(tmp_path, small_batches):
    manifest = make_dataset(tmp_path)
    name = manifest["files"][0]["name"]
    records = [data for _, data in iter_records(tmp_path / name)]
    write_records(tmp_path / name, records[:1] + [b"not an example"] + records[2:])
    with pytest.raises(RecordError, match="not a tf.train.Example"):  # later batches are pending or running
        ix.index_shards(shard_list(tmp_path, manifest), 2, "fail", workers=2)
    assert not worker_threads()


def test_index_unlabelled_shard_alone(tmp_path):
    manifest = make_dataset(tmp_path)
    [test_shard] = [shard for shard in shard_list(tmp_path, manifest) if shard[3] == "test"]
    df, bad = ix.index_shards([test_shard], 2)
    assert bad == [] and len(df) == 10 and df["labels"].tolist() == [[]] * 10


def test_index_2017_shards(tmp_path):
    path = tmp_path / "1/video/validate/validatea0.tfrecord"
    path.parent.mkdir(parents=True)
    write_records(path, [video_record("a0x", [40, 3, 4715], version=1), video_record("a0y", None, version=1)])
    df, _ = ix.index_shards([(path, "1/video/validate/validatea0.tfrecord", "video", "validate")], 1)
    assert df["id"].tolist() == ["a0x", "a0y"] and df["labels"].tolist() == [[3, 40, 4715], []]


def test_index_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="on_bad_record"):
        ix.index_shards([], 2, "ignore")
    with pytest.raises(ValueError, match="unknown level"):
        ix.index_shards([(tmp_path / "x", "x", "clip", "train")], 2)
    with pytest.raises(ValueError, match="version"):
        ix.index_shards([], 3)
    df, bad = ix.index_shards([], 2)
    assert df.empty and list(df.columns) == index_file.COLUMNS and bad == []


# ---------------------------------------------------------------- corruption

def _corrupt(kind: str, path: Path, offsets: list[int]) -> int:
    """Damage the record at offsets[2] of the shard at `path` in the given way; return that offset."""
    raw = bytearray(path.read_bytes())
    target = offsets[2]
    if kind == "truncated":
        target = offsets[-1]
        del raw[target + 20:]
    elif kind == "data_crc":
        raw[target + 12 + 40] ^= 0x10
    elif kind == "length_crc":
        raw[target + 3] ^= 0x01  # the length itself: its crc no longer matches
    else:
        replacement = {
            "not_example": b"this is not a protobuf \xff\xff",
            "wrong_example": video_record("x", None),
            "label_range": frame_record("zz", [3862], np.zeros((2, 1024), np.uint8), np.zeros((2, 128), np.uint8)),
            "frame_bytes": frame_record("zz", [1], np.zeros((2, 1024), np.uint8), np.zeros((2, 127), np.uint8)),
        }[kind]
        records = [data for _, data in iter_records(path)]
        records[2] = replacement
        write_records(path, records)
        return target
    path.write_bytes(bytes(raw))
    return target


KINDS = {  # kind -> what the error says
    "truncated": "truncated data", "data_crc": "bad data crc", "length_crc": "bad length crc",
    "not_example": "not a tf.train.SequenceExample", "wrong_example": "no 'rgb' frames",
    "label_range": "label 3862 out of range", "frame_bytes": "'audio' frame 0 holds byte strings of sizes",
}


@pytest.fixture
def damaged(tmp_path, request):
    """A dataset whose frame shard has one damaged record: (root, manifest, shard name, bad offset, kind)."""
    manifest = make_dataset(tmp_path)
    name = "2/frame/train/train0000.tfrecord"
    offsets = [offset for offset, _ in iter_records(tmp_path / name)]
    offset = _corrupt(request.param, tmp_path / name, offsets)
    return tmp_path, manifest, name, offset, request.param


@pytest.mark.parametrize("damaged", list(KINDS), indirect=True)
def test_bad_record_fails_naming_file_and_offset(damaged):
    root, manifest, name, offset, kind = damaged
    out, stats = root / "out/index.parquet", root / "out/stats.json"
    with pytest.raises(RecordError) as caught:
        ix.index_shards(shard_list(root, manifest), 2, "fail")
    message = str(caught.value)
    assert str(root / name) in message and f"offset {offset}:" in message and KINDS[kind] in message
    assert "\n" not in message
    with pytest.raises(RecordError):
        ix.run_index(root, manifest, PARAMS, 2, out, stats)
    assert not out.exists() and not stats.exists() and not list(out.parent.glob("*"))


@pytest.mark.parametrize("damaged", list(KINDS), indirect=True)
def test_bad_record_skipped_and_counted(damaged):
    root, manifest, name, offset, kind = damaged
    out, stats_path = root / "out/index.parquet", root / "out/stats.json"
    df = ix.run_index(root, manifest, PARAMS | {"on_bad_record": "skip"}, 2, out, stats_path)
    stats = json.loads(stats_path.read_text())
    assert stats["bad_records"]["count"] == 1
    [entry] = stats["bad_records"]["records"]
    assert entry["shard"] == name and entry["offset"] == offset and KINDS[kind] in entry["reason"]
    assert len(df) == len(manifest["expected"]) - 1
    assert (df["shard"] == name).sum() == 5
    assert offset not in df.loc[df["shard"] == name, "offset"].tolist()


@pytest.mark.parametrize("on_bad_record", ["fail", "skip"])
@pytest.mark.parametrize("damaged", list(KINDS), indirect=True)
def test_bad_records_alike_with_one_and_two_workers(damaged, small_batches, on_bad_record):
    root, manifest, _, _, _ = damaged
    outcomes = []
    for workers in (1, 2):
        try:
            df, bad = ix.index_shards(shard_list(root, manifest), 2, on_bad_record, workers=workers)
            outcomes.append((df.to_dict("list"), bad))
        except RecordError as err:
            outcomes.append((type(err), str(err)))
    assert outcomes[0] == outcomes[1]
    assert not worker_threads()


def test_skip_counts_every_bad_record(tmp_path):
    manifest = make_dataset(tmp_path)
    for name in ("2/video/train/train0001.tfrecord", "2/video/validate/validate0000.tfrecord"):
        raw = bytearray((tmp_path / name).read_bytes())
        for offset in [o for o, _ in iter_records(tmp_path / name)][1:4]:
            raw[offset + 30] ^= 0xFF
        (tmp_path / name).write_bytes(bytes(raw))
    df, bad = ix.index_shards(shard_list(tmp_path, manifest), 2, "skip")
    assert len(bad) == 6 and len(df) == len(manifest["expected"]) - 6
    assert {entry["reason"] for entry in bad} == {"bad data crc"}


def test_run_index_with_no_shards(tmp_path):
    out, stats = tmp_path / "index.parquet", tmp_path / "stats.json"
    df = ix.run_index(tmp_path, {"files": []}, PARAMS, 2, out, stats)
    assert df.empty and pd.read_parquet(out).empty
    assert json.loads(stats.read_text())["subsets"]["train"]["videos"] == 0


def test_missing_shard_is_an_error_even_when_skipping(tmp_path):
    manifest = make_dataset(tmp_path)
    (tmp_path / manifest["files"][1]["name"]).unlink()
    with pytest.raises(FileNotFoundError):
        ix.index_shards(shard_list(tmp_path, manifest), 2, "skip")


def test_failed_run_removes_stale_outputs(tmp_path):
    out, stats = tmp_path / "out/index.parquet", tmp_path / "out/stats.json"
    out.parent.mkdir()
    out.write_text("old")
    stats.write_text("old")
    manifest = {"files": [{"name": "missing.tfrecord", "level": "video", "split": "train"}]}
    with pytest.raises(FileNotFoundError):
        ix.run_index(tmp_path, manifest, PARAMS, 2, out, stats)
    assert not out.exists() and not stats.exists()


# ---------------------------------------------------------------- subsets and statistics

def _ids_frame(ids, split="validate", labels=([1],)):
    return pd.DataFrame({"id": ids, "split": split, "labels": [list(labels[0])] * len(ids), "level": "video"})


def test_subsets_deterministic_and_fraction_respected():
    ids = [f"v{i:05d}" for i in range(4000)]
    first = ix.assign_subsets(_ids_frame(ids), ["validate"], 0.3, "salt")
    again = ix.assign_subsets(_ids_frame(ids), ["validate"], 0.3, "salt")
    assert first["subset"].tolist() == again["subset"].tolist()
    assert set(first["subset"]) == {"train", "eval"}
    assert abs((first["subset"] == "eval").mean() - 0.3) < 0.03
    other_salt = ix.assign_subsets(_ids_frame(ids), ["validate"], 0.3, "pepper")
    assert (other_salt["subset"] != first["subset"]).any()


def test_subset_of_a_video_ignores_other_shards(tmp_path):
    manifest = make_dataset(tmp_path)
    shards = shard_list(tmp_path, manifest)
    full = ix.assign_subsets(ix.index_shards(shards, 2)[0], ["validate", "train"], 0.4, "x")
    part = ix.assign_subsets(ix.index_shards(shards[3:][::-1], 2)[0], ["validate", "train"], 0.4, "x")
    merged = part.merge(full, on=["shard", "id"], suffixes=("_part", "_full"))
    assert len(merged) == len(part) and (merged["subset_part"] == merged["subset_full"]).all()


def test_subset_rules():
    df = pd.DataFrame({
        "id": ["a", "b", "c", "d"], "split": ["test", "test", "train", "validate"],
        "labels": [[], [3], [1], [2]], "level": "video",
    })
    out = ix.assign_subsets(df, ["validate"], 1.0, "s")
    assert out["subset"].tolist() == ["test", "train", "train", "eval"]
    assert "subset" not in df.columns
    assert ix.assign_subsets(df, ["validate"], 1e-12, "s")["subset"].tolist()[3] == "train"


def test_hash_bucket_formula():
    import hashlib

    digest = hashlib.sha256(b"saltvid").hexdigest()
    assert ix.hash_bucket("salt", "vid") == int(digest[:16], 16) / 2**64


def test_label_statistics(tmp_path):
    manifest = make_dataset(tmp_path)
    df = ix.assign_subsets(ix.index_shards(shard_list(tmp_path, manifest), 2)[0], ["validate"], 0.5, "s")
    stats = ix.label_statistics(df, 3862)
    assert sum(s["videos"] for s in stats["subsets"].values()) == len(df)
    test = stats["subsets"]["test"]
    assert test["videos"] == 10 and test["labels"] == 0 and test["videos_without_labels"] == 10
    train = stats["subsets"]["train"]
    train_rows = df[df["subset"] == "train"]
    assert train["labels"] == sum(map(len, train_rows["labels"]))
    assert len(train["positives_per_class"]) == 3862 and sum(train["positives_per_class"]) == train["labels"]
    frames = train_rows.loc[train_rows["level"] == "frame", "num_frames"]
    assert train["frames"]["total"] == frames.sum() and train["frames"]["max"] == frames.max()
    assert train["mean_labels_per_video"] == pytest.approx(train["labels"] / train["videos"])
    json.dumps(stats)


def test_run_index_outputs(tmp_path):
    manifest = make_dataset(tmp_path)
    out, stats_path = tmp_path / "results/index.parquet", tmp_path / "results/stats.json"
    df = ix.run_index(tmp_path, manifest, PARAMS, 2, out, stats_path)
    table = pq.read_table(out)
    assert str(table.schema.field("labels").type) == "list<element: int32>"
    assert str(table.schema.field("num_frames").type) == "int32"
    back = pd.read_parquet(out)
    assert back["id"].tolist() == df["id"].tolist() and back["subset"].tolist() == df["subset"].tolist()
    assert [list(x) for x in back["labels"]] == df["labels"].tolist()
    stats = json.loads(stats_path.read_text())
    assert stats["bad_records"]["count"] == 0 and stats["shards"] == 5 and stats["rows"] == len(df)
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.parquet", "stats.json"]


# ---------------------------------------------------------------- video level derived from frames

def test_derive_video_level_is_the_mean_of_dequantized_frames():
    rng = np.random.default_rng(3)
    rgb, audio = random_frames(rng, 7)
    derived = example_pb2.Example.FromString(ix.derive_video_level(frame_record("vv", [9, 2], rgb, audio), 2))
    feats = derived.features.feature
    expected = (np.concatenate([rgb, audio], axis=1).astype(np.float64) * 4 / 255 + 4 / 512 - 2).mean(axis=0)
    got = np.concatenate([feats["mean_rgb"].float_list.value, feats["mean_audio"].float_list.value])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert feats["id"].bytes_list.value == [b"vv"] and list(feats["labels"].int64_list.value) == [9, 2]
    assert video.parse_video_record(derived.SerializeToString(), 2, "video") == ("vv", [2, 9], 1)


def test_derive_video_level_2017_unlabelled():
    rgb, audio = random_frames(np.random.default_rng(4), 2)
    derived = ix.derive_video_level(frame_record("t1", None, rgb, audio, version=1), 1)
    assert video.parse_video_record(derived, 1, "video") == ("t1", [], 1)
    assert "labels" not in example_pb2.Example.FromString(derived).features.feature


def test_derive_video_shards(tmp_path):
    manifest = make_dataset(tmp_path)
    frame_shard = tmp_path / "2/frame/train/train0000.tfrecord"
    [written] = ix.derive_video_shards([frame_shard], tmp_path / "derived", version=2)
    assert written == tmp_path / "derived/train0000.tfrecord"
    frames, _ = ix.index_shards([(frame_shard, "f", "frame", "train")], 2)
    videos, _ = ix.index_shards([(written, "v", "video", "train")], 2)
    assert videos["id"].tolist() == frames["id"].tolist()
    assert videos["labels"].tolist() == frames["labels"].tolist()
    assert set(videos["num_frames"]) == {1}


# ---------------------------------------------------------------- real YouTube-8M shards

def _real(*parts) -> Path:
    folder = SHARED.joinpath(*parts)
    if not folder.is_dir():
        pytest.skip(f"real YouTube-8M shards not found at {folder} (only present beside the project checkout)")
    return folder


@pytest.mark.realdata
def test_real_2018_validate_shards():
    folder = _real("2018", "video")
    paths = sorted(folder.glob("validate*.tfrecord"))
    assert len(paths) == 100
    shards = [(p, f"2/video/validate/{p.name}", "video", "validate") for p in paths]
    df, bad = ix.index_shards(shards, 2, "fail")
    assert bad == [] and len(df) == 28792
    assert df["id"].is_unique
    flat = np.concatenate([np.asarray(x, int) for x in df["labels"]])
    assert flat.min() >= 0 and flat.max() <= 3861 and df["labels"].map(len).min() >= 1
    for shard_index, path in enumerate(paths):
        code = SHARD_ALPHABET[shard_index // 62] + SHARD_ALPHABET[shard_index % 62]
        ids = df.loc[df["shard"] == f"2/video/validate/{path.name}", "id"]
        assert len(ids) and ids.str.endswith(code).all(), path.name
    row = df.iloc[12345]
    data = read_record_at(folder / Path(row["shard"]).name, row["offset"])
    assert video.parse_video_record(data, 2, "video")[0] == row["id"] and row["data_crc"] == masked_crc(data)
    assert (df["rgb_at"] >= 0).all()  # every real record is in the usual layout
    rgb, audio = _feature_bytes(data, "video")
    assert data[row["rgb_at"]:row["rgb_at"] + 4096] == rgb[0]
    assert data[row["audio_at"]:row["audio_at"] + 512] == audio[0]


@pytest.mark.realdata
def test_real_2018_shards_alike_with_one_and_two_workers(shared_yt8m):
    paths = sorted((shared_yt8m / "2018" / "video").glob("validate*.tfrecord"))
    shards = [(p, f"2/video/validate/{p.name}", "video", "validate") for p in paths]
    serial, serial_bad = ix.index_shards(shards, 2, "fail", workers=1)
    parallel, parallel_bad = ix.index_shards(shards, 2, "fail", workers=2)
    pd.testing.assert_frame_equal(serial, parallel)
    assert serial_bad == parallel_bad == [] and not worker_threads()


@pytest.mark.realdata
def test_real_2017_validate_and_test_shards():
    folder = _real("2017", "video")
    validate = [(p, f"1/video/validate/{p.name}", "video", "validate") for p in sorted(folder.glob("validate*"))]
    test = [(p, f"1/video/test/{p.name}", "video", "test") for p in sorted(folder.glob("test*.tfrecord"))]
    df, bad = ix.index_shards(validate + test, 1, "fail")
    assert bad == []
    labelled = df[df["split"] == "validate"]
    assert len(labelled) == 3419 and (df["split"] == "test").sum() == 1709
    assert labelled["labels"].map(len).min() >= 1
    assert all(x == sorted(x) and 0 <= x[0] and x[-1] < 4716 for x in labelled["labels"])
    subsets = ix.assign_subsets(df, ["validate"], 0.5, "yt8m-qrnn")
    assert (subsets.loc[df["split"] == "test", "subset"] == "test").all()
    assert set(subsets.loc[df["split"] == "validate", "subset"]) == {"train", "eval"}
