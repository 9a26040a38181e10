"""Training: the data stream, the optimizer, outputs and logs, resuming after a kill or a
signal, several devices (MirroredStrategy on CPU logical devices), mixed precision."""
from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import keras
from conftest import REPO, tool_env
from yt8m_qrnn.data import stream as data_lib
from yt8m_qrnn.stages.index import assign_subsets, index_shards
from yt8m_qrnn.stages.generate import generate_mirror
from yt8m_qrnn.stages.train import ClippedAdam, TrainingInterrupted, learning_rate_schedule, make_optimizer, train_model

C = 3862
TRAIN = {"seed": 1, "learning_rate_decay": 0.95, "learning_rate_decay_examples": 4_000_000,
         "clip_gradient_norm": 1.0, "log_every_steps": 3}
LOGISTIC = {"kind": "logistic", "level": "video", "learning_rate": 0.01, "batch_size": 16, "epochs": 2}
QRNN = {"kind": "qrnn", "level": "frame", "hidden": 8, "layers": 2, "window": 2, "zoneout": 0.0,
        "learning_rate": 0.01, "batch_size": 16, "epochs": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A generated dataset in the YouTube-8M formats (100 train / 19 eval videos of each level) and its index."""
    root = tmp_path_factory.mktemp("tiny") / "mirror"
    gen = {"seed": 3, "num_events": 6, "min_frames": 5, "max_frames": 9, "noise": 0.6,
           "splits": {"train": [2, 40], "validate": [1, 40]}}
    generate_mirror(gen, version=2, num_classes=C, root=root)
    base = root / "2"
    shards = [(p, str(p.relative_to(base)), p.parent.parent.name, p.parent.name)
              for p in sorted(base.glob("*/*/*.tfrecord"))]
    table, _ = index_shards(shards, 2)
    table = assign_subsets(table, ["validate"], 0.5, "x")
    # An even number of training videos: two replicas then split every batch evenly (an odd last
    # batch would weight its videos unequally across replicas, a real difference, not rounding).
    for level in ("video", "frame"):
        train = table.index[(table["subset"] == "train") & (table["level"] == level)]
        table.loc[train[len(train) // 2 * 2:], "subset"] = "test"
    index_path = root / "index.parquet"
    table.to_parquet(index_path)
    return {"data_root": base, "index_path": index_path, "index": table}


def run_training(tiny, out: Path, model_cfg=LOGISTIC, train_cfg=TRAIN, name="m"):
    return train_model(name, model_cfg, train_cfg, version=2, num_classes=C, data_root=tiny["data_root"],
                       index_path=tiny["index_path"], out_dir=out / "out", work_dir=out / "work")


def steps_per_epoch(tiny, level="video", batch=16) -> int:
    return math.ceil(len(data_lib.subset_rows(tiny["index"], "train", level)) / batch)


def weights(path: Path) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(w) for w in keras.saving.load_model(path, compile=False).weights]


def assert_same_weights(a: Path, b: Path, atol: float):
    for x, y in zip(weights(a), weights(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


# ---------------------------------------------------------------- data


def batch_signature(dataset) -> list[tuple]:
    return [tuple(np.round(inputs["features"].numpy()[:, 0, :2].ravel(), 5)) for inputs, _ in dataset]


def test_training_stream_is_a_function_of_seed_and_epoch(tiny):
    rows = data_lib.subset_rows(tiny["index"], "train", "frame")
    keras.utils.set_random_seed(1)

    def stream(start, end, skip=0, seed=5):
        return batch_signature(data_lib.make_training_stream(
            tiny["data_root"], rows, "frame", 2, C, 16, seed=seed, start_epoch=start, end_epoch=end,
            skip_batches=skip))

    steps = data_lib.steps_per_epoch(len(rows), 16)
    full = stream(0, 3)
    assert len(full) == 3 * steps == 3 * math.ceil(len(rows) / 16)
    assert stream(1, 3, skip=4) == full[steps + 4:]  # a resumed run sees the same batches
    assert full[:steps] != full[steps: 2 * steps]  # each epoch has its own order
    assert stream(0, 1, seed=6) != full[:steps]


def test_numpy_batches_are_the_tf_data_batches(tiny):
    """data.batches (JAX, PyTorch, evaluation) holds what data.stream's tf.data pipelines hold."""
    from yt8m_qrnn.data import batches

    rows = data_lib.subset_rows(tiny["index"], "train", "frame")
    stream = list(data_lib.make_training_stream(tiny["data_root"], rows, "frame", 2, C, 16, seed=5, start_epoch=1,
                                                end_epoch=2, skip_batches=2))
    reader = batches.BatchReader(tiny["data_root"], rows, "frame", 2, C)
    epoch = batches.EpochBatches(reader, 16, seed=5, epoch=1, skip=2)
    assert len(epoch) == len(stream) == data_lib.steps_per_epoch(len(rows), 16) - 2
    for number, (tf_inputs, tf_labels) in enumerate(stream):
        inputs, labels = epoch[number]
        np.testing.assert_array_equal(labels, tf_labels.numpy())
        for key in ("features", "num_frames"):
            np.testing.assert_array_equal(inputs[key], tf_inputs[key].numpy())
    one_pass = list(batches.one_pass(tiny["data_root"], rows, "frame", 2, C, 32))
    for (ids, inputs, labels), (tf_ids, tf_inputs, tf_labels) in zip(
            one_pass, data_lib.make_dataset(tiny["data_root"], rows, "frame", 2, C, 32, with_ids=True), strict=True):
        assert list(ids) == [i.decode() for i in tf_ids.numpy()]
        np.testing.assert_array_equal(inputs["features"], tf_inputs["features"].numpy())
        np.testing.assert_array_equal(labels, tf_labels.numpy())


def test_a_short_last_batch_is_filled_up_to_a_multiple_of_the_devices(tiny):
    from yt8m_qrnn.data import batches

    rows = data_lib.subset_rows(tiny["index"], "train", "video").iloc[:37]
    reader = batches.BatchReader(tiny["data_root"], rows, "video", 2, C)
    epoch = batches.EpochBatches(reader, 16, seed=1, epoch=0, multiple_of=4)
    sizes = [len(epoch[i][1]) for i in range(len(epoch))]
    assert sizes == [16, 16, 8]  # 5 videos left, filled up to 8 with the batch's own first videos
    last, labels = epoch[2]
    np.testing.assert_array_equal(last["features"][5:8], last["features"][:3])


def test_batches_padding_and_labels(tiny):
    rows = data_lib.subset_rows(tiny["index"], "eval", "frame")
    ids, inputs, labels = next(iter(data_lib.make_dataset(tiny["data_root"], rows, "frame", 2, C, 64,
                                                          with_ids=True)))
    longest = int(rows["num_frames"].max())
    assert inputs["features"].shape == (len(rows), longest, 1152)
    by_id = rows.set_index("id")
    for vid, frames, count, label in zip(ids.numpy(), inputs["features"].numpy(), inputs["num_frames"].numpy(),
                                         labels.numpy()):
        row = by_id.loc[vid.decode()]
        assert count == row["num_frames"]
        assert frames.dtype == np.uint8 and not frames[count:].any()  # padding: zero bytes
        np.testing.assert_array_equal(frames[:count], stored_frames(tiny["data_root"] / row["shard"], row["offset"]))
        assert sorted(np.flatnonzero(label)) == sorted(row["labels"])


def stored_frames(path, offset) -> np.ndarray:
    """[frames, 1152] uint8: the record's rgb and audio bytes as protobuf reads them."""
    from tensorflow.core.example import example_pb2

    from yt8m_qrnn.records.tfrecord import read_record_at

    example = example_pb2.SequenceExample.FromString(read_record_at(path, int(offset)))
    lists = example.feature_lists.feature_list
    return np.array([np.frombuffer(rgb.bytes_list.value[0] + audio.bytes_list.value[0], np.uint8)
                     for rgb, audio in zip(lists["rgb"].feature, lists["audio"].feature)])


# ---------------------------------------------------------------- optimizer


def test_learning_rate_decays_by_examples():
    cfg = {"learning_rate": 0.01, "batch_size": 1024}
    train = TRAIN | {"learning_rate_decay_examples": 4_000_000}
    for global_batch in (1024, 3 * 1024):
        schedule = learning_rate_schedule(cfg, train, global_batch)
        for step in (0, 1000, 3906, 3907, 10_000):
            expected = 0.01 * 0.95 ** math.floor(step * global_batch / 4_000_000)  # the starter's exponential_decay
            assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)


def numpy_tf1_adam(variables, gradient_steps, lr, clip, beta_1=0.9, beta_2=0.999, epsilon=1e-8):
    """tf.train.AdamOptimizer after utils.clip_gradient_norms (each variable's gradient to norm <= clip)."""
    variables = [np.array(v, np.float64) for v in variables]
    m = [np.zeros_like(v) for v in variables]
    v2 = [np.zeros_like(v) for v in variables]
    for t, grads in enumerate(gradient_steps, start=1):
        lr_t = lr * math.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        for i, g in enumerate(grads):
            g = np.asarray(g, np.float64)
            g = g * min(1.0, clip / max(np.linalg.norm(g), 1e-30))
            m[i] = beta_1 * m[i] + (1 - beta_1) * g
            v2[i] = beta_2 * v2[i] + (1 - beta_2) * g * g
            variables[i] -= lr_t * m[i] / (np.sqrt(v2[i]) + epsilon)
    return variables


def test_optimizer_is_tf1_adam_with_per_variable_clipping():
    optimizer = make_optimizer({"learning_rate": 0.1, "batch_size": 8}, TRAIN)
    assert isinstance(optimizer, ClippedAdam) and optimizer.epsilon == 1e-8 and optimizer.clipnorm == 1.0
    start = [np.array([0.5, -1.0, 2.0], "float32"), np.array([0.1, 0.2], "float32")]
    variables = [keras.Variable(v) for v in start]
    steps = [[np.array([3.0, 4.0, 0.0], "float32"), np.array([0.3, 0.4], "float32")],
             [np.array([0.6, 0.8, 0.0], "float32"), np.array([-2.0, 0.5], "float32")],
             [np.array([30.0, -1.0, 2.0], "float32"), np.array([0.01, 0.0], "float32")]]
    for grads in steps:
        optimizer.apply(grads, variables)
    expected = numpy_tf1_adam(start, steps, 0.1, 1.0)
    for got, want in zip(variables, expected):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got), want, rtol=1e-5, atol=1e-5)  # float32 steps
    unclipped = numpy_tf1_adam(start, steps, 0.1, 1e9)
    assert not np.allclose(unclipped[0], expected[0], atol=1e-4)  # clipping is visible in this example


# ---------------------------------------------------------------- a run and its outputs


def test_train_writes_model_history_and_stats(tiny, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="yt8m_qrnn.stages.train")
    stats = run_training(tiny, tmp_path)
    out = tmp_path / "out"
    rows = data_lib.subset_rows(tiny["index"], "train", "video")
    steps = math.ceil(len(rows) / 16)
    assert stats["steps"] == 2 * steps and stats["epochs"] == 2 and stats["train_videos"] == len(rows)
    assert stats["parameters"] == 1152 * C + C and stats["replicas"] == 1 and stats["global_batch_size"] == 16
    assert stats["model_size_mb"] == pytest.approx((out / "model.keras").stat().st_size / 2**20)
    assert stats["examples_per_second"] > 0 and stats["wall_seconds"] > 0
    assert json.loads((out / "train_stats.json").read_text()) == stats
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2] and list(history["step"]) == [steps, 2 * steps]
    assert history["loss"].iloc[1] < history["loss"].iloc[0]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training step")]
    assert lines[0].startswith("training step 3 | Loss: ") and "Examples/sec: " in lines[0]
    assert len(lines) == 2 * steps // 3
    assert list((tmp_path / "work").glob("*/tensorboard/*tfevents*"))
    assert not list((tmp_path / "work").glob("*/checkpoint"))  # a finished run leaves no checkpoint
    model = keras.saving.load_model(out / "model.keras", compile=False)
    assert getattr(model, "optimizer", None) is None  # inference model only


def test_mixed_precision_trains_and_saves_float32(tiny, tmp_path):
    stats = run_training(tiny, tmp_path, QRNN | {"epochs": 1}, TRAIN | {"precision": "mixed_bfloat16"})
    assert stats["precision"] == "mixed_bfloat16" and np.isfinite(stats["final_loss"])
    model = keras.saving.load_model(tmp_path / "out" / "model.keras", compile=False)
    assert {w.dtype for w in model.weights} == {"float32"}
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


# ---------------------------------------------------------------- interruption and resume

CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import yt8m_qrnn.stages.train as train
    args = json.loads(sys.argv[1])
    original = train.StepLogger.on_train_batch_end
    def slow(self, batch, logs=None):  # slow enough to be stopped mid-run
        time.sleep(args["sleep"])
        original(self, batch, logs)
    train.StepLogger.on_train_batch_end = slow
    train.train_model("m", args["model"], args["train"], version=2, num_classes=3862,
                      data_root=Path(args["data_root"]), index_path=Path(args["index_path"]),
                      out_dir=Path(args["out"]) / "out", work_dir=Path(args["out"]) / "work")
""")


def start_child(tiny, out: Path, model_cfg, train_cfg, sleep: float) -> subprocess.Popen:
    args = {"model": model_cfg, "train": train_cfg, "data_root": str(tiny["data_root"]),
            "index_path": str(tiny["index_path"]), "out": str(out), "sleep": sleep}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], env=tool_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_state(out: Path, ready, child: subprocess.Popen, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in (out / "work").glob("*/checkpoint/state.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if ready(state):
                return state
        if child.poll() is not None:
            raise AssertionError(f"training ended before the expected checkpoint:\n{child.stdout.read()[-3000:]}")
        time.sleep(0.02)
    child.kill()
    raise AssertionError("no checkpoint in time")


RESUME_CASES = [
    pytest.param(LOGISTIC | {"epochs": 5}, id="logistic"),
    pytest.param(QRNN | {"epochs": 4, "zoneout": 0.2}, id="qrnn-zoneout"),
]


@pytest.mark.slow
@pytest.mark.parametrize("model_cfg", RESUME_CASES)
def test_sigkill_then_resume_gives_the_uninterrupted_run(tiny, tmp_path, model_cfg):
    reference = run_training(tiny, tmp_path / "reference", model_cfg)
    child = start_child(tiny, tmp_path / "killed", model_cfg, TRAIN, sleep=0.15)
    try:
        state = wait_for_state(tmp_path / "killed", lambda s: s["epoch"] >= 2, child)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        child.kill()
    assert 2 <= state["epoch"] < model_cfg["epochs"]
    resumed = run_training(tiny, tmp_path / "killed", model_cfg)
    assert resumed["steps"] == reference["steps"] == model_cfg["epochs"] * steps_per_epoch(tiny, model_cfg["level"])
    history = pd.read_csv(tmp_path / "killed" / "out" / "history.csv")
    assert list(history["epoch"]) == list(range(1, model_cfg["epochs"] + 1))  # none lost, none repeated
    assert list(history["step"]) == list(pd.read_csv(tmp_path / "reference" / "out" / "history.csv")["step"])
    assert_same_weights(tmp_path / "reference" / "out" / "model.keras", tmp_path / "killed" / "out" / "model.keras",
                        atol=1e-5)


@pytest.mark.slow
def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly(tiny, tmp_path):
    model_cfg = LOGISTIC | {"epochs": 3}
    reference = run_training(tiny, tmp_path / "reference", model_cfg)
    child = start_child(tiny, tmp_path / "stopped", model_cfg, TRAIN, sleep=0.3)
    try:
        wait_for_state(tmp_path / "stopped", lambda s: s["epoch"] >= 1, child)
        time.sleep(0.7)  # a couple of batches into the next epoch
        child.send_signal(signal.SIGTERM)
        output = child.communicate(timeout=60)[0]
    finally:
        child.kill()
    assert child.returncode != 0 and TrainingInterrupted.__name__ in output and "rerun to resume" in output
    state = json.loads(next((tmp_path / "stopped" / "work").glob("*/checkpoint/state.json")).read_text())
    steps = steps_per_epoch(tiny)
    assert 0 < state["batch"] < steps and state["step"] == state["epoch"] * steps + state["batch"]
    assert not (tmp_path / "stopped" / "out" / "model.keras").exists()
    resumed = run_training(tiny, tmp_path / "stopped", model_cfg)
    assert resumed["steps"] == reference["steps"] == 3 * steps
    ours, theirs = (pd.read_csv(tmp_path / d / "out" / "history.csv") for d in ("stopped", "reference"))
    assert list(ours["epoch"]) == [1, 2, 3]
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5)  # the split epoch's loss is whole again
    assert_same_weights(tmp_path / "reference" / "out" / "model.keras", tmp_path / "stopped" / "out" / "model.keras",
                        atol=1e-6)


def test_a_checkpoint_of_another_configuration_is_not_resumed(tiny, tmp_path):
    run_training(tiny, tmp_path, LOGISTIC | {"epochs": 1})
    stats = run_training(tiny, tmp_path, LOGISTIC | {"epochs": 1, "learning_rate": 0.02})
    assert stats["steps"] == steps_per_epoch(tiny)


# ---------------------------------------------------------------- several devices

MIRRORED_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from yt8m_qrnn.stages.train import train_model
    args = json.loads(sys.argv[1])
    for run, distribute, batch in (("single", "none", 16), ("mirrored", "mirrored", 8)):
        stats = train_model("m", args["model"] | {"batch_size": batch}, args["train"] | {"distribute": distribute},
                            version=2, num_classes=3862, data_root=Path(args["data_root"]),
                            index_path=Path(args["index_path"]), out_dir=Path(args["out"]) / run / "out",
                            work_dir=Path(args["out"]) / run / "work")
        print("STATS", run, json.dumps(stats))
""")


@pytest.mark.slow
@pytest.mark.parametrize("model_cfg", [
    pytest.param({"kind": "moe", "level": "video", "learning_rate": 0.01, "epochs": 2}, id="moe"),
    pytest.param(QRNN | {"layers": 1}, id="qrnn-frame"),
    pytest.param({"kind": "lstm", "level": "frame", "cells": 8, "layers": 1, "learning_rate": 0.01, "epochs": 2},
                 id="lstm"),
])
def test_mirrored_strategy_matches_one_device(tiny, tmp_path, model_cfg):
    """Two replicas of batch 8 = one device with batch 16: same steps, same weights (float rounding)."""
    args = {"model": model_cfg, "train": TRAIN, "data_root": str(tiny["data_root"]),
            "index_path": str(tiny["index_path"]), "out": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", MIRRORED_CHILD, json.dumps(args)], env=tool_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    stats = {line.split()[1]: json.loads(line.split(maxsplit=2)[2])
             for line in result.stdout.splitlines() if line.startswith("STATS ")}
    single, mirrored = stats["single"], stats["mirrored"]
    assert mirrored["replicas"] == 2 and mirrored["strategy"] == "MirroredStrategy"
    assert len(mirrored["devices"]) == 2 and mirrored["global_batch_size"] == single["global_batch_size"] == 16
    assert mirrored["steps"] == single["steps"] == 2 * steps_per_epoch(tiny, model_cfg["level"])
    assert mirrored["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
    assert_same_weights(tmp_path / "single" / "out" / "model.keras", tmp_path / "mirrored" / "out" / "model.keras",
                        atol=2e-4)


def test_unknown_strategy_and_precision_are_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="train.distribute"):
        run_training(tiny, tmp_path, train_cfg=TRAIN | {"distribute": "tpu"})
    with pytest.raises(ValueError, match="train.precision"):
        run_training(tiny, tmp_path, train_cfg=TRAIN | {"precision": "float8"})


# ---------------------------------------------------------------- several workers (MultiWorkerMirroredStrategy)

MULTI_WORKER_CHILD = textwrap.dedent("""
    import json, logging, sys, time
    from pathlib import Path
    import yt8m_qrnn.pipeline.cli, yt8m_qrnn.pipeline.dag  # what workflow/scripts/train.py imports before training
    logging.basicConfig(level=logging.INFO)
    import yt8m_qrnn.stages.train as train
    args = json.loads(sys.argv[1])
    if args["sleep"]:
        original = train.StepLogger.on_train_batch_end
        def slow(self, batch, logs=None):  # slow enough to be stopped mid-run
            time.sleep(args["sleep"])
            original(self, batch, logs)
        train.StepLogger.on_train_batch_end = slow
    stats = train.train_model("m", args["model"], args["train"], version=2, num_classes=3862,
                              data_root=Path(args["data_root"]), index_path=Path(args["index_path"]),
                              out_dir=Path(args["out"]) / "out", work_dir=Path(args["out"]) / "work")
    print("STATS", json.dumps(stats))
""")


def free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_workers(tiny, out: Path, model_cfg, train_cfg, tmpdir: Path, sleep: float = 0.0,
                  workers: int = 2) -> list[subprocess.Popen]:
    """`workers` processes on this machine, one CPU replica each, sharing `out` (one workspace)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    tmpdir.mkdir(parents=True, exist_ok=True)
    args = {"model": model_cfg, "train": train_cfg | {"distribute": "multi_worker"},
            "data_root": str(tiny["data_root"]), "index_path": str(tiny["index_path"]), "out": str(out),
            "sleep": sleep}
    procs = []
    for i in range(workers):
        env = tool_env() | {"CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmpdir),
                            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        log_file = open(out.parent / f"{out.name}-worker{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-c", MULTI_WORKER_CHILD, json.dumps(args)], env=env,
                                      cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, text=True))
        log_file.close()
    return procs


def wait_workers(procs, out: Path, timeout: float = 480.0) -> list[str]:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return [(out.parent / f"{out.name}-worker{i}.log").read_text() for i in range(len(procs))]


def worker_stats(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith("STATS "))[len("STATS "):])


MULTI_WORKER_MODEL = QRNN | {"layers": 1, "batch_size": 8}


@pytest.mark.slow
def test_multi_worker_matches_one_process_and_only_the_chief_writes(tiny, tmp_path):
    """Two workers (TF_CONFIG, 127.0.0.1) of batch 8 = one process with batch 16; worker 0 alone writes."""
    out, tmpdir = tmp_path / "multi", tmp_path / "tmp"
    procs = start_workers(tiny, out, MULTI_WORKER_MODEL, TRAIN, tmpdir)
    outputs = wait_workers(procs, out)
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-4000:]
    single = run_training(tiny, tmp_path / "single", MULTI_WORKER_MODEL | {"batch_size": 16})
    steps = 2 * math.ceil(len(data_lib.subset_rows(tiny["index"], "train", "frame")) / 16)
    for stats in map(worker_stats, outputs):
        assert stats["replicas"] == 2 and stats["strategy"] == "CollectiveAllReduceStrategy"
        assert stats["global_batch_size"] == single["global_batch_size"] == 16
        assert stats["steps"] == single["steps"] == steps
        assert stats["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
    assert sorted(p.name for p in (out / "out").iterdir()) == ["history.csv", "model.keras", "train_stats.json"]
    assert json.loads((out / "out" / "train_stats.json").read_text()) == worker_stats(outputs[0])
    assert list(pd.read_csv(out / "out" / "history.csv")["step"]) == [steps // 2, steps]
    # the other worker wrote only to its temporary folder, removed at the end
    events = list((out / "work").glob("*/tensorboard/*tfevents*"))
    assert len(events) == 1 and events[0].name.split(".")[-3] == str(procs[0].pid)
    assert not list((out / "work").glob("*/checkpoint")) and not list(tmpdir.iterdir())
    assert_same_weights(tmp_path / "single" / "out" / "model.keras", out / "out" / "model.keras", atol=2e-4)


@pytest.mark.slow
def test_multi_worker_stop_signal_stops_every_worker_and_resumes(tiny, tmp_path):
    """SIGTERM to one worker: both checkpoint at the same step and stop; a rerun resumes to the full run."""
    model_cfg = LOGISTIC | {"epochs": 3, "batch_size": 8}
    out, tmpdir = tmp_path / "multi", tmp_path / "tmp"
    procs = start_workers(tiny, out, model_cfg, TRAIN, tmpdir, sleep=0.3)
    try:
        wait_for_state(out, lambda s: s["epoch"] >= 1, procs[0], timeout=240)
        time.sleep(0.7)  # a couple of batches into the next epoch
        procs[1].send_signal(signal.SIGTERM)
    finally:
        outputs = wait_workers(procs, out, timeout=240)
    for output in outputs:
        assert TrainingInterrupted.__name__ in output and "rerun to resume" in output, output[-3000:]
    assert all(p.returncode != 0 for p in procs)
    state = json.loads(next((out / "work").glob("*/checkpoint/state.json")).read_text())
    steps = steps_per_epoch(tiny)
    assert 0 < state["batch"] < steps and state["step"] == state["epoch"] * steps + state["batch"]
    assert not (out / "out").exists()

    outputs = wait_workers(start_workers(tiny, out, model_cfg, TRAIN, tmpdir), out)
    assert all("resuming at epoch" in output for output in outputs), outputs[0][-3000:] + outputs[1][-3000:]
    resumed = worker_stats(outputs[0])
    reference = run_training(tiny, tmp_path / "reference", model_cfg | {"batch_size": 16})
    assert resumed["steps"] == reference["steps"] == 3 * steps
    assert list(pd.read_csv(out / "out" / "history.csv")["epoch"]) == [1, 2, 3]
    assert_same_weights(tmp_path / "reference" / "out" / "model.keras", out / "out" / "model.keras", atol=1e-5)


def test_multi_worker_strategy_can_be_made_after_the_stage_imports():
    """MultiWorkerMirroredStrategy configures collective ops at TensorFlow's startup: nothing the train
    stage imports, nor train_model before making it, may start the runtime (without TF_CONFIG: one worker)."""
    code = textwrap.dedent("""
        import yt8m_qrnn.pipeline.cli, yt8m_qrnn.pipeline.dag, yt8m_qrnn.stages.train as train
        strategy = train.make_strategy("multi_worker")
        print("REPLICAS", strategy.num_replicas_in_sync, strategy.extended.should_checkpoint)
    """)
    env = tool_env() | {"CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CONFIG", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "REPLICAS 1 True" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------- choosing the epoch


@pytest.fixture(scope="module")
def tiny_with_validation(tiny, tmp_path_factory) -> dict:
    """The tiny index with 30% of its training videos in the 'valid' subset (by hash of id)."""
    table = assign_subsets(tiny["index"].drop(columns="subset"), ["validate"], 0.5, "x", "hash", 0.3)
    path = tmp_path_factory.mktemp("valid") / "index.parquet"
    table.to_parquet(path)
    assert (table["subset"] == "valid").sum() > 0
    return tiny | {"index_path": path, "index": table}


def validation_gap(model_path: Path, tiny) -> float:
    from yt8m_qrnn.metrics.official import EvaluationMetrics

    model = keras.saving.load_model(model_path, compile=False)
    rows = data_lib.subset_rows(tiny["index"], "valid", "video")
    metrics = EvaluationMetrics(C, 20)
    for inputs, labels in data_lib.make_dataset(tiny["data_root"], rows, "video", 2, C, 16):
        metrics.accumulate(keras.ops.convert_to_numpy(model(inputs, training=False)), labels.numpy())
    return metrics.gap()


def test_the_best_validation_epoch_is_kept_and_recorded(tiny_with_validation, tmp_path):
    # a learning rate high enough that the validation GAP does not rise every epoch
    cfg = LOGISTIC | {"epochs": 6, "learning_rate": 0.5}
    stats = run_training(tiny_with_validation, tmp_path, cfg, TRAIN | {"patience": 0})
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert list(history["epoch"]) == list(range(1, 7)) and history["val_gap"].notna().all()
    best = int(history["epoch"][history["val_gap"].idxmax()])
    assert stats["best_epoch"] == best and stats["best_val_gap"] == pytest.approx(history["val_gap"].max())
    assert stats["validation_videos"] == len(data_lib.subset_rows(tiny_with_validation["index"], "valid", "video"))
    # the written model is the best epoch's, not the last one's
    assert validation_gap(tmp_path / "out" / "model.keras", tiny_with_validation) == pytest.approx(
        history["val_gap"].max(), abs=1e-6)
    # no validation video was trained on
    train_ids = set(data_lib.subset_rows(tiny_with_validation["index"], "train", "video")["id"])
    assert not train_ids & set(data_lib.subset_rows(tiny_with_validation["index"], "valid", "video")["id"])


def test_training_stops_after_patience_epochs_without_a_better_gap(tiny_with_validation, tmp_path):
    cfg = LOGISTIC | {"epochs": 30, "learning_rate": 0.5}
    stats = run_training(tiny_with_validation, tmp_path, cfg, TRAIN | {"patience": 2})
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert len(history) < 30 and stats["epochs"] == len(history)
    assert len(history) - stats["best_epoch"] == 2  # stopped exactly `patience` epochs after the best
    assert (history["val_gap"].iloc[:stats["best_epoch"] - 1] < stats["best_val_gap"]).all()
    assert history["val_gap"].iloc[stats["best_epoch"]:].max() <= stats["best_val_gap"]
    assert stats["steps"] == len(history) * steps_per_epoch(tiny_with_validation)


def test_the_train_stage_trains_each_seed_and_summarises_them(tiny_with_validation, tmp_path, monkeypatch):
    from yt8m_qrnn.pipeline import dag as stages
    from yt8m_qrnn.pipeline.cli import stage_function
    from yt8m_qrnn.stages import train as train_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_stage, "DATA_ROOT", tiny_with_validation["data_root"])
    monkeypatch.setattr(train_stage, "INDEX", tiny_with_validation["index_path"])
    params = {"data": {"version": 2}, "models": {"m": LOGISTIC | {"epochs": 3}},
              "train": {k: v for k, v in TRAIN.items() if k != "seed"} | {"seeds": [4, 9], "patience": 1}}
    stage_function("train")(params, "m")
    summary = json.loads(Path("results/models/m/train_stats.json").read_text())
    assert summary["seeds"] == [4, 9] and [s["seed"] for s in summary["per_seed"]] == [4, 9]
    assert summary["best_epochs"] == [s["best_epoch"] for s in summary["per_seed"]]
    history = pd.read_csv("results/models/m/history.csv")
    assert list(history["seed"].unique()) == [4, 9]
    assert len(history) == sum(s["epochs"] for s in summary["per_seed"])
    for seed in (4, 9):
        assert (Path(f"results/models/m/seeds/seed-{seed}") / "model.keras").is_file()
    assert weights(Path("results/models/m/seeds/seed-4/model.keras"))[0].tolist() != weights(
        Path("results/models/m/seeds/seed-9/model.keras"))[0].tolist()
    assert not stages.TRAIN_WORK.joinpath("m").exists()  # checkpoints go once every seed is done


def test_the_seeds_folder_appears_only_with_every_seed_in_it(tiny_with_validation, tmp_path, monkeypatch):
    """A kill during the second seed leaves no seeds folder under its final name (Snakemake would
    take a half-filled folder for an incomplete output); the finished seed waits in the work folder."""
    from yt8m_qrnn.pipeline import dag as stages
    from yt8m_qrnn.pipeline.cli import stage_function
    from yt8m_qrnn.stages import train as train_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_stage, "DATA_ROOT", tiny_with_validation["data_root"])
    monkeypatch.setattr(train_stage, "INDEX", tiny_with_validation["index_path"])
    real_train_model, calls = stages_train_model(), []

    def killed_at_second_seed(*args, **kwargs):
        calls.append(kwargs["out_dir"])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_train_model(*args, **kwargs)

    monkeypatch.setattr("yt8m_qrnn.stages.train.train_model", killed_at_second_seed)
    params = {"data": {"version": 2}, "models": {"m": LOGISTIC | {"epochs": 1}},
              "train": {k: v for k, v in TRAIN.items() if k != "seed"} | {"seeds": [4, 9], "patience": 1}}
    with pytest.raises(KeyboardInterrupt):
        stage_function("train")(params, "m")
    assert not Path("results/models/m/seeds").exists()
    assert (calls[0] / "model.keras").is_file() and stages.TRAIN_WORK in calls[0].parents


def stages_train_model():
    from yt8m_qrnn.stages.train import train_model

    return train_model


def test_a_rerun_of_the_train_stage_does_not_train_a_finished_seed_again(tiny_with_validation, tmp_path, monkeypatch,
                                                                          caplog):
    """Killed after its first seed: the declared outputs are gone, the finished seed's checkpoint is not."""
    from yt8m_qrnn.pipeline import dag as stages
    from yt8m_qrnn.pipeline.cli import stage_function
    from yt8m_qrnn.stages import train as train_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_stage, "DATA_ROOT", tiny_with_validation["data_root"])
    monkeypatch.setattr(train_stage, "INDEX", tiny_with_validation["index_path"])
    model_cfg = LOGISTIC | {"epochs": 2}
    train_cfg = {k: v for k, v in TRAIN.items() if k != "seed"} | {"patience": 1}
    first = train_model("m", model_cfg, train_cfg | {"seed": 4}, version=2, num_classes=C,
                        data_root=train_stage.DATA_ROOT, index_path=train_stage.INDEX, out_dir=tmp_path / "gone",
                        work_dir=stages.TRAIN_WORK / "m", keep_checkpoint=True)
    caplog.set_level(logging.INFO, logger="yt8m_qrnn")
    stage_function("train")({"data": {"version": 2}, "models": {"m": model_cfg}, "train": train_cfg | {"seeds": [4, 9]}}, "m")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("finished before (2 epochs" in m for m in messages) == 1  # seed 4: nothing left to train
    assert not any("resuming at epoch" in m for m in messages)
    summary = json.loads(Path("results/models/m/train_stats.json").read_text())
    assert summary["per_seed"][0]["best_epoch"] == first["best_epoch"]
    assert summary["per_seed"][0]["steps"] == first["steps"]
    assert_same_weights(tmp_path / "gone" / "model.keras", Path("results/models/m/seeds/seed-4/model.keras"), 0)
