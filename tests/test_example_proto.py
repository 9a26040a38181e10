"""example_proto's messages are TensorFlow's, byte for byte, and the data path runs without TensorFlow."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pb2
from tensorflow.core.example import example_pb2, feature_pb2

from conftest import REPO
from yt8m_qrnn.records import example_proto
from yt8m_qrnn.stages.generate import write_tfrecord
from yt8m_qrnn.records.tfrecord import iter_records


def tf_class(name: str):
    return getattr(example_pb2 if name.endswith("Example") else feature_pb2, name)


@pytest.mark.parametrize("name", example_proto.NAMES)
def test_the_schema_is_tensorflows(name):
    ours, theirs = descriptor_pb2.DescriptorProto(), descriptor_pb2.DescriptorProto()
    getattr(example_proto, name).DESCRIPTOR.CopyToProto(ours)
    tf_class(name).DESCRIPTOR.CopyToProto(theirs)
    assert ours == theirs
    assert getattr(example_proto, name).DESCRIPTOR.full_name == f"tensorflow.{name}"
    files = [descriptor_pb2.FileDescriptorProto() for _ in range(2)]
    getattr(example_proto, name).DESCRIPTOR.file.CopyToProto(files[0])
    tf_class(name).DESCRIPTOR.file.CopyToProto(files[1])
    assert files[0].syntax == files[1].syntax == "proto3"


def fill_example(example):
    feature = example.features.feature
    feature["id"].bytes_list.value.append(b"Ab3x")
    feature["labels"].int64_list.value.extend([0, 7, 3861, -1, 2**62])
    feature["mean_rgb"].float_list.value.extend(np.linspace(-2, 2, 1024, dtype=np.float32).tolist())
    feature["mean_audio"].float_list.value.extend([0.5, -0.0, 1e-30])
    feature["empty"].float_list.SetInParent()
    return example


def fill_sequence_example(seq):
    seq.context.feature["id"].bytes_list.value.append(b"Zq9k")
    seq.context.feature["labels"].int64_list.value.extend([4, 1])
    rng = np.random.default_rng(0)
    lists = seq.feature_lists.feature_list
    for _ in range(3):
        lists["rgb"].feature.add().bytes_list.value.append(rng.integers(0, 256, 1024, np.uint8).tobytes())
        lists["audio"].feature.add().bytes_list.value.append(rng.integers(0, 256, 128, np.uint8).tobytes())
        lists["score"].feature.add().float_list.value.extend([0.25, -3.5])
        lists["count"].feature.add().int64_list.value.extend([1, 2, 3])
    return seq


@pytest.mark.parametrize("name, fill", [("Example", fill_example), ("SequenceExample", fill_sequence_example)])
def test_the_bytes_are_tensorflows_both_ways(name, fill):
    ours, theirs = getattr(example_proto, name), tf_class(name)
    for build, other in ((ours, theirs), (theirs, ours)):
        data = fill(build()).SerializeToString(deterministic=True)
        parsed = other.FromString(data)
        assert parsed.ByteSize() == len(data)
        assert parsed.SerializeToString(deterministic=True) == data
        assert build.FromString(parsed.SerializeToString()) == fill(build())


def test_real_records_parse_as_with_tensorflow(shared_yt8m):
    count = 0
    for _, data in iter_records(shared_yt8m / "2018" / "video" / "validate0000.tfrecord"):
        ours, theirs = example_proto.Example.FromString(data), example_pb2.Example.FromString(data)
        assert example_pb2.Example.FromString(ours.SerializeToString()) == theirs
        assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
        count += 1
    assert count > 100


def test_synth_frames_records_as_tensorflow_does(tmp_path):
    records = [fill_example(example_proto.Example()).SerializeToString(), b"", bytes(range(256)) * 9]
    write_tfrecord(tmp_path / "ours.tfrecord", records)
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for record in records:
            writer.write(record)
    assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "tf.tfrecord").read_bytes()


NO_TENSORFLOW = textwrap.dedent("""
    import importlib.abc, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                raise ImportError(f"{name}: TensorFlow is not installed here")

    sys.meta_path.insert(0, NoTensorFlow())
    try:
        import tensorflow
    except ImportError:
        pass
    else:
        raise AssertionError("the blocker let tensorflow in")

    import json
    from pathlib import Path
    import numpy as np
    from yt8m_qrnn.records import example_proto
    from yt8m_qrnn.records import fastparse
    from yt8m_qrnn.stages import index
    from yt8m_qrnn.data import reader
    from yt8m_qrnn.stages import generate as synth
    from yt8m_qrnn.records import tfrecord

    root = Path(sys.argv[1])
    gen = {"seed": 1, "num_events": 3, "min_frames": 2, "max_frames": 6, "noise": 0.3, "splits": {"train": [2, 5]}}
    synth.generate_mirror(gen, 2, 3862, root)
    # and one record per level that fastparse leaves to protobuf
    odd = {"frame": synth.frame_example(synth.Video("odd1", [5], np.ones((3, 1152), np.uint8))),
           "video": synth.video_example(synth.Video("odd2", [6], np.ones((1, 1152), np.uint8)))}
    for level, data in odd.items():
        message = (example_proto.SequenceExample if level == "frame" else example_proto.Example).FromString(data)
        features = message.context if level == "frame" else message.features
        features.feature["source"].bytes_list.value.append(b"camera")
        tfrecord.write_records(root / f"2/{level}/train/train0009.tfrecord", [message.SerializeToString()])
    tasks = [(path, path.relative_to(root).as_posix(), path.parts[-3], "train")
             for path in sorted(root.glob("2/*/train/*.tfrecord"))]
    rows, bad = index.index_shards(tasks, 2)
    assert not bad and len(rows) == 2 * 11, (bad, len(rows))
    for level in ("frame", "video"):
        level_rows = rows[rows["level"] == level].reset_index(drop=True)
        assert (level_rows["rgb_at"] < 0).sum() == 1
        positions = np.arange(len(level_rows))
        if level == "frame":
            features, num_frames, _ = reader.FrameBatches(root, level_rows, 2, 3862, 6)(positions)
        else:
            features, num_frames, _ = reader.VideoBatches(root, level_rows, 2, 3862)(positions)
        for row, got, frames in zip(level_rows.itertuples(), features, num_frames):
            data = tfrecord.read_record_at(root / row.shard, row.offset)
            if level == "frame":
                lists = example_proto.SequenceExample.FromString(data).feature_lists.feature_list
                stored = [np.frombuffer(r.bytes_list.value[0] + a.bytes_list.value[0], np.uint8)
                          for r, a in zip(lists["rgb"].feature, lists["audio"].feature)]
                assert frames == row.num_frames == len(stored)
                assert (got[:frames] == np.array(stored)).all() and not got[frames:].any()
            else:
                feature = example_proto.Example.FromString(data).features.feature
                assert (got == np.array(feature["mean_rgb"].float_list.value[:] +
                                        feature["mean_audio"].float_list.value[:], np.float32)).all()
    assert not [name for name in sys.modules if name.split(".")[0] == "tensorflow"]
    print(json.dumps(sorted(rows["id"])))
""")


def test_the_data_path_runs_without_tensorflow(tmp_path):
    done = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, str(tmp_path / "mirror")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = json.loads(done.stdout.splitlines()[-1])
    assert len(ids) == 22 and {"odd1", "odd2"} <= set(ids)
