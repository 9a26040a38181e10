"""reader: batches read at the index's offsets equal what protobuf reads; changed files and stale indexes are errors."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tensorflow.core.example import example_pb2

from yt8m_qrnn.data import stream as data_lib
from yt8m_qrnn.records.features import ID_KEYS
from yt8m_qrnn.stages.index import index_shards
from yt8m_qrnn.data.reader import FrameBatches, VideoBatches
from yt8m_qrnn.records.tfrecord import CorruptRecordError, RecordError, iter_records, read_record_at, write_records

C = 3862


def frame_record(video_id: str, labels, rgb, audio, extra_context=False) -> bytes:
    seq = example_pb2.SequenceExample()
    context = seq.context.feature
    context["id"].bytes_list.value.append(video_id.encode())
    context["labels"].int64_list.value.extend(labels)
    if extra_context:  # valid, but not a layout fastparse takes
        context["source"].bytes_list.value.append(b"camera")
    lists = seq.feature_lists.feature_list
    for name, frames in (("rgb", rgb), ("audio", audio)):
        for frame in frames:
            lists[name].feature.add().bytes_list.value.append(frame.tobytes())
    return seq.SerializeToString()


def video_record(video_id: str, labels, rgb, audio, id_key="id", extra=False) -> bytes:
    example = example_pb2.Example()
    feature = example.features.feature
    feature[id_key].bytes_list.value.append(video_id.encode())
    feature["labels"].int64_list.value.extend(labels)
    feature["mean_rgb"].float_list.value.extend(rgb)
    feature["mean_audio"].float_list.value.extend(audio)
    if extra:
        feature["year"].int64_list.value.append(2018)
    return example.SerializeToString()


@pytest.fixture()
def shards(tmp_path) -> dict:
    """Two frame-level and two video-level shards (one record in three of an unusual layout) and their index."""
    rng = np.random.default_rng(7)
    tasks = []
    for level in ("frame", "video"):
        for shard in range(2):
            records = []
            for i in range(25):
                labels = sorted(rng.choice(C, rng.integers(1, 6), replace=False).tolist())
                unusual = i % 3 == 2
                if level == "frame":
                    count = int(rng.integers(1, 12))
                    rgb = rng.integers(0, 256, (count, 1024), np.uint8)
                    audio = rng.integers(0, 256, (count, 128), np.uint8)
                    records.append(frame_record(f"f{shard}{i:02d}", labels, rgb, audio, unusual))
                else:
                    rgb, audio = rng.normal(size=1024).astype(np.float32), rng.normal(size=128).astype(np.float32)
                    records.append(video_record(f"v{shard}{i:02d}", labels, rgb, audio, extra=unusual))
            name = f"2/{level}/train/train{shard:04d}.tfrecord"
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            write_records(tmp_path / name, records)
            tasks.append((tmp_path / name, name, level, "train"))
    rows, _ = index_shards(tasks, 2)
    return {"root": tmp_path, "frame": rows[rows["level"] == "frame"].reset_index(drop=True),
            "video": rows[rows["level"] == "video"].reset_index(drop=True)}


def protobuf_frames(path: Path, offset: int) -> np.ndarray:
    lists = example_pb2.SequenceExample.FromString(read_record_at(path, offset)).feature_lists.feature_list
    return np.array([np.frombuffer(rgb.bytes_list.value[0] + audio.bytes_list.value[0], np.uint8)
                     for rgb, audio in zip(lists["rgb"].feature, lists["audio"].feature)])


def protobuf_means(path: Path, offset: int) -> np.ndarray:
    feature = example_pb2.Example.FromString(read_record_at(path, offset)).features.feature
    return np.array([*feature["mean_rgb"].float_list.value, *feature["mean_audio"].float_list.value], np.float32)


def check_labels(rows: pd.DataFrame, positions, labels: np.ndarray):
    assert labels.dtype == np.float32 and labels.shape == (len(positions), C)
    for position, hot in zip(positions, labels):
        assert np.flatnonzero(hot).tolist() == sorted(rows["labels"][position])
        assert set(np.unique(hot)) <= {0.0, 1.0}


def test_frame_batches_are_the_stored_bytes_padded_with_zeros(shards):
    rows, root = shards["frame"], shards["root"]
    longest = int(rows["num_frames"].max())
    for frames in (longest, 4):  # every frame kept, or the first 4
        batches = FrameBatches(root, rows, 2, C, frames)
        positions = np.random.default_rng(frames).permutation(len(rows))[:37]  # both shards, in no order
        features, num_frames, labels = batches(positions)
        assert features.dtype == np.uint8 and features.shape == (37, frames, 1152)
        for k, position in enumerate(positions):
            stored = protobuf_frames(root / rows["shard"][position], int(rows["offset"][position]))
            kept = min(len(stored), frames)
            assert num_frames[k] == kept
            np.testing.assert_array_equal(features[k, :kept], stored[:kept])
            assert not features[k, kept:].any()
        check_labels(rows, positions, labels)


def test_the_fixture_has_records_in_and_out_of_the_usual_layout(shards):
    for level in ("frame", "video"):  # the reader copies the first at the indexed positions, parses the others
        usual = shards[level]["rgb_at"] >= 0
        assert 0 < usual.sum() < len(usual), level
        assert ((shards[level]["audio_at"] >= 0) == usual).all()


def test_video_batches_are_the_stored_floats(shards):
    rows, root = shards["video"], shards["root"]
    positions = np.random.default_rng(1).permutation(len(rows))
    features, num_frames, labels = VideoBatches(root, rows, 2, C)(positions)
    assert features.dtype == np.float32 and features.shape == (len(rows), 1152)
    assert (num_frames == 1).all()
    for k, position in enumerate(positions):
        np.testing.assert_array_equal(features[k], protobuf_means(root / rows["shard"][position],
                                                                  int(rows["offset"][position])))
    check_labels(rows, positions, labels)


@pytest.mark.parametrize("at, problem", [(12 + 100, "bad data crc"), (9, "bad length crc")])
def test_a_byte_changed_after_indexing_names_file_and_offset(shards, at, problem):
    rows, root = shards["frame"], shards["root"]
    row = rows.iloc[30]
    path = root / row["shard"]
    raw = bytearray(path.read_bytes())
    raw[int(row["offset"]) + at] ^= 0x01
    path.write_bytes(bytes(raw))
    batches = FrameBatches(root, rows, 2, C, 11)
    batches(np.arange(25))  # the other shard is untouched
    with pytest.raises(CorruptRecordError, match=re.escape(f"{path}: record at byte offset {row['offset']}: "
                                                           f"{problem}")):
        batches(np.array([0, 30, 31]))


def test_a_truncated_shard_is_an_error(shards):
    rows, root = shards["video"], shards["root"]
    row = rows.iloc[-1]
    path = root / row["shard"]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptRecordError, match=f"byte offset {row['offset']}: file ends inside the record"):
        VideoBatches(root, rows, 2, C)(np.array([len(rows) - 1]))


def test_a_shard_rewritten_after_indexing_is_an_error(shards):
    """Valid records, CRCs and all, but not the ones indexed: the stored CRC differs from the index's."""
    rows, root = shards["frame"], shards["root"]
    row = rows.iloc[3]
    path = root / row["shard"]
    records = [data for _, data in iter_records(path)]
    changed = bytearray(records[3])
    changed[-1] ^= 0xFF  # the last audio byte of the last frame
    records[3] = bytes(changed)
    write_records(path, records)
    with pytest.raises(RecordError, match=f"offset {row['offset']}: not the record indexed there .* rerun the "
                                          "index stage"):
        FrameBatches(root, rows, 2, C, 11)(np.array([0, 3]))


@pytest.mark.parametrize("column, value, level", [("id", "other", "frame"), ("num_frames", 99, "frame"),
                                                  ("labels", [1, 2], "video"), ("id", "other", "video")])
def test_a_record_read_with_protobuf_must_match_its_row(shards, column, value, level):
    stale = shards[level].copy()
    stale.at[2, column] = value  # row 2: not in the usual layout
    assert stale["rgb_at"][2] == -1 and stale["rgb_at"][1] >= 0
    read = (FrameBatches(shards["root"], stale, 2, C, 99) if level == "frame"
            else VideoBatches(shards["root"], stale, 2, C))
    with pytest.raises(RecordError, match=f"offset {stale['offset'][2]}: holds video .* the index says "
                                          f".*rerun the index stage"):
        read(np.array([1, 2]))


def test_one_pass_reads_every_row_once_and_shuffles_by_seed(shards):
    rows, root = shards["frame"], shards["root"]

    def ids(**kwargs) -> list[str]:
        dataset = data_lib.make_dataset(root, rows, "frame", 2, C, 8, with_ids=True, **kwargs)
        return [video_id.decode() for batch_ids, _, _ in dataset for video_id in batch_ids.numpy()]

    assert ids() == rows["id"].tolist()
    shuffled = ids(shuffle=True, seed=3)
    assert sorted(shuffled) == sorted(rows["id"]) and shuffled != rows["id"].tolist()
    assert ids(shuffle=True, seed=3) == shuffled and ids(shuffle=True, seed=4) != shuffled


def test_real_2018_and_2017_video_shards_read_as_protobuf_reads_them(shared_yt8m):
    for version, folder, pattern in ((2, "2018/video", "validate000[0-2].tfrecord"),
                                     (1, "2017/video", "validatea[0-1].tfrecord")):
        tasks = [(path, str(path.relative_to(shared_yt8m)), "video", "validate")
                 for path in sorted((shared_yt8m / folder).glob(pattern))]
        rows, _ = index_shards(tasks, version)
        classes = 3862 if version == 2 else 4716
        positions = np.random.default_rng(0).permutation(len(rows))[:500]
        features, _, labels = VideoBatches(shared_yt8m, rows, version, classes)(positions)
        for k, position in enumerate(positions):
            path, offset = shared_yt8m / rows["shard"][position], int(rows["offset"][position])
            feature = example_pb2.Example.FromString(read_record_at(path, offset)).features.feature
            np.testing.assert_array_equal(features[k, :1024], feature["mean_rgb"].float_list.value)
            np.testing.assert_array_equal(features[k, 1024:], feature["mean_audio"].float_list.value)
            assert feature[ID_KEYS[version]].bytes_list.value[0].decode() == rows["id"][position]
            assert np.flatnonzero(labels[k]).tolist() == sorted(feature["labels"].int64_list.value)


def test_an_index_without_the_feature_columns_is_a_clear_error(shards):
    old = shards["frame"].drop(columns=["rgb_at", "audio_at", "data_crc"])
    with pytest.raises(ValueError, match="no rgb_at, audio_at, data_crc column .* rerun the index stage"):
        FrameBatches(shards["root"], old, 2, C, 10)


def test_batches_built_in_several_threads_at_once_are_the_serial_ones(shards):
    from concurrent.futures import ThreadPoolExecutor

    rows, root = shards["frame"], shards["root"]
    batches = FrameBatches(root, rows, 2, C, 11)
    orders = [np.random.default_rng(seed).permutation(len(rows))[:16] for seed in range(24)]
    serial = [batches(order) for order in orders]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(batches, orders))
    for one, other in zip(serial, parallel):
        for a, b in zip(one, other):
            np.testing.assert_array_equal(a, b)
