"""The generated dataset is in the exact YouTube-8M 2018 formats and carries order signal."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from yt8m_qrnn.records.features import dequantize, quantize
from yt8m_qrnn.stages.generate import ALPHABET, EventWorld, generate_mirror, label_shape

SMALL = {"seed": 3, "num_events": 5, "min_frames": 6, "max_frames": 12, "noise": 0.3,
         "splits": {"train": [2, 30], "validate": [1, 20], "test": [1, 10]}}
VIDEO_SPEC = {
    "id": tf.io.FixedLenFeature([], tf.string),
    "labels": tf.io.VarLenFeature(tf.int64),
    "mean_rgb": tf.io.FixedLenFeature([1024], tf.float32),
    "mean_audio": tf.io.FixedLenFeature([128], tf.float32),
}
CONTEXT_SPEC = {"id": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64)}
SEQUENCE_SPEC = {"rgb": tf.io.FixedLenSequenceFeature([], tf.string),
                 "audio": tf.io.FixedLenSequenceFeature([], tf.string)}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen") / "mirror"
    summary = generate_mirror(SMALL, version=2, num_classes=3862, root=root)
    return root, summary


def read_frames(path):
    for record in tf.data.TFRecordDataset(str(path)):
        ctx, seq = tf.io.parse_single_sequence_example(record, context_features=CONTEXT_SPEC,
                                                       sequence_features=SEQUENCE_SPEC)
        rgb = np.stack([np.frombuffer(b, np.uint8) for b in seq["rgb"].numpy()])
        audio = np.stack([np.frombuffer(b, np.uint8) for b in seq["audio"].numpy()])
        yield ctx["id"].numpy().decode(), ctx["labels"].values.numpy().tolist(), rgb, audio


def read_videos(path):
    for record in tf.data.TFRecordDataset(str(path)):
        ex = tf.io.parse_single_example(record, VIDEO_SPEC)
        yield ex["id"].numpy().decode(), ex["labels"].values.numpy().tolist(), ex["mean_rgb"].numpy(), ex["mean_audio"].numpy()


def test_layout_and_plans(mirror):
    root, _ = mirror
    for level in ("video", "frame"):
        for split, (shards, _) in SMALL["splits"].items():
            plan = json.loads((root / "2" / "download_plans" / f"{level}_{split}.json").read_text())
            assert sorted(plan["files"]) == [f"{split}{i:04d}.tfrecord" for i in range(shards)]
            for name, md5 in plan["files"].items():
                assert hashlib.md5((root / "2" / level / split / name).read_bytes()).hexdigest() == md5


def test_frame_records_exact_format(mirror):
    root, _ = mirror
    ids = []
    for split, (shards, per_shard) in SMALL["splits"].items():
        for shard in range(shards):
            videos = list(read_frames(root / "2" / "frame" / split / f"{split}{shard:04d}.tfrecord"))
            assert len(videos) == per_shard
            for video_id, labels, rgb, audio in videos:
                assert len(video_id) == 4 and video_id[2:] == ALPHABET[shard // 62] + ALPHABET[shard % 62]
                assert rgb.shape[1] == 1024 and audio.shape[1] == 128 and len(rgb) == len(audio)
                assert SMALL["min_frames"] <= len(rgb) <= SMALL["max_frames"]
                assert labels == sorted(labels) and all(0 <= c < 3862 for c in labels)
                assert (labels == []) == (split == "test")
                ids.append(video_id)
    assert len(ids) == len(set(ids)), "video ids must be unique across splits"


def test_video_level_is_mean_of_dequantized_frames(mirror):
    root, _ = mirror
    frames = {v[0]: v for v in read_frames(root / "2" / "frame" / "train" / "train0000.tfrecord")}
    for video_id, labels, mean_rgb, mean_audio in read_videos(root / "2" / "video" / "train" / "train0000.tfrecord"):
        _, frame_labels, rgb, audio = frames[video_id]
        assert labels == frame_labels
        np.testing.assert_allclose(mean_rgb, dequantize(rgb).mean(0), atol=1e-5)
        np.testing.assert_allclose(mean_audio, dequantize(audio).mean(0), atol=1e-5)


def test_dequantize_matches_youtube8m_formula():
    q = np.arange(256, dtype=np.uint8)
    np.testing.assert_allclose(dequantize(q), q * 4.0 / 255.0 + 4.0 / 512.0 - 2.0, atol=1e-6)
    np.testing.assert_array_equal(quantize(dequantize(q)), q)


def test_ending_label_needs_frame_order(mirror):
    """Videos showing the same events (so the same expected frame mean) differ in their "ends with" label."""
    root, summary = mirror
    event_of = np.asarray(summary["class_events"])
    ends_with = set(summary["ends_with_classes"])
    num_events = SMALL["num_events"]
    endings_by_event_set: dict[tuple, set] = {}
    for shard in ("train0000", "train0001"):
        for _, labels, _, _ in read_frames(root / "2" / "frame" / "train" / f"{shard}.tfrecord"):
            ending = [event_of[c] for c in labels if c in ends_with]
            assert len(ending) <= 1
            shown = tuple(sorted({int(event_of[c]) for c in labels if event_of[c] < num_events}))
            endings_by_event_set.setdefault(shown, set()).add(ending[0] if ending else None)
    assert any(len(endings) > 1 for shown, endings in endings_by_event_set.items() if shown)


def test_last_frames_show_the_ending_event():
    rng = np.random.default_rng(0)
    world = EventWorld(6, 3862, noise=0.05, rng=rng)
    seen = 0
    for _ in range(300):
        frames, labels = world.sample_frames(rng, 10, 20)
        ending = [c for c in labels if world.ends_with[c]]
        nearest = np.argmin(((dequantize(frames[-1]) - world.prototypes) ** 2).sum(1))
        if ending:
            assert nearest == world.event[ending[0]]
            seen += 1
        else:
            assert nearest >= world.num_events or np.abs(dequantize(frames[-1])).mean() < 0.2, labels
    assert seen > 10


def test_labels_are_shaped_like_youtube8m():
    """Label counts follow the real histogram; classes follow TrainVideoCount (the commonest is class 0, Game)."""
    counts, histogram = label_shape()
    rng = np.random.default_rng(1)
    world = EventWorld(12, 3862, noise=0.6, rng=rng)
    samples = [world.draw_labels(rng, num_frames=300) for _ in range(4000)]
    per_video = np.bincount([len(s) for s in samples], minlength=len(histogram))[:len(histogram)]
    assert np.abs(per_video / per_video.sum() - histogram / histogram.sum()).max() < 0.03
    frequency = np.bincount(np.concatenate(samples), minlength=3862)
    assert frequency.argmax() == counts.argmax() == 0
    top = np.argsort(-counts)[:20]
    assert np.corrcoef(frequency[top], counts[top])[0, 1] > 0.95
    assert 2.8 < np.mean([len(s) for s in samples]) < 3.2


def test_short_videos_cap_their_label_count():
    rng = np.random.default_rng(2)
    world = EventWorld(12, 3862, noise=0.6, rng=rng)
    assert max(len(world.draw_labels(rng, num_frames=3)) for _ in range(500)) == 2


def test_a_vocabulary_of_another_size_is_refused():
    with pytest.raises(ValueError, match="label shape file has 3862 classes"):
        EventWorld(4, 4716, noise=0.6, rng=np.random.default_rng(0))


def test_generation_is_deterministic(tmp_path):
    a = generate_mirror(SMALL, 2, 3862, tmp_path / "a")
    b = generate_mirror(SMALL, 2, 3862, tmp_path / "b")
    assert a == b
    name = "2/frame/validate/validate0000.tfrecord"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_generation_is_deterministic_across_processes(tmp_path):
    """Protobuf's map order may change from one process to the next; the bytes must not."""
    script = ("import sys, json; from pathlib import Path; from yt8m_qrnn.stages.generate import generate_mirror; "
              "generate_mirror(json.loads(sys.argv[1]), 2, 3862, Path(sys.argv[2]))")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, json.dumps(SMALL), str(tmp_path / name)], check=True)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tfrecord"))
    assert files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
